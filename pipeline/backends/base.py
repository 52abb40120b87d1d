"""The two backend interfaces a stage worker drives, and the values they exchange.

A backend is constructed once per worker process (that is where the model loads) and then serves many
images. Built-in backends live next to this module; plug-ins are named in config as
``package.module:Class`` and must subclass :class:`Segmenter` or :class:`Reconstructor`.
This module imports only numpy and PIL: heavy libraries are imported inside the backends that need them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import trimesh
    from PIL import Image

    from pipeline.config import ReconstructConfig, SegmentConfig
    from pipeline.handoff import Pose

__all__ = ["Detections", "Segmenter", "GaussianSet", "ObjectReconstruction", "Reconstructor"]


@dataclass(frozen=True)
class Detections:
    """Everything one phrase matched in the current image, before post-processing.

    ``masks``: (N, H, W) bool at input resolution; ``boxes``: (N, 4) float32 XYXY in input pixels;
    ``scores``: (N,) float32 in [0, 1]. N may be 0.
    """

    phrase: str
    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.masks.ndim != 3 or self.masks.shape[0] != n or self.boxes.shape != (n, 4):
            raise ValueError(
                f"Detections for {self.phrase!r}: masks {self.masks.shape}, boxes {self.boxes.shape} and "
                f"scores {self.scores.shape} disagree; expected (N,H,W), (N,4), (N,)"
            )


class Segmenter(ABC):
    """Text-prompted instance segmentation. Usage: ``set_image`` once, then ``predict`` any number of times."""

    def __init__(self, config: SegmentConfig) -> None:
        self.config = config

    @abstractmethod
    def set_image(self, image: Image.Image) -> None:
        """Encode one RGB image (H×W); later ``predict`` calls reuse the encoding."""

    @abstractmethod
    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        """One :class:`Detections` per phrase, in order, for the image last given to ``set_image``."""

    def prefetch(self, images: Sequence[Image.Image]) -> None:
        """A hint that ``set_image`` will soon be called with each of ``images`` (RGB, any sizes).

        A backend may encode them together (one batched encoder pass) and let ``set_image`` reuse the result;
        results must equal the one-image path. The default does nothing.
        """

    def load_timings(self) -> dict[str, float]:
        """Seconds per start-up step (e.g. ``build_s``), sent with the worker's ``ready`` event. Default: none."""
        return {}


@dataclass
class GaussianSet:
    """3D Gaussians in the standard 3DGS parameterisation (SH degree 0).

    ``xyz`` (N,3) centres; ``f_dc`` (N,3) degree-0 SH colour (colour = 0.5 + 0.2820948·f_dc);
    ``opacity`` (N,) logit; ``log_scale`` (N,3) natural log of the per-axis scale; ``rot_wxyz`` (N,4)
    orientation quaternion (w, x, y, z). All float32. The frame is stated by whoever holds the set
    (per-object sets are in the canonical object frame: z-up, inside [-0.5, 0.5]³).
    """

    xyz: np.ndarray
    f_dc: np.ndarray
    opacity: np.ndarray
    log_scale: np.ndarray
    rot_wxyz: np.ndarray

    def __len__(self) -> int:
        return int(self.xyz.shape[0])


@dataclass
class ObjectReconstruction:
    """One object lifted to 3D.

    ``gaussians`` are in the canonical object frame (z-up); ``mesh`` is a trimesh in the canonical GLB frame
    (y-up, i.e. (x, y, z)_zup ↦ (x, z, -y)); ``pose`` maps the canonical z-up frame into the camera frame it
    names. ``notes`` carry things the user should know (e.g. "texture baking unavailable: …").
    """

    gaussians: GaussianSet | None
    mesh: trimesh.Trimesh | None
    pose: Pose
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Reconstructor(ABC):
    """Single-image, single-mask 3D reconstruction with a per-image context computed once."""

    def __init__(self, config: ReconstructConfig) -> None:
        self.config = config

    @abstractmethod
    def prepare(self, image: np.ndarray) -> Any:
        """Per-image work shared by all its objects (e.g. the pointmap). ``image``: (H, W, 3) uint8 RGB."""

    @abstractmethod
    def reconstruct(self, context: Any, mask: np.ndarray, seed: int) -> ObjectReconstruction:
        """Reconstruct the object under ``mask`` ((H, W) bool, input resolution) with a fixed ``seed``."""

    def reconstruct_many(
        self,
        context: Any,
        masks: Sequence[np.ndarray],
        seeds: Sequence[int],
        on_done: Callable[[int, ObjectReconstruction], None] | None = None,
    ) -> list[ObjectReconstruction]:
        """All objects of one image (``masks[i]`` with ``seeds[i]``), in order; ``on_done(i, rec)`` per object.

        The default runs :meth:`reconstruct` one object at a time; a backend that batches objects overrides it
        and must give each object the result it would get alone (same seed → same object).
        """
        results = []
        for i, (mask, seed) in enumerate(zip(masks, seeds, strict=True)):
            rec = self.reconstruct(context, mask, seed)
            if on_done is not None:
                on_done(i, rec)
            results.append(rec)
        return results
