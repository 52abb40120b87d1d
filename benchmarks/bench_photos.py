"""Real photos through the real CLI: the driver's own cost per image, reruns, and a one-shot rerun of a 12 MP photo.

A deterministic photo set is generated (noisy, photo-like JPEGs of 0.2–1 MP and 12 MP, every third one with EXIF
orientation 6, and a few PNGs among the small ones; red boxes and a blue disc, which the colour-blob double finds),
then for each size class::

    batch of N photos, batch of 2N (fresh roots)       → driver overhead per image (marginal, see below), images/s
    the same two batches again (every stage skips)     → rerun seconds per image (marginal and whole)
    `run` on one unchanged 12 MP photo, up to date     → wall seconds (median of 3), driver start included

Driver overhead per image = ((busy_2N − busy_N) − (job_2N − job_N)) / N, where ``busy`` is a batch's wall minus
its worker start (model build and CUDA graph capture, as the worker reports it in ``timings.load_s``: it varies
by seconds from one start to the next) and ``job`` is the slowest stage's Σ of the worker's own time per job
(``timings.job_s`` in each run.json): the lanes overlap, so the slowest one bounds the wall, and the remaining
fixed costs (driver start) cancel out. The steady images/s is N / (busy_2N − busy_N).

``--project DIR`` times another checkout's CLI (e.g. ``git worktree add /tmp/before <commit>``) with the same
photos, envs and flags: the before/after rows of one machine.

CPU, the test doubles in two venvs::

    python benchmarks/bench_photos.py --test-doubles --work /tmp/bench-photos --count 8 --markdown out.md

GPU (SAM3 with random weights and CUDA graphs, the cube double for 3D; env kind ``current``)::

    python benchmarks/bench_photos.py --config benchmarks/photos-gpu.yaml --work /tmp/bp --count 40 \\
        --prompt "person,cat,coffee cup,red flag,spoon"
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

import numpy as np
from PIL import Image, ImageDraw

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from benchmarks.bench_engine import BatchTiming, image_set, read_batch, test_doubles_config  # noqa: E402

SMALL = [((640, 480), "jpg", 1), ((800, 600), "jpg", 6), ((1024, 768), "png", 1), ((1152, 864), "jpg", 1),
         ((480, 360), "jpg", 6), ((1152, 864), "png", 1), ((1024, 768), "jpg", 1), ((800, 600), "jpg", 6)]
LARGE = [((4032, 3024), "jpg", 1), ((4032, 3024), "jpg", 6), ((4032, 3024), "jpg", 1), ((4032, 3024), "jpg", 6)]


@dataclass
class SetTiming:
    """One size class: its batches of N and 2N, their reruns, and the one-shot rerun walls."""

    name: str
    small: BatchTiming
    large: BatchTiming
    rerun_small_s: float
    rerun_large_s: float
    oneshot_rerun_s: list[float]
    oneshot_first: "OneShot"  # the one-shot `run` that did the work


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like image: smooth colour gradients plus sensor-like noise, two red boxes and a blue disc."""
    rng = np.random.default_rng(seed)
    w, h = size
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    base = np.stack([90 + 60 * np.sin(6 * xs + 2 * ys + k + seed) * np.cos(4 * ys - k) for k in range(3)], axis=-1)
    base = base + rng.normal(0, 9, (h, w, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    s = w / 320
    jitter = (seed % 7) * s
    draw.rectangle([20 * s + jitter, 20 * s, 110 * s, 120 * s], fill=(255, 0, 0))
    draw.rectangle([170 * s, 60 * s + jitter, 280 * s, 200 * s * h / w * 4 / 3], fill=(255, 0, 0))
    draw.ellipse([120 * s, 150 * s * h / w * 4 / 3, 170 * s, 220 * s * h / w * 4 / 3], fill=(0, 0, 255))
    return image


def write_photos(folder: Path, specs: list[tuple[tuple[int, int], str, int]]) -> list[Path]:
    """The photos of ``specs`` (size, format, EXIF orientation), generated once (deterministic)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (size, fmt, orientation) in enumerate(specs):
        path = folder / f"photo{i:02d}-{size[0]}x{size[1]}-o{orientation}.{fmt}"
        if not path.exists():
            image = photo(size, i)
            if fmt == "png":
                image.save(path, compress_level=6)
            else:
                exif = Image.Exif()
                if orientation != 1:
                    exif[0x0112] = orientation
                image.save(path, quality=90, exif=exif.tobytes())
        paths.append(path)
    return paths


def cli(project: Path, *args: str, timeout: float = 3600) -> float:
    """Run ``python -m pipeline ARGS`` in ``project``; its wall seconds. Raises on exit codes other than 0/1."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"`pipeline {' '.join(args[:2])}` in {project} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall


def batch(project: Path, config: Path, folder: Path, root: Path, prompt: str, stages: str) -> BatchTiming:
    """One ``batch`` call over ``folder`` into ``root`` (kept: a second call over it is the rerun)."""
    count = sum(1 for p in folder.iterdir() if p.is_file())
    wall = cli(project, "batch", "--config", str(config), "--images", str(folder), "--prompt", prompt, "--out",
               str(root), "--stages", stages)
    return read_batch(root, count, wall)


def measure_set(name: str, project: Path, config: Path, photos: list[Path], work: Path, count: int, prompt: str,
                stages: str) -> SetTiming:
    """Batches of ``count`` and 2 × ``count`` photos of one size class, their reruns, and one-shot reruns."""
    sets = {n: image_set(work / f"{name}-set{n}", photos, n) for n in (count, 2 * count)}
    roots = {n: work / f"{name}-out{n}" for n in sets}
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)
    batch(project, config, sets[count], work / f"{name}-warmup", prompt, stages)  # page cache, bytecode
    small = batch(project, config, sets[count], roots[count], prompt, stages)
    large = batch(project, config, sets[2 * count], roots[2 * count], prompt, stages)
    rerun_small = batch(project, config, sets[count], roots[count], prompt, stages).wall_s
    rerun_large = batch(project, config, sets[2 * count], roots[2 * count], prompt, stages).wall_s
    out = work / f"{name}-oneshot"
    shutil.rmtree(out, ignore_errors=True)
    command = "run" if "reconstruct" in stages else "segment"
    args = [command, "--config", str(config), "--image", str(photos[0]), "--prompt", prompt, "--out", str(out)]
    first_wall = cli(project, *args)  # the first call does the work; the timed ones find everything up to date
    first = read_oneshot(out, first_wall)
    oneshot = [cli(project, *args) for _ in range(3)]
    return SetTiming(name, small, large, rerun_small, rerun_large, oneshot, first)


@dataclass
class OneShot:
    """A one-shot ``run`` that did the work: its wall and each stage worker's start (spawn → ready) and load."""

    wall_s: float
    start_s: dict[str, float]
    load_s: dict[str, float]


def read_oneshot(run_dir: Path, wall_s: float) -> OneShot:
    """The worker start and load seconds each stage recorded in ``run_dir``'s run.json."""
    record = json.loads((run_dir / "run.json").read_text())
    starts, loads = {}, {}
    for stage, rec in record.get("stages", {}).items():
        timings = rec.get("timings", {})
        starts[stage] = float(timings.get("start_s", timings.get("load_s", 0.0)))  # older code: load_s only
        loads[stage] = float(timings.get("load_s", 0.0))
    return OneShot(wall_s, starts, loads)


def rows(t: SetTiming, label: str) -> list[str]:
    """Table rows for one size class."""
    n_small, n_large = t.small.images, t.large.images
    slowest = max(t.large.job_s, key=lambda s: t.large.job_s[s])
    job_small, job_large = t.small.job_s[slowest], t.large.job_s[slowest]
    # each batch's worker starts (model build, CUDA graph capture) vary by seconds: take them out of its wall
    busy_small = t.small.wall_s - max(t.small.load_s.values())
    busy_large = t.large.wall_s - max(t.large.load_s.values())
    marginal = (busy_large - busy_small) / (n_large - n_small)
    overhead = marginal - (job_large - job_small) / (n_large - n_small)
    whole = (busy_large - job_large) / n_large  # driver start and the last image's other stage included
    rerun_marginal = (t.rerun_large_s - t.rerun_small_s) / (n_large - n_small)
    first = t.oneshot_first
    return [
        f"| {label} | {t.name} | driver overhead per image: marginal ({n_small}→{n_large}) wall − {slowest} job, "
        f"worker starts taken out | {overhead * 1000:.1f} ms |",
        f"| {label} | {t.name} | driver overhead per image: batch of {n_large}, (wall − worker start − Σ {slowest} "
        f"job) / {n_large} | {whole * 1000:.1f} ms |",
        f"| {label} | {t.name} | images/s: batch of {n_large} whole (worker start included); steady (marginal, "
        f"starts taken out) | {n_large / t.large.wall_s:.2f}; {1 / marginal:.2f} |",
        f"| {label} | {t.name} | batch of {n_large}: {slowest} job per image (worker's own time); worker start | "
        f"{job_large / n_large * 1000:.1f} ms; {max(t.large.load_s.values()):.2f} s |",
        f"| {label} | {t.name} | rerun, all up to date: per image (marginal {n_small}→{n_large}); whole batch of "
        f"{n_large} | {rerun_marginal * 1000:.1f} ms; {t.rerun_large_s:.2f} s |",
        f"| {label} | {t.name} | `run` on one unchanged photo, all up to date: wall (median of 3) | "
        f"{statistics.median(t.oneshot_rerun_s):.2f} s |",
        f"| {label} | {t.name} | `run` on a new photo (one-shot): wall; slowest worker start, spawn → ready "
        f"(model build {max(first.load_s.values()):.2f} s of it); wall − that start | {first.wall_s:.2f} s; "
        f"{max(first.start_s.values()):.2f} s; {first.wall_s - max(first.start_s.values()):.2f} s |",
        f"| {label} | {t.name} | failed stage runs | {t.small.failed + t.large.failed} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="pipeline config naming the backends and envs")
    source.add_argument("--test-doubles", action="store_true", help="build the CPU test venvs and use the doubles")
    parser.add_argument("--project", type=Path, action="append", default=[],
                        help="checkout whose CLI to time (repeatable; default: this one); rows are labelled by its commit")
    parser.add_argument("--prompt", default="red,blue", help="phrases, comma-separated (default: red,blue)")
    parser.add_argument("--stages", default="segment,reconstruct", help="stages to run (default both)")
    parser.add_argument("--count", type=int, default=8, help="N: batches of N and 2N photos per size class")
    parser.add_argument("--sets", default="small,12mp", help="size classes: small (0.2–1 MP), 12mp (default both)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (envs, photos, run dirs)")
    parser.add_argument("--markdown", type=Path, help="also write the table here, with machine and date")
    args = parser.parse_args()

    work = args.work.resolve()
    config = test_doubles_config(work) if args.test_doubles else args.config.resolve()
    photos = {"small": write_photos(work / "photos-small", SMALL), "12mp": write_photos(work / "photos-12mp", LARGE)}
    projects = [p.resolve() for p in args.project] or [PROJECT_ROOT]
    lines = ["| code | photos | measure | value |", "| --- | --- | --- | --- |"]
    for project in projects:
        label = project.name  # a plain copy of a tree (e.g. `git archive` output) is named by its folder
        if (project / ".git").exists():
            label = subprocess.run(["git", "-C", str(project), "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(project), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True).stdout.strip()
            label += "+changes" if dirty else ""
        for name in args.sets.split(","):
            timing = measure_set(name, project, config, photos[name], work / label, args.count, args.prompt, args.stages)
            lines.extend(rows(timing, label))
            print("\n".join(lines[-8:]), flush=True)
    header = (f"Machine: {platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), Python "
              f"{platform.python_version()}, {date.today().isoformat()}; stages {args.stages}; phrases {args.prompt!r}; "
              f"{'CPU test doubles in two venvs' if args.test_doubles else args.config}; N = {args.count}.")
    text = f"{header}\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
