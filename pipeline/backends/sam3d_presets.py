"""Named speed/quality presets of the SAM 3D Objects backend (``reconstruct.sam3d.preset``).

A preset fills every sampler knob the user left unset (``null``); a knob set explicitly always wins.
``quality`` is the upstream default (25 + 25 steps, classifier-free guidance, Gaussians + mesh) and the
project default. Measured speeds are in docs/reconstruct.md and benchmarks/results/. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import Sam3dConfig

__all__ = ["PRESETS", "SamplerSettings", "resolve_settings"]


@dataclass(frozen=True)
class SamplerSettings:
    """What one object's reconstruction runs with.

    ``stage1_distillation``: stage 1 (sparse structure) uses the shortcut model's distilled few-step sampling
    without classifier-free guidance (one network pass per step instead of three). ``stage2_distillation``:
    stage 2 runs without guidance (one pass per step instead of two; stage 2 has no shortcut head).
    """

    stage1_steps: int
    stage2_steps: int
    decode_formats: tuple[str, ...]
    stage1_distillation: bool
    stage2_distillation: bool


PRESETS: dict[str, SamplerSettings] = {
    "quality": SamplerSettings(25, 25, ("gaussian", "mesh"), False, False),
    "fast": SamplerSettings(8, 12, ("gaussian", "mesh"), True, False),
    "preview": SamplerSettings(4, 8, ("gaussian",), True, False),
}


def resolve_settings(cfg: Sam3dConfig) -> SamplerSettings:
    """The preset named by ``cfg.preset`` with every explicitly set knob of ``cfg`` applied on top."""
    base = PRESETS[cfg.preset]
    return SamplerSettings(
        stage1_steps=cfg.stage1_steps if cfg.stage1_steps is not None else base.stage1_steps,
        stage2_steps=cfg.stage2_steps if cfg.stage2_steps is not None else base.stage2_steps,
        decode_formats=tuple(cfg.decode_formats) if cfg.decode_formats is not None else base.decode_formats,
        stage1_distillation=(
            cfg.stage1_distillation if cfg.stage1_distillation is not None else base.stage1_distillation
        ),
        stage2_distillation=(
            cfg.stage2_distillation if cfg.stage2_distillation is not None else base.stage2_distillation
        ),
    )
