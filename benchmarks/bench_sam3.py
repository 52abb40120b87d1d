"""Benchmark of the ``sam3`` segmentation backend and the real segment stage worker.

    python benchmarks/bench_sam3.py --device cuda --random-weights --out results/ [--reps 10]

Prints (and writes to ``--out``/bench_sam3.md + .json) a table of: model load time, warm per-image latency
for 1 and 5 phrases, images/s for a batch of 20, cold process per image vs warm worker per image (through
``python -m pipeline.stages.segment`` with jobs on stdin), peak GPU memory; then a breakdown: backbone,
text encoder, grounding (batched vs one pass per phrase vs upstream ``Sam3Processor.set_text_prompt``),
host post-processing, ``select_objects``; and a torch.profiler split of the grounding pass.

Images are real photos from scikit-image's data (astronaut, chelsea, coffee) plus the astronaut upscaled
to 1440×1080; phrases are fixed. With ``--random-weights`` the numbers are timings only: masks are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHRASES_5 = ["person", "cat", "coffee cup", "red flag", "spoon"]


def photos() -> dict[str, Any]:
    """name → RGB PIL image (real photos shipped by scikit-image)."""
    from PIL import Image
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    return {
        "astronaut_512x512": astronaut,
        "chelsea_451x300": Image.fromarray(data.chelsea()),
        "coffee_600x400": Image.fromarray(data.coffee()),
        "astronaut_1440x1080": astronaut.resize((1440, 1080)),
    }


def median_ms(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn`` in ms (device synchronised before and after each call)."""
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- in-process


def bench_in_process(args: argparse.Namespace, images: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    from pipeline.backends.sam3 import Sam3Segmenter
    from pipeline.config import Sam3Config, SegmentConfig
    from pipeline.stages.postprocess import select_objects

    t_import = time.perf_counter() - t0
    torch.manual_seed(0)
    cfg = SegmentConfig(device=args.device, threshold=args.threshold, sam3=Sam3Config(random_weights=args.random_weights))
    t1 = time.perf_counter()
    seg = Sam3Segmenter(cfg)
    t_build = time.perf_counter() - t1
    cuda = seg.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    r: dict[str, Any] = {"import_s": t_import, "build_s": t_build, "device": str(seg.device)}
    if cuda:
        r["gpu"] = torch.cuda.get_device_name(seg.device)
        torch.cuda.reset_peak_memory_stats(seg.device)
    r["torch"] = torch.__version__
    imgs = list(images.values())
    main = images["astronaut_1440x1080"]
    reps = args.reps

    def image_then(phrases: list[str], *, cached: bool) -> Callable[[], Any]:
        def run() -> Any:
            if not cached:
                seg._text_cache.clear()
            seg.set_image(main)
            return seg.predict(phrases)

        return run

    for _ in range(3):  # warm-up: cuDNN/cuBLAS heuristics, allocator, lazy caches
        image_then(PHRASES_5, cached=False)()
    r["warm_1_phrase_ms"] = median_ms(image_then(PHRASES_5[:1], cached=False), reps, sync)
    r["warm_5_phrases_ms"] = median_ms(image_then(PHRASES_5, cached=False), reps, sync)
    r["warm_1_phrase_cached_ms"] = median_ms(image_then(PHRASES_5[:1], cached=True), reps, sync)
    r["warm_5_phrases_cached_ms"] = median_ms(image_then(PHRASES_5, cached=True), reps, sync)

    # a batch of 20 images × 5 phrases, including select_objects, as the stage does it
    batch = [imgs[i % len(imgs)] for i in range(20)]
    seg._text_cache.clear()
    sync()
    t0 = time.perf_counter()
    n_obj = 0
    for img in batch:
        seg.set_image(img)
        dets = seg.predict(PHRASES_5)
        n_obj += len(select_objects(dets, threshold=cfg.threshold, min_area_px=cfg.min_area_px,
                                    dedup_iou=cfg.dedup_iou, max_objects=cfg.max_objects))
    sync()
    r["batch20_s"] = time.perf_counter() - t0
    r["batch20_images_per_s"] = 20 / r["batch20_s"]
    r["batch20_objects"] = n_obj

    # ---- breakdown on the 1440×1080 image
    seg.set_image(main)
    model = seg.model
    with seg._inference():
        r["backbone_ms"] = median_ms(lambda: seg.set_image(main), reps, sync)
        for n in (1, 5):
            r[f"text_{n}_ms"] = median_ms(lambda: model.backbone.forward_text(PHRASES_5[:n], device=seg.device), reps, sync)
    for n in (1, 5):
        phrases = PHRASES_5[:n]
        seg._encode_texts(phrases)  # cached: isolate grounding
        r[f"ground_batched_{n}_ms"] = median_ms(lambda: seg._ground(phrases), reps, sync)
    r["ground_sequential_5_ms"] = median_ms(lambda: [seg._ground([p]) for p in PHRASES_5], reps, sync)
    r["detections_5"] = [len(d.scores) for d in seg._ground(PHRASES_5)]

    # host post-processing (score, upsample, copy) alone: run grounding once, time _to_detections
    from sam3.model.data_misc import FindStage

    def raw_out(phrases: list[str]) -> dict[str, Any]:
        n = len(phrases)
        with seg._inference():
            text = seg._encode_texts(phrases)
            find = FindStage(img_ids=torch.zeros(n, dtype=torch.long, device=seg.device),
                             text_ids=torch.arange(n, dtype=torch.long, device=seg.device), input_boxes=None,
                             input_boxes_mask=None, input_boxes_label=None, input_points=None, input_points_mask=None)
            return model.forward_grounding(backbone_out={**seg._image["backbone_out"], **text}, find_input=find,
                                           find_target=None, geometric_prompt=model._get_dummy_prompt(num_prompts=n))

    out5 = raw_out(PHRASES_5)
    with seg._inference():
        r["to_detections_5_ms"] = median_ms(lambda: seg._to_detections(PHRASES_5, out5), reps, sync)
        dets = seg._to_detections(PHRASES_5, out5)
    r["select_objects_5_ms"] = median_ms(
        lambda: select_objects(dets, threshold=cfg.threshold, min_area_px=cfg.min_area_px, dedup_iou=cfg.dedup_iou,
                               max_objects=cfg.max_objects), reps, lambda: None)

    try:  # optional parts: a failure here must not lose the numbers above
        # upstream processor, one set_text_prompt per phrase (the reference path of sam3.md §9)
        from sam3.model.sam3_image_processor import Sam3Processor

        proc = Sam3Processor(model, device=str(seg.device), confidence_threshold=cfg.threshold)
        with seg._inference():
            state = proc.set_image(main)
            r["upstream_set_image_ms"] = median_ms(lambda: proc.set_image(main), reps, sync)
            r["upstream_text_prompt_1_ms"] = median_ms(lambda: proc.set_text_prompt(PHRASES_5[0], state), reps, sync)
            r["upstream_text_prompt_5_ms"] = median_ms(lambda: [proc.set_text_prompt(p, state) for p in PHRASES_5], reps, sync)
            # same model function on both paths? all 200 queries of each phrase: our one batched 5-phrase pass
            # vs upstream's one pass per phrase (bf16 autocast on both, so small differences are expected)
            proc.set_confidence_threshold(-1.0)
            diffs = []
            for i, phrase in enumerate(PHRASES_5):
                ours = out5["pred_logits"][i, :, 0].float().sigmoid() * out5["presence_logit_dec"][i].float().sigmoid()
                theirs = proc.set_text_prompt(phrase, state)["scores"].float()
                diffs.append(float((ours.sort().values - theirs.sort().values).abs().max()))
        r["check_scores_max_abs_diff_per_phrase"] = diffs

        # profiler split of one batched 5-phrase grounding pass (device time per stage)
        if cuda:
            r["profile"] = profile_grounding(seg, torch)
    except Exception as exc:  # noqa: BLE001
        r["optional_error"] = f"{type(exc).__name__}: {exc}"

    if cuda:
        r["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(seg.device) / 2**30
        r["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(seg.device) / 2**30
    return r


def profile_grounding(seg: Any, torch: Any) -> dict[str, float]:
    """Device and CPU time (ms per pass) of the record_function stages inside ``forward_grounding``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    seg._encode_texts(PHRASES_5)
    passes = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            with record_function("bench.text_encoder"):
                seg._text_cache.clear()
                with seg._inference():
                    seg._encode_texts(PHRASES_5)
            with record_function("bench.ground"):
                seg._ground(PHRASES_5)
        torch.cuda.synchronize()
    wanted = ("bench.text_encoder", "bench.ground", "SAM3Image._encode_prompt", "SAM3Image._run_encoder",
              "SAM3Image._run_decoder", "SAM3Image._run_segmentation_heads")
    split: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.key in wanted:
            device_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            # a label can appear twice (CPU range and GPU user annotation): keep the larger of each
            for field, value in (("device_ms", device_us), ("cpu_ms", evt.cpu_time_total)):
                key = f"{evt.key}.{field}"
                split[key] = max(split.get(key, 0.0), value / 1000 / passes)
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA")]
    split["kernel_launches_per_pass"] = sum(e.count for e in kernels) / passes
    return split


# ---------------------------------------------------------------------------------------------- stage worker


def bench_worker(args: argparse.Namespace, images: dict[str, Any], work: Path) -> dict[str, Any]:
    """Cold: one worker process per image. Warm: one worker serving 20 jobs. Real stage, real files."""
    from pipeline.driver import proc
    from pipeline.config import PipelineConfig
    from pipeline.driver.sources import store_photo
    from pipeline.handoff import MANIFEST_NAME, MASKS_DIR

    config = PipelineConfig.model_validate(
        {"segment": {"device": args.worker_device or args.device, "threshold": args.threshold,
                     "sam3": {"random_weights": args.random_weights}}}
    )
    cfg_path = work / "config.json"
    cfg_path.write_text(config.model_dump_json(), encoding="utf-8")
    runs = []
    for i in range(20):
        name, img = list(images.items())[i % len(images)]
        run_dir = work / f"run{i:02d}_{name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        img.save(run_dir / "photo.png")
        store_photo(run_dir, run_dir / "photo.png")
        runs.append(run_dir)
    pythonpath = [ROOT] + [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = proc.child_environment(pythonpath=pythonpath)
    argv = [sys.executable, "-u", "-m", "pipeline.stages.segment", "--config", str(cfg_path)]

    def serve(run_dirs: list[Path], log: Path) -> tuple[float, list[dict[str, Any]]]:
        jobs = "".join(
            json.dumps({"id": f"j{k}", "run_dir": str(d), "fingerprint": "bench", "params": {"mode": "prompt",
                        "prompts": PHRASES_5}}) + "\n" for k, d in enumerate(run_dirs)
        )
        jobs_file = log.with_suffix(".jobs")
        jobs_file.write_text(jobs, encoding="utf-8")
        t0 = time.perf_counter()
        with open(jobs_file, "rb") as stdin, open(log, "wb") as err:
            p = proc.spawn(argv, env=env, stdin=stdin, stdout=proc.subprocess.PIPE, stderr=err)
            out, _ = p.communicate(timeout=600)
        wall = time.perf_counter() - t0
        events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        if p.returncode != 0:
            raise SystemExit(f"worker failed (exit {p.returncode}); events: {events[-2:]}; log: {log}")
        return wall, events

    r: dict[str, Any] = {}
    cold = []
    for k in range(args.cold_runs):
        wall, events = serve([runs[k]], work / f"cold{k}.log")
        cold.append(wall)
    r["cold_process_per_image_s"] = statistics.median(cold)
    r["cold_runs"] = cold
    wall, events = serve(runs, work / "warm.log")
    ready = next(e for e in events if e["event"] == "ready")
    done = [e for e in events if e["event"] == "done"]
    r["warm_worker_wall_s"] = wall
    r["warm_worker_load_s"] = ready["load_s"]
    per_job = [e["timings"]["total_s"] for e in done]
    r["warm_worker_per_image_s"] = statistics.median(per_job[2:])  # first jobs include lazy init
    r["warm_worker_first_job_s"] = per_job[0]
    r["cold_over_warm"] = r["cold_process_per_image_s"] / r["warm_worker_per_image_s"]
    r["objects_per_image"] = [e["result"]["objects"] for e in done]
    manifest = runs[0] / MASKS_DIR / MANIFEST_NAME
    r["manifest_example"] = json.loads(manifest.read_text())
    r["manifest_example"]["objects"] = r["manifest_example"]["objects"][:2]
    return r


# ---------------------------------------------------------------------------------------------- report


def table(r: dict[str, Any], args: argparse.Namespace) -> str:
    a, w = r["in_process"], r.get("worker", {})
    rows = [
        ("model load (import sam3 + build, in process)", f"{a['import_s'] + a['build_s']:.1f} s (build {a['build_s']:.1f} s)"),
        ("warm image + 1 phrase (new phrase)", f"{a['warm_1_phrase_ms']:.1f} ms"),
        ("warm image + 5 phrases (new phrases)", f"{a['warm_5_phrases_ms']:.1f} ms = {a['warm_5_phrases_ms'] / 5:.1f} ms per image+phrase"),
        ("warm image + 1 / 5 phrases (text cached)", f"{a['warm_1_phrase_cached_ms']:.1f} / {a['warm_5_phrases_cached_ms']:.1f} ms"),
        ("batch of 20 images × 5 phrases (+ select_objects)", f"{a['batch20_images_per_s']:.1f} images/s ({a['batch20_s']:.2f} s)"),
    ]
    if w:
        rows += [
            ("cold process per image (stage worker, 1 job)", f"{w['cold_process_per_image_s']:.1f} s"),
            ("warm worker per image (stage worker, 20 jobs, 5 phrases)", f"{w['warm_worker_per_image_s'] * 1000:.0f} ms (incl. PNG/manifest writes)"),
            ("cold / warm ratio", f"{w['cold_over_warm']:.0f}×"),
        ]
    if "peak_gpu_mem_gib" in a:
        rows.append(("peak GPU memory (allocated / reserved)", f"{a['peak_gpu_mem_gib']:.2f} / {a['peak_gpu_reserved_gib']:.2f} GiB"))
    out = ["| measure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    out += ["", "Breakdown (1440×1080 image, medians):", "", "| part | ms |", "| --- | --- |"]
    parts = [
        ("backbone (set_image: upload, resize, ViT + neck)", a["backbone_ms"]),
        ("text encoder, 1 phrase / 5 phrases", f"{a['text_1_ms']:.1f} / {a['text_5_ms']:.1f}"),
        ("grounding batched, 1 phrase / 5 phrases (encoder+decoder+mask head+host copy)", f"{a['ground_batched_1_ms']:.1f} / {a['ground_batched_5_ms']:.1f}"),
        ("grounding, 5 phrases one pass each", a["ground_sequential_5_ms"]),
        ("host post-processing of 5 phrases (scores, upsample, copy)", a["to_detections_5_ms"]),
        ("select_objects (5 phrases)", a["select_objects_5_ms"]),
    ]
    if "upstream_text_prompt_5_ms" in a:
        parts += [
            ("upstream Sam3Processor set_image", a["upstream_set_image_ms"]),
            ("upstream set_text_prompt, 1 phrase / 5 phrases", f"{a['upstream_text_prompt_1_ms']:.1f} / {a['upstream_text_prompt_5_ms']:.1f}"),
        ]
    out += [f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in parts]
    if "profile" in a:
        out += ["", "torch.profiler, one batched 5-phrase pass (ms per pass):", "", "| stage | device | CPU |", "| --- | --- | --- |"]
        p = a["profile"]
        for key in ("bench.text_encoder", "bench.ground", "SAM3Image._encode_prompt", "SAM3Image._run_encoder",
                    "SAM3Image._run_decoder", "SAM3Image._run_segmentation_heads"):
            if f"{key}.device_ms" in p:
                out.append(f"| {key} | {p[f'{key}.device_ms']:.1f} | {p[f'{key}.cpu_ms']:.1f} |")
        out.append(f"| CUDA kernels per text+ground pass | {p['kernel_launches_per_pass']:.0f} | |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--worker-device", default=None, help="segment.device of the stage worker (default: --device)")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=2)
    parser.add_argument("--skip-worker", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    images = photos()
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "args": vars(args) | {"out": str(args.out)}}
    result["in_process"] = bench_in_process(args, images)
    print(json.dumps(result["in_process"], indent=1, default=str), flush=True)
    if not args.skip_worker:
        with tempfile.TemporaryDirectory() as tmp:
            result["worker"] = bench_worker(args, images, Path(tmp))
        print(json.dumps(result["worker"], indent=1, default=str), flush=True)
    text = table(result, args)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_sam3.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / "bench_sam3.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
