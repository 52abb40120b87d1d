"""SAM3 with CUDA graphs (``segment.sam3.cuda_graphs``) vs op by op vs upstream: equivalence and warm latency.

Random weights (the gated checkpoint is not needed); run on a CUDA machine with sam3 installed::

    python benchmarks/bench_sam3_graphs.py --reps 20 --markdown $OUT/graphs.md --json $OUT/graphs.json

One process, one model, both paths (the graphed one is the backend's default; ``eager`` runs the same calls op
by op on the same features):

1. **Equivalence** per image size and phrase count (1, 2, 3, 5, 7, 16; 7 is padded to the bucket of 8): backbone features (max |Δ|), scores of all
   200 queries per phrase (max |Δ|) and IoU of the 288×288 masks of each phrase's 10 best queries, graphed vs
   eager; and the same eager pass run twice (the noise floor of the machine). Bounds: |Δ score| ≤ 2e-3,
   IoU ≥ 0.99.
2. **Warm latency** (median of ``--reps``) of ``set_image`` + ``predict`` for those phrase counts × 4 image
   sizes, graphed vs eager, text cached; one image + one *new* phrase (text encoder included); upstream
   ``Sam3Processor`` (``set_image`` + one ``set_text_prompt`` per phrase) on the same images.
3. **Throughput**: ``--batch`` images × 5 phrases through ``set_image`` + ``predict``, images/s, both paths.
4. **Where the time goes** with graphs: backbone replay, grounding replay, host work (``_to_detections``), text
   encoder for a new phrase; capture time and peak GPU memory.

Exit status 1 when an equivalence bound is missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_sam3 import median_ms as synced_median_ms  # noqa: E402 - after the path
from pipeline.backends.sam3 import Sam3Segmenter  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402

SIZES = [(450, 300), (640, 480), (1024, 768), (1440, 1080)]
WORDS = ["person", "cat", "coffee cup", "red flag", "spoon", "horse", "car", "tree", "dog", "chair", "bottle",
         "window", "bird", "boat", "lamp", "book", "plant", "clock"]  # fmt: skip
COUNTS = [1, 2, 3, 5, 7, 16]  # 7: not a default bucket (padded to 8)
TOP_QUERIES = 10
SCORE_BOUND, IOU_BOUND = 2e-3, 0.99


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Seeded noise with three filled ellipses, ``size`` = (W, H)."""
    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        draw.ellipse([x, y, x + w // 3, y + h // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def raw(seg: Sam3Segmenter, phrases: list[str], *, eager: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scores (P, 200), masks (P, 200, 288, 288) bool) of one grounding pass on the current image."""
    out = seg.grounding_outputs(phrases, eager=eager)
    scores = out["pred_logits"].float().sigmoid().squeeze(-1) * out["presence_logit_dec"].float().sigmoid()
    return scores.cpu().numpy(), (out["pred_masks"] > 0).cpu().numpy()


def differences(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """(max |Δ score| over all queries, min IoU over each phrase's TOP_QUERIES best queries of ``a``)."""
    (s1, m1), (s2, m2) = a, b
    worst_iou = 1.0
    for p, row in enumerate(np.argsort(-s1, axis=1)[:, :TOP_QUERIES]):
        for q in row:
            union = np.logical_or(m1[p, q], m2[p, q]).sum()
            if union:
                worst_iou = min(worst_iou, float(np.logical_and(m1[p, q], m2[p, q]).sum() / union))
    return float(np.abs(s1 - s2).max()), worst_iou


def equivalence(seg: Sam3Segmenter, images: list[Image.Image]) -> list[dict[str, Any]]:
    """Graphed vs eager (and eager vs eager) per image and phrase count."""
    import torch

    rows = []
    for image in images:
        graphs = seg.graphs
        seg.graphs = None
        seg.set_image(image)  # eager backbone
        eager_features = seg._image["backbone_out"]["vision_features"].float().clone()
        seg.graphs = graphs
        seg.set_image(image)  # graphed backbone (static features)
        feat_diff = float((seg._image["backbone_out"]["vision_features"].float() - eager_features).abs().max())
        for n in COUNTS:
            phrases = WORDS[:n]
            eager = raw(seg, phrases, eager=True)
            again = raw(seg, phrases, eager=True)
            graphed = raw(seg, phrases, eager=False)
            score, iou = differences(eager, graphed)
            noise_score, noise_iou = differences(eager, again)
            rows.append({"size": f"{image.size[0]}×{image.size[1]}", "phrases": n, "features_max_abs": feat_diff,
                         "score_max_abs": score, "mask_iou_min": iou, "noise_score_max_abs": noise_score,
                         "noise_mask_iou_min": noise_iou})  # fmt: skip
        torch.cuda.synchronize()
    return rows


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median wall milliseconds of ``fn`` (GPU synchronised), after one warm-up call."""
    import torch

    fn()
    return synced_median_ms(fn, reps, torch.cuda.synchronize)


class Paths:
    """Switch the segmenter between its graphed and eager paths (same model, same text cache)."""

    def __init__(self, seg: Sam3Segmenter) -> None:
        self.seg, self.graphs = seg, seg.graphs

    def use(self, graphed: bool) -> Sam3Segmenter:
        self.seg.graphs = self.graphs if graphed else None
        return self.seg


def latency(seg: Sam3Segmenter, images: list[Image.Image], reps: int) -> list[dict[str, Any]]:
    """set_image + predict per image size and phrase count, graphed vs eager, text cached."""
    paths = Paths(seg)
    rows = []
    for image in images:
        for n in COUNTS:
            phrases = WORDS[:n]
            row: dict[str, Any] = {"size": f"{image.size[0]}×{image.size[1]}", "phrases": n}
            for name, graphed in (("graphs_ms", True), ("eager_ms", False)):
                s = paths.use(graphed)
                row[name] = median_ms(lambda: (s.set_image(image), s.predict(phrases)), reps)
            rows.append(row)
    paths.use(True)
    return rows


def new_phrase_latency(seg: Sam3Segmenter, image: Image.Image, reps: int) -> dict[str, float]:
    """One image + one phrase never seen before (the text encoder runs), graphed vs eager."""
    paths = Paths(seg)
    counter = iter(range(10**6))
    out = {}
    for name, graphed in (("graphs_ms", True), ("eager_ms", False)):
        s = paths.use(graphed)
        out[name] = median_ms(lambda: (s.set_image(image), s.predict([f"thing number {next(counter)}"])), reps)
    paths.use(True)
    return out


def upstream(seg: Sam3Segmenter, images: list[Image.Image], reps: int) -> list[dict[str, Any]]:
    """Upstream Sam3Processor: set_image + one set_text_prompt per phrase, on the same model."""
    from sam3.model.sam3_image_processor import Sam3Processor

    proc = Sam3Processor(seg.model, device=str(seg.device), confidence_threshold=seg.config.threshold)
    rows = []
    with seg._inference():
        for image in images:
            for n in (1, 5):
                phrases = WORDS[:n]

                def run() -> None:
                    state = proc.set_image(image)
                    for p in phrases:
                        proc.set_text_prompt(p, state)

                rows.append({"size": f"{image.size[0]}×{image.size[1]}", "phrases": n, "upstream_ms": median_ms(run, reps)})
    return rows


def throughput(seg: Sam3Segmenter, count: int) -> dict[str, float]:
    """Images/s for ``count`` images × 5 phrases (set_image + predict), graphed vs eager."""
    import torch

    paths = Paths(seg)
    images = [photo(SIZES[i % len(SIZES)], 1000 + i) for i in range(count)]
    out = {}
    for name, graphed in (("graphs_images_per_s", True), ("eager_images_per_s", False)):
        s = paths.use(graphed)
        s.set_image(images[0])
        s.predict(WORDS[:5])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for image in images:
            s.set_image(image)
            s.predict(WORDS[:5])
        torch.cuda.synchronize()
        out[name] = count / (time.perf_counter() - t0)
    paths.use(True)
    return out


def split(seg: Sam3Segmenter, image: Image.Image, reps: int) -> dict[str, float]:
    """Graphed path, one image (largest size) + 1 / 5 phrases: ms per part (GPU synchronised per part)."""
    out = {"image_prep_ms": median_ms(lambda: seg._pixels(image), reps),
           "backbone_set_image_ms": median_ms(lambda: seg.set_image(image), reps)}
    pixels = seg._pixels(image)
    out["backbone_replay_only_ms"] = median_ms(lambda: seg.graphs.set_image(pixels), reps)
    for n in (1, 5):
        phrases = WORDS[:n]
        out[f"grounding_replay_{n}_ms"] = median_ms(lambda: seg.grounding_outputs(phrases), reps)
        with seg._inference():
            ground = seg.grounding_outputs(phrases)
            out[f"host_to_detections_{n}_ms"] = median_ms(lambda: seg._to_detections(phrases, ground), reps)
    counter = iter(range(10**6))
    with seg._inference():
        out["text_encoder_new_phrase_ms"] = median_ms(lambda: seg._encode_texts([f"new phrase {next(counter)}"]), reps)
    return out


def gpu_profile(seg: Sam3Segmenter, image: Image.Image, passes: int = 5) -> dict[str, Any]:
    """GPU kernel time of the backbone and of a 5-phrase grounding pass, profiled op by op (so kernels are
    attributed): the sum of kernel times is the GPU work a graph replay cannot remove (ms per pass)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    paths = Paths(seg)
    s = paths.use(False)
    phrases = WORDS[:5]
    s.set_image(image)
    parts = {"backbone": lambda: s.set_image(image), "grounding_5": lambda: s.grounding_outputs(phrases, eager=True)}
    out: dict[str, Any] = {}
    for name, fn in parts.items():
        fn()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(passes):
                fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA")
                   and not e.key.startswith(("SAM3Image.", "bench.", "ProfilerStep"))]  # fmt: skip
        kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
        out[name] = {
            "kernel_ms": sum(e.self_device_time_total for e in kernels) / 1000 / passes,
            "kernels": sum(e.count for e in kernels) / passes,
            "top": [{"name": e.key[:90], "ms": e.self_device_time_total / 1000 / passes, "count": e.count / passes}
                    for e in kernels[:6]],
        }  # fmt: skip
    paths.use(True)
    return out


def equivalent(e: dict[str, Any]) -> bool:
    """Within the bounds, or no further from the op-by-op pass than that pass is from itself when run again."""
    return e["score_max_abs"] <= max(SCORE_BOUND, e["noise_score_max_abs"]) and e["mask_iou_min"] >= min(
        IOU_BOUND, e["noise_mask_iou_min"])


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# SAM3 CUDA graphs — {r['device']}, {r['date']}", "",
             f"torch {r['torch']}, Python {r['python']}; SAM3 random weights, bf16 autocast + TF32; threshold "
             f"{r['threshold']}; buckets {r['buckets']}; capture at worker start {r['capture_s']:.2f} s (build "
             f"{r['build_s']:.1f} s); GPU memory after build + capture {r['after_capture_gib'][0]:.2f} GiB allocated / "
             f"{r['after_capture_gib'][1]:.2f} GiB reserved; peak of the whole run (both paths, 16 phrases op by op "
             f"included) {r['peak_gib']:.2f} / {r['reserved_gib']:.2f} GiB. Medians of {r['reps']} warm calls. Images: seeded noise + ellipses.", ""]  # fmt: skip
    lines += ["## Equivalence: graphed vs op by op (and op by op run twice: the noise floor)", "",
              "| image | phrases | features max abs Δ | score max abs Δ | mask IoU min (top 10/phrase) | noise: score Δ / IoU |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for e in r["equivalence"]:
        lines.append(f"| {e['size']} | {e['phrases']} | {e['features_max_abs']:.2e} | {e['score_max_abs']:.2e} | "
                     f"{e['mask_iou_min']:.4f} | {e['noise_score_max_abs']:.2e} / {e['noise_mask_iou_min']:.4f} |")
    lines += ["", f"Bounds |Δ score| ≤ {SCORE_BOUND}, IoU ≥ {IOU_BOUND}, or no worse than the op-by-op pass against "
              f"itself: **{'met' if r['equivalence_ok'] else 'MISSED'}**.",
              "", "## Warm latency, set_image + predict (text cached), ms", "",
              "| image | phrases | graphs | op by op | speed-up | graphs per image+phrase | upstream Sam3Processor |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    up = {(u["size"], u["phrases"]): u["upstream_ms"] for u in r.get("upstream", [])}
    for row in r["latency"]:
        u = up.get((row["size"], row["phrases"]))
        lines.append(f"| {row['size']} | {row['phrases']} | {row['graphs_ms']:.1f} | {row['eager_ms']:.1f} | "
                     f"{row['eager_ms'] / row['graphs_ms']:.2f}× | {row['graphs_ms'] / row['phrases']:.1f} | "
                     f"{'—' if u is None else f'{u:.1f}'} |")
    n = r["new_phrase"]
    t = r["throughput"]
    lines += ["", f"One image (1440×1080) + one **new** phrase (text encoder included): graphs {n['graphs_ms']:.1f} ms, "
              f"op by op {n['eager_ms']:.1f} ms.", "",
              f"Throughput, {r['batch']} images × 5 phrases: graphs {t['graphs_images_per_s']:.1f} images/s, op by op "
              f"{t['eager_images_per_s']:.1f} images/s.", "", "## Where the time goes (graphs, 1440×1080)", "",
              "| part | ms |", "| --- | --- |"]  # fmt: skip
    lines += [f"| {k} | {v:.2f} |" for k, v in r["split"].items()]
    prof = r.get("profile")
    if prof and "backbone" in prof:
        lines += ["", "GPU kernel time (profiled op by op, 1440×1080; what a replay cannot remove), ms per pass:", "",
                  "| part | kernel time | kernels | top kernels (ms) |", "| --- | --- | --- | --- |"]
        for name, part in prof.items():
            top = "; ".join(f"`{k['name'][:48]}` {k['ms']:.2f}" for k in part["top"][:4])
            lines.append(f"| {name} | {part['kernel_ms']:.2f} | {part['kernels']:.0f} | {top} |")
    if r.get("errors"):
        lines += ["", "Errors:", *[f"- {e}" for e in r["errors"]]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--render", type=Path, help="only re-render a --json result as Markdown (no GPU)")
    args = parser.parse_args()
    if args.render:
        r = json.loads(args.render.read_text())
        r["equivalence_ok"] = bool(r.get("equivalence")) and all(equivalent(e) for e in r["equivalence"])
        text = markdown(r)
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        return 0
    import torch

    config = PipelineConfig.model_validate({"segment": {"device": "cuda:0", "threshold": args.threshold,
                                                        "sam3": {"random_weights": True, "cuda_graphs": True}}})  # fmt: skip
    seg = Sam3Segmenter(config.segment)
    assert seg.graphs is not None, "CUDA graphs were not captured"
    torch.cuda.synchronize()
    after_capture = (torch.cuda.memory_allocated() / 2**30, torch.cuda.memory_reserved() / 2**30)
    r: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                         "python": platform.python_version(), "date": date.today().isoformat(), "reps": args.reps,
                         "batch": args.batch, "threshold": args.threshold, "buckets": list(seg.graphs.buckets),
                         "capture_s": seg.timings["graph_capture_s"], "build_s": seg.timings["build_s"], "errors": [],
                         "after_capture_gib": after_capture}  # fmt: skip
    images = [photo(size, i) for i, size in enumerate(SIZES)]
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("equivalence", lambda: equivalence(seg, images)),
        ("latency", lambda: latency(seg, images, args.reps)),
        ("new_phrase", lambda: new_phrase_latency(seg, images[-1], args.reps)),
        ("throughput", lambda: throughput(seg, args.batch)),
        ("split", lambda: split(seg, images[-1], args.reps)),
        ("upstream", lambda: upstream(seg, images, max(3, args.reps // 4))),
        ("profile", lambda: gpu_profile(seg, images[-1])),
    ]
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            r[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; later steps still run
            import traceback

            traceback.print_exc()
            r["errors"].append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(r, indent=1, default=str))
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    r["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    eq = r.get("equivalence", [])
    r["equivalence_ok"] = bool(eq) and all(equivalent(e) for e in eq)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1, default=str))
    try:
        text = markdown(r)
    except KeyError as exc:  # a step failed: the JSON has what ran
        text = f"incomplete run (missing {exc}); see the JSON\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if r["equivalence_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
