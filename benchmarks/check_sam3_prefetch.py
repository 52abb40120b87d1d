"""GPU check of SAM3's batched backbone (``Sam3Segmenter.prefetch``): same outputs as one image at a time, and
the time it saves. Random weights (the gated checkpoint is not needed); run on a CUDA machine with sam3 installed:

    python benchmarks/check_sam3_prefetch.py --images 8 --markdown $OUT/prefetch.md

For each of ``--images`` synthetic photos of mixed sizes (noise + shapes, 300×450 to 1440×1080) and 5 phrases it
compares the raw grounding outputs of the prefetched path with the one-image path: scores of all 200 queries per
phrase (max |Δ|) and, for each phrase's 10 best queries, the IoU of their 288×288 masks. Then it times the
backbone for the whole set one image at a time vs batched (median of ``--reps``). Exit 1 if the equivalence
bounds (|Δ score| ≤ 2e-3, IoU ≥ 0.99) are not met.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backends.sam3 import Sam3Segmenter  # noqa: E402 - after the path
from pipeline.config import PipelineConfig  # noqa: E402

from bench_sam3_graphs import median_ms, raw  # noqa: E402 - benchmarks/ is on the path when run as a script

PHRASES = ["person", "cat", "coffee cup", "red flag", "spoon"]
TOP_QUERIES = 10  # masks compared per phrase: the best-scoring queries of the one-image path
SIZES = [(450, 300), (640, 480), (1024, 768), (1440, 1080)]


def photos(count: int) -> list[Image.Image]:
    """``count`` distinct RGB images: seeded noise with a few filled shapes, sizes cycling through SIZES."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            draw.ellipse([x, y, x + w // 3, y + h // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        out.append(image)
    return out


def compare(seg: Sam3Segmenter, images: list[Image.Image]) -> tuple[float, float, int]:
    """(max |Δ score|, min mask IoU over each phrase's best queries, masks compared)."""
    single = []
    for image in images:
        seg.set_image(image)
        single.append(raw(seg, PHRASES, eager=False))
    seg.prefetch(images)
    worst_score, worst_iou, compared = 0.0, 1.0, 0
    for image, (s1, m1) in zip(images, single):
        seg.set_image(image.copy())  # a different object with the same pixels, as the worker re-reads the file
        s2, m2 = raw(seg, PHRASES, eager=False)
        worst_score = max(worst_score, float(np.abs(s1 - s2).max()))
        top = np.argsort(-s1, axis=1)[:, :TOP_QUERIES]  # random weights score low: compare each phrase's best
        for p, q in [(p, q) for p in range(len(PHRASES)) for q in top[p]]:
            union = np.logical_or(m1[p, q], m2[p, q]).sum()
            if union:
                worst_iou = min(worst_iou, float(np.logical_and(m1[p, q], m2[p, q]).sum() / union))
                compared += 1
    assert not seg._prefetched, "every prefetched image must have been taken by set_image"
    return worst_score, worst_iou, compared


def time_backbone(seg: Sam3Segmenter, images: list[Image.Image], reps: int) -> tuple[float, float]:
    """Median seconds for the backbone over all ``images``: one at a time, and through prefetch (each timed
    after one warm-up call: cuDNN/cuBLAS choices for this batch size)."""

    def one_by_one() -> None:
        seg._prefetched = {}
        for image in images:
            seg.set_image(image)

    def batched() -> None:
        seg.prefetch(images)
        for image in images:
            seg.set_image(image)

    return median_ms(one_by_one, reps) / 1000, median_ms(batched, reps) / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    config = PipelineConfig.model_validate({"segment": {"device": "cuda:0", "sam3": {"random_weights": True,
                                                                                "prefetch_batch": 8}}})
    seg = Sam3Segmenter(config.segment)
    images = photos(args.images)
    rows = ["| measure | value |", "| --- | --- |"]
    ok = True
    for n in sorted({min(4, args.images), args.images}):
        worst_score, worst_iou, compared = compare(seg, images[:n])
        ok &= worst_score <= 2e-3 and worst_iou >= 0.99
        rows.append(f"| {n} images × {len(PHRASES)} phrases: max abs Δ score (all 200 queries), min IoU "
                    f"({compared} best queries) | {worst_score:.2e}, {worst_iou:.4f} |")
        single, batched = time_backbone(seg, images[:n], args.reps)
        rows.append(f"| {n} images: backbone one at a time vs prefetch, ms/image (median of {args.reps}) | "
                    f"{single / n * 1000:.1f} vs {batched / n * 1000:.1f} ({single / batched:.2f}×) |")
    import torch

    header = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, Python {platform.python_version()}, "
              f"{date.today().isoformat()}; SAM3 random weights, bf16; images {SIZES} cycled.")
    text = header + "\n\n" + "\n".join(rows) + f"\n\nequivalence bounds met: {ok}\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
