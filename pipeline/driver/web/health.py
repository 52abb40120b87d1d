"""GPU memory per device for ``GET /api/health`` (``nvidia-smi``; an empty list where there is none)."""

from __future__ import annotations

import shutil
from typing import Any

from pipeline.driver.proc import capture_output, child_environment

__all__ = ["gpu_memory"]

_QUERY = "index,name,memory.used,memory.total,utilization.gpu"


def gpu_memory() -> list[dict[str, Any]]:
    """One entry per GPU: ``index``, ``name``, ``memory_used_mib``, ``memory_total_mib``, ``utilization_pct``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    rc, out = capture_output([exe, f"--query-gpu={_QUERY}", "--format=csv,noheader,nounits"],
                             env=child_environment(), timeout_s=5.0)
    if rc != 0:
        return []
    gpus = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue
        try:
            gpus.append({"index": int(fields[0]), "name": fields[1], "memory_used_mib": int(fields[2]),
                         "memory_total_mib": int(fields[3]), "utilization_pct": int(fields[4])})
        except ValueError:
            continue
    return gpus
