"""Probe: can SAM3's remaining GPU time (after CUDA graphs) be cut without changing results? Random weights.

The graphed backbone and grounding passes run at their kernel time (benchmarks/results/sam3-graphs-h200-*.md);
about half of the backbone's kernels are memory-bound glue. Two candidate cuts, each recaptured as graphs and
compared with the default path on the same image and phrases:

1. ``bf16-linear``: keep the weight and bias of every ``nn.Linear`` that runs under autocast in bf16. Under bf16 autocast a linear layer casts
   its fp32 weight to bf16 on each call anyway (and capture needs autocast's weight-cast cache off), so the
   result is expected to be identical while the 400–600 cast kernels per pass go away (on the H200, 2026-11-30:
   identical graphed, but not on every image op by op; see benchmarks/results/sam3-graphs-h200-2026-11-30.md).
2. ``compiled-trunk`` (on top of 1): ``torch.compile`` (inductor, default mode) of the ViT trunk's blocks, then
   captured into the same graph, fusing norms, rotary embedding and residual adds.

Prints, per variant: backbone replay ms, grounding replay ms (1 and 5 phrases), max |Δ| of the backbone features,
max |Δ score| and min IoU of the 10 best masks per phrase vs the default path, and the extra start-up seconds::

    python benchmarks/probe_sam3_kernels.py --reps 20 --json $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_sam3_graphs import WORDS, differences, median_ms, photo, raw  # noqa: E402

from pipeline.backends.sam3 import Sam3Segmenter  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402


def measure(seg: Sam3Segmenter, image: Any, reps: int) -> dict[str, Any]:
    """Replay timings (ms) and the outputs to compare: features, and raw (scores, masks) for 1 and 5 phrases."""
    pixels = seg._pixels(image)
    seg.set_image(image)
    out: dict[str, Any] = {"backbone_ms": median_ms(lambda: seg.graphs.set_image(pixels), reps)}
    seg.set_image(image)
    features = seg._image["backbone_out"]["vision_features"].float().clone()
    for n in (1, 5):
        out[f"grounding_{n}_ms"] = median_ms(lambda: seg.grounding_outputs(WORDS[:n]), reps)
    results = {n: raw(seg, WORDS[:n], eager=False) for n in (1, 5)}
    return {"timings": out, "features": features, "results": results}


def compare(ref: dict[str, Any], new: dict[str, Any]) -> dict[str, float]:
    row = {"features_max_abs": float((ref["features"] - new["features"]).abs().max())}
    for n in (1, 5):
        score, iou = differences(ref["results"][n], new["results"][n])
        row[f"score_max_abs_{n}"], row[f"mask_iou_min_{n}"] = score, iou
    return row


def bf16_linears(model: Any) -> int:
    """Cast the parameters of every nn.Linear that runs under autocast to bf16 in place; returns how many layers.
    The DETR decoder's FFN (``forward_ffn``: ``linear1``/``linear2``) runs with autocast off, in fp32: kept."""
    import torch

    fp32 = {id(layer) for module in model.modules() if hasattr(module, "forward_ffn")
            for layer in (module.linear1, module.linear2)}  # fmt: skip
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in fp32:
            module.to(torch.bfloat16)
            count += 1
    return count


def compile_trunk(model: Any) -> int:
    """``torch.compile`` each block of the ViT trunk (same code for all blocks: compiled per distinct shape)."""
    import torch

    trunk = model.backbone.vision_backbone.trunk
    for block in trunk.blocks:
        block.forward = torch.compile(block.forward, dynamic=False)
    return len(trunk.blocks)


def recapture(seg: Sam3Segmenter) -> float:
    """Drop the segmenter's graphs and capture new ones for the model as it is now; returns seconds."""
    import torch

    seg.graphs = None
    seg._text_cache.clear()  # the text encoder's linears changed too
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    seg.graphs = seg._capture_graphs()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    config = PipelineConfig.model_validate({"segment": {"device": "cuda:0", "sam3": {"random_weights": True}}})
    seg = Sam3Segmenter(config.segment)
    image = photo((1440, 1080), 3)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "variants": {}}
    ref = measure(seg, image, args.reps)
    report["variants"]["default"] = {**ref["timings"], "capture_s": seg.timings["graph_capture_s"]}
    steps = [("bf16-linear", bf16_linears), ("compiled-trunk", compile_trunk)]
    for name, change in steps:
        try:
            changed = change(seg.model)
            capture_s = recapture(seg)
            new = measure(seg, image, args.reps)
            report["variants"][name] = {**new["timings"], "capture_s": capture_s, "changed": changed,
                                        **compare(ref, new)}  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a probe: report and stop
            import traceback

            traceback.print_exc()
            report["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            break
        finally:
            print(name, json.dumps(report["variants"][name], default=str), flush=True)
            if args.json:
                args.json.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
