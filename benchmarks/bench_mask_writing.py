"""Writing a run's mask PNGs (``pipeline.stages.segment.write_masks``): one after another vs on threads.

Host work after SAM3: each mask is an (H, W) bool array encoded as an 8-bit PNG, its sha256 taken, then the
manifest written. With a few objects per image this host time is of the order of the GPU time per image
(≈ 8 ms per 1440×1080 mask against ≈ 36 ms of GPU work for one image + one phrase on an H200), so it runs on
threads (Pillow releases the GIL while compressing).

Masks are filled ellipses (what real object masks compress like), sizes 640×480 and 1440×1080, 1 / 5 / 20 objects.

    python benchmarks/bench_mask_writing.py --reps 9 [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_sam3d_batch import cpu_model  # noqa: E402 - after the path
from pipeline.driver.sources import store_photo
from pipeline.stages.postprocess import Candidate, mask_bbox
from pipeline.stages.segment import MASK_WRITERS, write_masks

SIZES = ((640, 480), (1440, 1080))
COUNTS = (1, 5, 20)


def ellipse_masks(size: tuple[int, int], count: int, seed: int = 0) -> list[Candidate]:
    """``count`` candidates whose masks are random filled ellipses, (H, W) bool each."""
    rng = np.random.default_rng(seed)
    width, height = size
    out = []
    for i in range(count):
        canvas = Image.new("1", size, 0)
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        rx, ry = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        ImageDraw.Draw(canvas).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=1)
        mask = np.asarray(canvas, dtype=bool)
        out.append(Candidate(mask=mask, box_xyxy=mask_bbox(mask), score=0.9, phrases=[f"object {i}"]))
    return out


def median_ms(run_dir: Path, cands: list[Candidate], workers: int, reps: int) -> float:
    """Median wall milliseconds of ``write_masks`` (PNG encoding, sha256, rename, manifest) over ``reps`` calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        write_masks(run_dir, cands, fingerprint="bench", mode="prompt", backend="bench", workers=workers)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    threads = min(MASK_WRITERS, os.cpu_count() or 1)
    lines = [f"# Mask PNG writing — {cpu_model()}, "
             f"{date.today().isoformat()}", "",
             f"Python {platform.python_version()}, Pillow {Image.__version__}; medians of {args.reps} calls of "
             f"write_masks; threaded = {threads} thread(s).", "",
             "| image | masks | one after another, ms | threaded, ms | speed-up | ms per mask (one after another) |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            run_dir = Path(tmp) / f"{size[0]}x{size[1]}"
            run_dir.mkdir(parents=True)
            Image.new("RGB", size).save(run_dir / "photo.png")
            store_photo(run_dir, run_dir / "photo.png")
            for count in COUNTS:
                cands = ellipse_masks(size, count)
                serial = median_ms(run_dir, cands, 1, args.reps)
                threaded = median_ms(run_dir, cands, threads, args.reps)
                lines.append(f"| {size[0]}×{size[1]} | {count} | {serial:.1f} | {threaded:.1f} | "
                             f"{serial / threaded:.2f}× | {serial / count:.1f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
