"""GPU memory budget: refuse to start stages that share one GPU but cannot fit on it together.

Needs per stage, in GiB, from our measurements (benchmarks/results/): SAM3 peaks at about 8.2 GiB reserved,
SAM 3D Objects at about 29 GiB (32 with headroom, as upstream asks); the vLLM server reserves
``vlm.gpu_memory_utilization`` × the GPU's memory. Plug-in backends are not counted (their needs are unknown).
The default — everything on one 80 GB GPU with ``gpu_memory_utilization: 0.45`` — needs 36 + 8 + 32 = 76 GiB.
GPU sizes come from ``nvidia-smi``; without it (a CPU machine) there is nothing to check.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import PipelineConfig
from pipeline.driver.proc import capture_output, child_environment
from pipeline.errors import ConfigError

__all__ = ["STAGE_NEEDS_GIB", "Need", "gpu_index", "plan_needs", "check_gpu_budget", "gpu_totals_gib"]

STAGE_NEEDS_GIB = {"sam3": 8.0, "sam3d": 32.0}
HEADROOM_GIB = 1.0  # CUDA contexts and allocator slack per GPU


@dataclass(frozen=True)
class Need:
    """One consumer of a GPU: what (for the message), which GPU index, how many GiB, and the knob that sizes it."""

    what: str
    gpu: int
    gib: float
    knob: str


def gpu_index(device: str) -> int | None:
    """``auto``/``cuda`` → 0, ``cuda:N`` → N, ``cpu`` → None (indices as the child sees them)."""
    if device == "cpu":
        return None
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    return 0


def plan_needs(config: PipelineConfig, *, with_vlm: bool, gpu_totals: dict[int, float]) -> list[Need]:
    """What each GPU-using part of the pipeline will take, on which GPU."""
    needs: list[Need] = []
    for stage, label in (("segment", "SAM3"), ("reconstruct", "SAM 3D Objects")):
        section = config.stage(stage)
        gpu = gpu_index(section.device)
        if section.backend in STAGE_NEEDS_GIB and gpu is not None:
            needs.append(Need(label, gpu, STAGE_NEEDS_GIB[section.backend], f"{stage}.device"))
    if with_vlm and config.vlm.url is None:
        gpus = [int(g) for g in (config.vlm.gpus or "0").split(",") if g.strip().isdigit()] or [0]
        util = config.vlm.gpu_memory_utilization
        for gpu in gpus[: config.vlm.tensor_parallel_size]:
            total = gpu_totals.get(gpu, 0.0)
            needs.append(Need(f"vLLM ({util:g} × {total:.0f} GiB)", gpu, util * total, "vlm.gpu_memory_utilization"))
    return needs


def gpu_totals_gib() -> dict[int, float]:
    """Memory of each visible GPU in GiB, by index; empty when ``nvidia-smi`` is missing or fails."""
    try:
        code, out = capture_output(
            ["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
            env=child_environment(), timeout_s=20,
        )
    except OSError:
        return {}
    if code != 0:
        return {}
    totals: dict[int, float] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            totals[int(parts[0])] = float(parts[1]) / 1024.0
    return totals


def check_gpu_budget(config: PipelineConfig, *, with_vlm: bool, gpu_totals: dict[int, float] | None = None) -> None:
    """Raise ConfigError naming the GPU, the parts that share it and the knob to turn when they cannot fit."""
    totals = gpu_totals_gib() if gpu_totals is None else gpu_totals
    if not totals:
        return
    needs = plan_needs(config, with_vlm=with_vlm, gpu_totals=totals)
    for gpu in sorted({n.gpu for n in needs}):
        if gpu not in totals:
            raise ConfigError(
                f"GPU {gpu} is named by {', '.join(n.knob for n in needs if n.gpu == gpu)} but only GPUs "
                f"{', '.join(str(g) for g in sorted(totals))} are visible",
                hint="point the stage at a visible GPU (e.g. --set reconstruct.device=cuda:0)",
            )
        on_gpu = [n for n in needs if n.gpu == gpu]
        used = sum(n.gib for n in on_gpu) + HEADROOM_GIB
        if used <= totals[gpu]:
            continue
        parts = " + ".join(f"{n.what} {n.gib:.1f}" for n in on_gpu)
        raise ConfigError(
            f"GPU {gpu} has {totals[gpu]:.0f} GiB but {parts} (+ {HEADROOM_GIB:g} headroom) = {used:.1f} GiB",
            hint=_fix_hint(on_gpu, totals[gpu], sorted(totals)),
        )


def _fix_hint(on_gpu: list[Need], total: float, visible: list[int]) -> str:
    vlm = [n for n in on_gpu if n.knob == "vlm.gpu_memory_utilization"]
    others = sum(n.gib for n in on_gpu if n not in vlm) + HEADROOM_GIB
    hints = []
    if vlm and total > others:
        hints.append(f"--set vlm.gpu_memory_utilization={max(0.05, (total - others) / total - 0.005):.2f}")
    spare = [g for g in visible if g != on_gpu[0].gpu]
    if spare:
        stage = next((n.knob for n in on_gpu if n.knob.endswith(".device")), None)
        if stage:
            hints.append(f"--set {stage}=cuda:{spare[0]}")
        if vlm:
            hints.append(f"--set vlm.gpus={spare[0]}")
    hints.append("or run the stages separately (segment, then reconstruct)")
    return "; ".join(hints)
