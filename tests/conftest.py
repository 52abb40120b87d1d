"""Shared fixtures: synthetic images and a CLI runner that uses the real entry point in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from tests.doubles.venvs import doubles_venv_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python -m pipeline ARGS`` from the project root, like a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def processes_matching(*needles: str) -> list[int]:
    """PIDs of live processes whose command line contains every one of ``needles``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmdline and all(n in cmdline for n in needles):
                pids.append(int(entry.name))
    return pids


def draw_scene(path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    """Two red boxes and a blue disc on grey: the colour-blob segmenter double finds 3 objects."""
    image = Image.new("RGB", size, (40, 40, 40))
    draw = ImageDraw.Draw(image)
    draw.rectangle([5, 5, 25, 30], fill=(255, 0, 0))
    draw.rectangle([50, 20, 80, 50], fill=(255, 0, 0))
    draw.ellipse([30, 35, 45, 60], fill=(0, 0, 255))
    image.save(path)
    return path


@pytest.fixture
def scene_image(tmp_path: Path) -> Path:
    return draw_scene(tmp_path / "scene.png")


@pytest.fixture(scope="session")
def venv_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config with two venv envs (segment, reconstruct) built by `envs create`, once per test session."""
    root = tmp_path_factory.mktemp("envs")
    config = doubles_venv_config(root)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("envs", "create", "seg-test", "rec-test", "--config", str(path), timeout=900)
    assert result.returncode == 0, result.stderr + result.stdout
    for name in ("seg", "rec"):
        stamp = json.loads((root / name / ".pipeline-env.json").read_text())
        assert stamp["spec_sha256"]
    return path
