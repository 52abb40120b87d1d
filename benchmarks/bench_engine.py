"""Warm engine vs one-shot runs: per-image wall time and the engine's own overhead, through the real CLI.

Measures, with whatever backends the config names (the CPU test doubles in two venvs, or the real models on a GPU):

1. a loop of one-shot CLI calls (``python -m pipeline segment|run --image I ...``), one process tree per image:
   every call pays the driver start, the worker start and the model load;
2. ``python -m pipeline batch`` over N images, then over 2N images (fresh roots): one warm worker per stage.

Reported: median one-shot seconds per image, batch seconds per image, their ratio, and the **orchestration
overhead per image** = the marginal batch wall per extra image minus the marginal worker compute per extra image::

    overhead = ((wall_2N - wall_N) - (job_2N - job_N)) / N

where ``job`` is, for the slowest stage, the sum over runs of the worker's own time per job (``timings.job_s`` in
run.json): the stages run in overlapping lanes, so the slowest one bounds the wall. The fixed costs (driver start,
worker start, model load) cancel out. With two stages the table also gives the batch wall against the sum of both
stages' job times and loads (wall < sum shows the overlap).

CPU, test doubles, two real venvs (what CI-sized means here)::

    python benchmarks/bench_engine.py --test-doubles --work /tmp/bench-engine --batch 20 --oneshot 20

GPU (real backends, env kind ``current`` or the stage envs in the config)::

    python benchmarks/bench_engine.py --config gpu.yaml --images photos/ --prompt "horse,person,car,dog,tree" \\
        --stages segment --batch 50 --oneshot 5 --work /tmp/bench-engine --markdown $OUT/engine.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from tests.doubles.venvs import doubles_venv_config  # noqa: E402 - the project root goes on the path first
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class BatchTiming:
    """One ``batch`` call: ``images`` runs, its wall seconds and the seconds read back from the run dirs."""

    images: int
    wall_s: float
    job_s: dict[str, float]  # stage → sum over runs of the worker's own time per job
    load_s: dict[str, float]  # stage → worker start + model load (once per warm worker)
    failed: int


def cli(*args: str, timeout: float = 3600) -> float:
    """Run ``python -m pipeline ARGS`` from the project root; its wall seconds. Raises on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"`pipeline {' '.join(args[:2])}` exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall


def test_doubles_config(work: Path) -> Path:
    """Build the two CPU test venvs (tests/envs) under ``work`` once; the config that uses them."""
    config = doubles_venv_config(work / "envs")
    path = work / "config.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    cli("envs", "create", "seg-test", "rec-test", "--config", str(path))
    return path


def synthetic_images(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> list[Path]:
    """``count`` distinct PNGs of ``size`` (width, height): red boxes and a blue disc on grey, placed in
    proportion to the size (the colour-blob double finds each)."""
    folder.mkdir(parents=True, exist_ok=True)
    sx, sy = size[0] / 320, size[1] / 240
    paths = []
    for i in range(count):
        image = Image.new("RGB", size, (40, 40, 40))
        draw = ImageDraw.Draw(image)
        for box, shape in (([10 + i % 17, 10, 90, 100], draw.rectangle), ([150, 60 + i % 13, 250, 180], draw.rectangle)):
            shape([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], fill=(255, 0, 0))
        draw.ellipse([100 * sx, 130 * sy, 160 * sx, (200 + i % 11) * sy], fill=(0, 0, 255))
        paths.append(folder / f"img{i:03d}.png")
        image.save(paths[-1])
    return paths


def image_set(folder: Path, images: list[Path], count: int) -> Path:
    """A folder with the first ``count`` images (cycled when there are fewer), as links; named for the batch."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = images[i % len(images)]
        dest = folder / f"{i:03d}-{src.name}"
        if not dest.exists():
            if i < len(images):
                dest.symlink_to(src.resolve())
            else:
                shutil.copyfile(src, dest)  # a copy is a new image (its own run dir), not the same one again
    return folder


def read_batch(root: Path, images: int, wall_s: float) -> BatchTiming:
    """Sum the per-stage job and load seconds recorded in each run's run.json under ``root``."""
    job: dict[str, float] = {}
    load: dict[str, float] = {}
    failed = 0
    for run_json in root.glob("*/run.json"):
        record = json.loads(run_json.read_text())
        for stage, rec in record.get("stages", {}).items():
            timings = rec.get("timings", {})
            job[stage] = job.get(stage, 0.0) + float(timings.get("job_s", 0.0))
            load[stage] = load.get(stage, 0.0) + float(timings.get("load_s", 0.0))
            failed += rec.get("status") == "failed"
    return BatchTiming(images, wall_s, job, load, failed)


def run_batch(config: Path, folder: Path, root: Path, phrases: str, stages: str) -> BatchTiming:
    """One ``batch`` call over ``folder`` into a fresh ``root``."""
    shutil.rmtree(root, ignore_errors=True)
    count = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    wall = cli("batch", "--config", str(config), "--images", str(folder), "--prompt", phrases, "--out", str(root),
               "--stages", stages)
    return read_batch(root, count, wall)


def run_oneshots(config: Path, images: list[Path], work: Path, phrases: str, stages: str) -> list[float]:
    """Wall seconds of one one-shot CLI call per image (fresh run dirs)."""
    command = "segment" if stages == "segment" else "run"
    walls = []
    for i, image in enumerate(images):
        out = work / f"oneshot/{i:03d}"
        shutil.rmtree(out, ignore_errors=True)
        walls.append(cli(command, "--config", str(config), "--image", str(image), "--prompt", phrases,
                         "--out", str(out)))
    return walls


def table(oneshot: list[float], small: BatchTiming, large: BatchTiming, stages: list[str]) -> str:
    """The results as a markdown table plus the derived numbers."""
    one = statistics.median(oneshot)
    per_image = large.wall_s / large.images
    job_small, job_large = max(small.job_s.values()), max(large.job_s.values())  # the slowest lane bounds the wall
    marginal = (large.wall_s - small.wall_s) / (large.images - small.images)
    overhead = marginal - (job_large - job_small) / (large.images - small.images)
    rows = [
        "| measure | value |",
        "| --- | --- |",
        f"| one-shot CLI, median s/image ({len(oneshot)} calls; min {min(oneshot):.3f}, max {max(oneshot):.3f}) | {one:.3f} |",
        f"| batch of {small.images}: wall s (s/image) | {small.wall_s:.2f} ({small.wall_s / small.images:.3f}) |",
        f"| batch of {large.images}: wall s (s/image) | {large.wall_s:.2f} ({per_image:.3f}) |",
        f"| batch of {large.images}: images/s | {large.images / large.wall_s:.2f} |",
        f"| speed-up per image, one-shot median / batch of {large.images} | {one / per_image:.1f}× |",
        f"| batch, marginal s/image ({small.images}→{large.images} images: fixed start and load cancel out) | "
        f"{marginal:.3f} ({1 / marginal:.1f} images/s) |",
        f"| speed-up per image, one-shot median / batch marginal | {one / marginal:.0f}× |",
    ]
    for stage in stages:
        rows.append(f"| batch of {large.images}, {stage}: Σ job s, model load s (as the worker reports it) | {large.job_s.get(stage, 0):.2f}, "
                    f"{large.load_s.get(stage, 0):.2f} |")
    rows.append(f"| orchestration overhead per image (marginal wall − marginal job of the slowest stage, "
                f"{small.images}→{large.images}) "
                f"| {overhead * 1000:.1f} ms |")
    if len(stages) > 1:
        serial = sum(large.job_s.values()) + sum(large.load_s.values())
        rows.append(f"| batch of {large.images}: wall vs Σ stages' job + load (overlap) | {large.wall_s:.2f} s vs "
                    f"{serial:.2f} s ({serial / large.wall_s:.2f}×) |")
    rows.append(f"| failed stage runs (one-shot excluded) | {small.failed + large.failed} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="pipeline config naming the backends and envs")
    source.add_argument("--test-doubles", action="store_true", help="build the CPU test venvs and use the doubles")
    parser.add_argument("--images", type=Path, help="folder of photos (default: synthetic images)")
    parser.add_argument("--size", default="320x240", help="synthetic image size WxH (default 320x240)")
    parser.add_argument("--prompt", default="red,blue", help="phrases, comma-separated (default: red,blue)")
    parser.add_argument("--stages", default="segment", help="segment or segment,reconstruct (default: segment)")
    parser.add_argument("--batch", type=int, default=20, help="N: batches of N and 2N images (default 20)")
    parser.add_argument("--oneshot", type=int, default=5, help="one-shot calls to time (default 5)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (envs, images, run dirs)")
    parser.add_argument("--markdown", type=Path, help="also write the table here, with machine and date")
    args = parser.parse_args()

    work = args.work.resolve()
    config = test_doubles_config(work) if args.test_doubles else args.config.resolve()
    if args.images:
        photos = sorted(p.resolve() for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        width, height = (int(v) for v in args.size.lower().split("x"))
        photos = synthetic_images(work / "photos", 2 * args.batch, (width, height))
    if not photos:
        raise SystemExit(f"no images in {args.images}: give a folder of .jpg/.png files")
    stages = args.stages.split(",")
    small_set = image_set(work / f"set{args.batch}", photos, args.batch)
    large_set = image_set(work / f"set{2 * args.batch}", photos, 2 * args.batch)

    run_batch(config, small_set, work / "warmup", args.prompt, args.stages)  # page cache, bytecode: not measured
    oneshot = run_oneshots(config, photos[: args.oneshot], work, args.prompt, args.stages)
    small = run_batch(config, small_set, work / "batch-small", args.prompt, args.stages)
    large = run_batch(config, large_set, work / "batch-large", args.prompt, args.stages)

    header = (f"Machine: {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), Python "
              f"{platform.python_version()}, {date.today().isoformat()}; stages {args.stages}; phrases "
              f"{args.prompt!r}; {'CPU test doubles in two venvs' if args.test_doubles else args.config}; images "
              f"{args.images or 'synthetic ' + args.size}.")
    text = f"{header}\n\n{table(oneshot, small, large, stages)}\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
