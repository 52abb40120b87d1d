"""The demo backends on CPU: seconds per photo for the salient-object segmenter and the relief lifter, and the
whole ``python -m pipeline demo`` on one photo of each size (upload → masks → 3D → scene, through the web server).

Target (issue "The first ten minutes"): ≤ 2 s per 1 MP photo on 2 cores. Photos: the shipped coffee sample
(600×400) and the same photo enlarged to 1 MP (1224×816) and 12 MP (4032×3024), JPEG quality 92.

    python benchmarks/bench_demo.py --reps 5 [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_sam3d_batch import cpu_model  # noqa: E402 - after the path
from pipeline.backends.demo import DemoReliefReconstructor, DemoSalientSegmenter  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402

SIZES = {"0.24 MP (sample)": None, "1 MP": (1224, 816), "12 MP": (4032, 3024)}


def photos(folder: Path) -> dict[str, Path]:
    """The benchmark photos as JPEG files in ``folder``, by label."""
    sample = ROOT / "pipeline" / "samples" / "coffee.jpg"
    out = {}
    for label, size in SIZES.items():
        if size is None:
            out[label] = sample
            continue
        path = folder / f"coffee-{size[0]}x{size[1]}.jpg"
        Image.open(sample).resize(size, Image.Resampling.BICUBIC).save(path, quality=92)
        out[label] = path
    return out


def backend_seconds(path: Path, reps: int) -> tuple[float, float, int]:
    """Median seconds of (decode + segment, lift of every object) and the number of objects."""
    config = PipelineConfig()
    seg, rec = DemoSalientSegmenter(config.segment), DemoReliefReconstructor(config.reconstruct)
    seg_s, lift_s, objects = [], [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        image = Image.open(path).convert("RGB")
        seg.set_image(image)
        (found,) = seg.predict(["cup"])
        t1 = time.perf_counter()
        context = rec.prepare(np.asarray(image))
        for mask in found.masks:
            rec.reconstruct(context, mask, seed=0)
        lift_s.append(time.perf_counter() - t1)
        seg_s.append(t1 - t0)
        objects = len(found.masks)
    return statistics.median(seg_s), statistics.median(lift_s), objects


def demo_seconds(path: Path, folder: Path) -> float:
    """Wall seconds of ``python -m pipeline demo PHOTO`` (server start, upload, both stages, page check, stop)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "demo", str(path), "--prompt", "cup", "--port", "0", "--no-serve",
                    "--jobs-dir", str(folder / f"jobs-{path.stem}"), "--set", f"engine.state_dir={folder / 'state'}"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", type=Path, help="also write the table here, with the machine and date")
    args = parser.parse_args()
    rows = ["| photo | objects | segment (decode + saliency + masks) | lift (all objects) | per MP | `pipeline demo PHOTO` wall |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in photos(Path(tmp)).items():
            seg_s, lift_s, objects = backend_seconds(path, args.reps)
            megapixels = Image.open(path).width * Image.open(path).height / 1e6
            wall = demo_seconds(path, Path(tmp))
            rows.append(f"| {label} | {objects} | {seg_s * 1000:.0f} ms | {lift_s * 1000:.0f} ms | "
                        f"{(seg_s + lift_s) / megapixels:.2f} s | {wall:.1f} s |")
    head = (f"# Demo backends on CPU ({date.today().isoformat()})\n\nMachine: {cpu_model()}, "
            f"Python {platform.python_version()}; medians of {args.reps} repetitions (the demo command once, its wall "
            "includes the server's start and stop).\n\n")
    table = "\n".join(rows) + "\n"
    print(head + table)
    if args.markdown:
        args.markdown.write_text(head + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
