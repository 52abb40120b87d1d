"""Drive the real reconstruct stage worker (batched path) on a fresh 4-object run dir; prints a JSON summary.

Usage on the lent GPU machine (after device_batch.sh's environment setup): python3 stage_batch_run.py RUN_DIR
[PRESET] [N_OBJECTS]. Random weights, checkpoint configs from .device-sam3d/checkpoints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sam3d import stage_run  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402

__all__: list[str] = []

run_dir, preset, n = Path(sys.argv[1]), (sys.argv[2:3] or ["fast"])[0], int((sys.argv[3:4] or ["4"])[0])
config = PipelineConfig.model_validate({
    "envs": {"sam3d-objects": {"kind": "current"}},
    "reconstruct": {"device": "cuda", "preview": True, "sam3d": {
        "checkpoint_dir": str(ROOT / ".device-sam3d" / "checkpoints"), "random_weights": True,
        "preset": preset, "max_batch_objects": n}},
})  # fmt: skip
print(json.dumps(stage_run(config, run_dir, n), indent=1))
