"""The config of the two throw-away stage venvs (light specs in tests/envs) that run the backend doubles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["doubles_venv_config"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def doubles_venv_config(root: Path) -> dict[str, Any]:
    """Config dict: envs ``seg-test``/``rec-test`` as venvs under ``root``, the doubles as backends, outputs and
    engine state under ``root``. Build the venvs with ``python -m pipeline envs create seg-test rec-test``."""
    return {
        "envs": {
            "seg-test": {"kind": "venv", "prefix": str(root / "seg"), "spec": str(PROJECT_ROOT / "tests/envs/light-segment.yml")},
            "rec-test": {"kind": "venv", "prefix": str(root / "rec"), "spec": str(PROJECT_ROOT / "tests/envs/light-reconstruct.yml")},
        },
        "segment": {"env": "seg-test", "backend": "tests.doubles.segmenters:ColorBlobSegmenterDouble"},
        "reconstruct": {"env": "rec-test", "backend": "tests.doubles.reconstructors:CubeReconstructorDouble"},
        "run": {"out_root": str(root / "outputs")},
        "engine": {"state_dir": str(root / "state")},
    }
