"""Batched vs one-by-one SAM 3D Objects: equivalence per object and wall time per object for 1, 2, 4, 8 objects.

Usage (in the sam3d-objects env, on a GPU; see benchmarks/sam3d_shims/ for the random-weight setup)::

    python benchmarks/bench_sam3d_batch.py --checkpoint-dir CKPT [--random-weights] [--objects 1,2,4,8] \
        [--presets quality,fast] [--budget-s 460] --out results.md [--json results.json]

Sections, in this order, each written to ``--out``/``--json`` as soon as it finishes (a timeout keeps them):

1. warm-up: one object through upstream's ``run()`` and two through the batched path, few steps (Triton JIT);
2. equivalence: the same objects/seeds run as batches of one and as one batch (``--equiv-steps`` steps),
   compared per object: decoded sparse structure (IoU), voxels, Gaussian parameters, pose;
3. per preset: one-by-one (upstream ``run()`` per object, what the stage did before batching) and batched
   through ``reconstruct_many`` with ``max_batch_objects = n`` (OOM halving included) for each n, with peak GPU
   memory and the per-phase split of the batched runs.

Rows that would not fit in ``--budget-s`` are skipped and listed. The image is synthetic (1024×768) with
elliptical masks; with ``--random-weights`` the numbers time the real networks, not quality.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_sam3d import ellipse_masks, synthetic_image  # noqa: E402
from pipeline.backends.sam3d_presets import PRESETS  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402

SEED = 42
BATCH_NOTES = ("reconstructed in a batch", "CUDA out of memory", "decoders ran")
PHASES = ("inputs", "stage1", "structure", "stage2", "decode", "to_glb")


def make_config(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "envs": {"sam3d-objects": {"kind": "current"}},
            "reconstruct": {
                "device": "cuda",
                "sam3d": {"checkpoint_dir": str(args.checkpoint_dir), "random_weights": args.random_weights},
            },
        }
    )


def set_batch(rec: Any, n: int) -> None:
    sam3d = rec.config.sam3d.model_copy(update={"max_batch_objects": n})
    rec.config = rec.config.model_copy(update={"sam3d": sam3d})


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def compare(a: dict, b: dict) -> dict:
    """Per-object differences between two upstream-format outputs (a: batch of one, b: in a bigger batch)."""
    from pipeline.backends.sam3d import gaussians_from_sam3d

    occ_a, occ_b = a["ss_occupied"].bool(), b["ss_occupied"].bool()
    union = int((occ_a | occ_b).sum())
    row: dict[str, Any] = {
        "ss_voxels": [int(occ_a.sum()), int(occ_b.sum())],
        "ss_iou": float((occ_a & occ_b).sum()) / union if union else 1.0,
        "voxels_equal": bool(a["coords"].shape == b["coords"].shape and bool((a["coords"] == b["coords"]).all())),
    }
    for key in ("translation", "rotation", "scale"):
        row[f"{key}_maxdiff"] = float(np.abs(_np(a[key]) - _np(b[key])).max())
    if a.get("gs") is not None and b.get("gs") is not None:
        ga, gb = gaussians_from_sam3d(a["gs"]), gaussians_from_sam3d(b["gs"])
        for name in ("xyz", "f_dc", "opacity", "log_scale", "rot_wxyz"):
            x, y = getattr(ga, name), getattr(gb, name)
            finite = np.isfinite(x) & np.isfinite(y)
            diff = np.abs(x - y)[finite]
            scale = float(np.abs(x[finite]).max()) if finite.any() else 0.0
            row[f"gs_{name}"] = {
                "max_abs": float(diff.max()) if diff.size else 0.0,
                "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(x[finite]), 1e-12)) if diff.size else 0.0,
                "max_abs_value": scale,
                "nonfinite_mismatch": int((np.isfinite(x) != np.isfinite(y)).sum()),
            }
    if a.get("glb") is not None and b.get("glb") is not None:
        row["mesh_faces"] = [int(len(a["glb"].faces)), int(len(b["glb"].faces))]
    return row


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.result: dict[str, Any] = {"sections": {}, "skipped": [], "errors": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def save(self) -> None:
        if self.args.json:
            self.args.json.write_text(json.dumps(self.result, indent=1, default=str), encoding="utf-8")
        if self.args.out:
            self.args.out.write_text(to_markdown(self.result, self.args), encoding="utf-8")

    def section(self, name: str, fn: Any, *fn_args: Any) -> Any:
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        try:
            value = fn(*fn_args)
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            traceback.print_exc()
            self.result["errors"].append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            value = None
        else:
            self.result["sections"][name] = value
        print(f"[{self.elapsed():6.1f} s] {name} done: {json.dumps(value, default=str)[:600]}", flush=True)
        self.save()
        return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--objects", default="1,2,4,8")
    parser.add_argument("--presets", default="quality,fast")
    parser.add_argument("--one-by-one", type=int, default=2, help="objects timed one by one per preset and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of one-by-one and batched timings")
    parser.add_argument("--round-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[4],
                        help="batch sizes repeated in rounds after the first")
    parser.add_argument("--equiv-objects", type=int, default=3)
    parser.add_argument("--equiv-steps", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=460.0)
    parser.add_argument("--no-equivalence", action="store_true")
    parser.add_argument("--stage-run", type=Path, help="then drive the stage worker on a run dir built here")
    parser.add_argument("--stage-preset", default="fast")
    parser.add_argument("--stage-objects", type=int, default=4)
    parser.add_argument("--render", type=Path, help="only re-render --json as Markdown to --out (no GPU)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.render:
        args.out.write_text(to_markdown(json.loads(args.render.read_text(encoding="utf-8")), args), encoding="utf-8")
        return 0

    import torch

    from pipeline.backends.sam3d import Sam3dReconstructor

    bench = Bench(args)
    res = bench.result
    res["device"] = torch.cuda.get_device_name(0)
    res["torch"] = torch.__version__
    res["python"] = platform.python_version()
    res["date"] = date.today().isoformat()
    res["cpu"] = cpu_model()
    res["random_weights"] = args.random_weights
    sizes = [int(n) for n in args.objects.split(",")]
    image = synthetic_image()
    masks = ellipse_masks(max(max(sizes), args.one_by_one, args.equiv_objects))
    config = make_config(args)

    t0 = time.perf_counter()
    rec = Sam3dReconstructor(config.reconstruct)
    res["load_s"] = time.perf_counter() - t0
    ctx = rec.prepare(image)
    res["prepare_s"] = ctx.pointmap_s
    res["notes"] = list(ctx.notes)
    quality = PRESETS["quality"]

    def warmup() -> dict:
        rec.settings = replace(quality, stage1_steps=2, stage2_steps=2)
        t = time.perf_counter()
        rec.reconstruct(ctx, masks[0], SEED)
        torch.cuda.synchronize()
        one = time.perf_counter() - t
        t = time.perf_counter()
        rec.run_batch(ctx, masks[:2], [SEED, SEED + 1])
        torch.cuda.synchronize()
        return {"upstream_run_1_object_s": one, "batched_2_objects_s": time.perf_counter() - t, "steps": "2/2"}

    def equivalence() -> dict:
        rec.settings = replace(quality, stage1_steps=args.equiv_steps, stage2_steps=args.equiv_steps)
        n = args.equiv_objects
        seeds = [SEED + i for i in range(n)]
        alone = [rec.run_batch(ctx, [masks[i]], [seeds[i]])[0] for i in range(n)]
        together = rec.run_batch(ctx, masks[:n], seeds)
        again = rec.run_batch(ctx, [masks[0]], [seeds[0]])[0]  # run-to-run noise of the same batch of one
        rows = [compare(a, b) for a, b in zip(alone, together)]
        return {"steps": f"{args.equiv_steps}/{args.equiv_steps}", "objects": rows, "rerun_object_0": compare(alone[0], again)}

    def one_by_one(preset: str, k: int) -> dict:
        rec.settings = PRESETS[preset]
        times, peaks = [], []
        for i in range(k):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            rec.reconstruct(ctx, masks[i], SEED + i)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        return {"per_object_s": times, "median_s": float(np.median(times)), "peak_gib": max(peaks)}

    def batched(preset: str, n: int) -> dict:
        rec.settings = PRESETS[preset]
        set_batch(rec, n)
        rec.phases = {}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = rec.reconstruct_many(ctx, masks[:n], [SEED + i for i in range(n)])
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        phases, rec.phases = rec.phases, None
        batch_notes = sorted({note for r in out for note in r.notes if note.startswith(BATCH_NOTES)})
        return {"objects": n, "wall_s": wall, "per_object_s": wall / n, "runs_per_object_s": [wall / n],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "phases_s": phases, "notes": batch_notes}  # fmt: skip

    bench.section("warmup", warmup)
    if not args.no_equivalence:
        bench.section("equivalence", equivalence)
    for preset in args.presets.split(","):
        # Round 1 times every size; later rounds repeat one-by-one and the rounds' sizes (default 4) in
        # alternation, so that a slow or fast stretch of the machine shows in both columns (medians reported).
        for r in range(args.rounds):
            name = f"{preset}/one-by-one"
            base = bench.section(f"{name} (round {r + 1})", one_by_one, preset, args.one_by_one)
            if base:
                merge_rounds(res["sections"], name, base, ["per_object_s"], "median_s")
            est = res["sections"].get(name, {}).get("median_s", 10.0)
            round_sizes = sizes if r == 0 else [n for n in sizes if n in args.round_sizes]
            for n in sorted(round_sizes, key=lambda n: (n != 4, n != 8, n)):  # 4 and 8 first: the goal's rows
                guess = 1.2 * est * n * 0.6 + 5
                if bench.elapsed() + guess > args.budget_s:
                    res["skipped"].append(f"{preset}/batched-{n} round {r + 1} (≈{guess:.0f} s left no room in --budget-s)")
                    bench.save()
                    continue
                row = bench.section(f"{preset}/batched-{n} (round {r + 1})", batched, preset, n)
                if row:
                    merge_rounds(res["sections"], f"{preset}/batched-{n}", row, ["runs_per_object_s"], "per_object_s")
    if args.stage_run:
        bench.section("stage-run", stage_worker, args, rec)
    res["total_s"] = bench.elapsed()
    bench.save()
    return 0


def cpu_model() -> str:
    """The host CPU's model name and core count (single-object runs are partly launch-bound: the host matters)."""
    import os

    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo", encoding="utf-8") if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"


def merge_rounds(sections: dict[str, Any], name: str, row: dict, lists: list[str], median_key: str) -> None:
    """Fold one round's ``row`` into ``sections[name]``: concatenate ``lists``, recompute ``median_key`` as the
    median of the first list, keep the first round's phases and the highest peak memory."""
    merged = sections.setdefault(name, dict(row))
    if merged is not row and merged != row:
        for key in lists:
            merged[key] = list(merged.get(key, [])) + list(row.get(key, []))
        merged["peak_gib"] = max(merged.get("peak_gib", 0.0), row.get("peak_gib", 0.0))
    merged[median_key] = float(np.median(merged[lists[0]]))
    merged["rounds"] = merged.get("rounds", 0) + 1


def stage_worker(args: argparse.Namespace, rec: Any) -> dict:
    """The real reconstruct stage worker (batched path) on a fresh run dir; frees this process's models first."""
    import gc

    import torch

    from benchmarks.bench_sam3d import stage_run

    del rec.pipeline
    gc.collect()
    torch.cuda.empty_cache()
    base = make_config(args)
    sam3d = base.reconstruct.sam3d.model_copy(update={"preset": args.stage_preset, "max_batch_objects": args.stage_objects})
    config = base.model_copy(update={"reconstruct": base.reconstruct.model_copy(update={"sam3d": sam3d, "preview": False})})
    return stage_run(config, args.stage_run, args.stage_objects)


def _fmt(x: Any, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "—"


def to_markdown(res: dict, args: argparse.Namespace) -> str:
    sec = res["sections"]
    lines = [
        f"# SAM 3D Objects, batched objects — {res.get('device')}, {res.get('date')}",
        "",
        f"torch {res.get('torch')}, Python {res.get('python')}, weights: "
        f"{'random (no checkpoint)' if res.get('random_weights') else 'checkpoint'}, image 1024×768, elliptical masks, "
        f"seeds {SEED}+i. Model build {_fmt(res.get('load_s'), '.1f')} s, pointmap {_fmt(res.get('prepare_s'))} s. "
        f"Host: {res.get('cpu', 'not recorded')}.",
        "",
    ]
    if "warmup" in sec:
        w = sec["warmup"]
        lines += [f"Warm-up (Triton JIT, steps {w['steps']}): upstream run() 1 object {w['upstream_run_1_object_s']:.1f} s, "
                  f"batched 2 objects {w['batched_2_objects_s']:.1f} s.", ""]  # fmt: skip
    lines += ["## Wall time per object", "",
              "| preset | objects | one-by-one per object (s), median | batched per object (s), median | speed-up | batched runs per object (s) | peak GPU GiB one-by-one / batched | batch sizes run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for preset in args.presets.split(","):
        base = sec.get(f"{preset}/one-by-one")
        for n in [int(x) for x in args.objects.split(",")]:
            row = sec.get(f"{preset}/batched-{n}")
            if row is None:
                continue
            ob = base["median_s"] if base else None
            speed = f"{ob / row['per_object_s']:.2f}×" if ob else "—"
            lines.append(
                f"| {preset} | {n} | {_fmt(ob)} | {row['per_object_s']:.2f} | {speed} | "
                f"{', '.join(f'{t:.2f}' for t in row.get('runs_per_object_s', [row['per_object_s']]))} | "
                f"{_fmt(base['peak_gib'] if base else None, '.1f')} / {row['peak_gib']:.1f} | "
                f"{'; '.join(n for n in row['notes'] if n.startswith(BATCH_NOTES))} |"
            )
    lines += ["", "One-by-one = upstream `run()` per object (the stage before batching), median of the objects timed "
              "(all rounds, in order):"]
    for preset in args.presets.split(","):
        base = sec.get(f"{preset}/one-by-one")
        if base:
            lines.append(f"- {preset} {PRESETS[preset]}: " + ", ".join(f"{t:.2f}" for t in base["per_object_s"]) + " s")
    lines += ["", "## Where the time goes (batched runs, seconds per batch, GPU synchronised between phases)", "",
              "| run | " + " | ".join(PHASES) + " |", "| --- |" + " --- |" * len(PHASES)]  # fmt: skip
    for name, row in sec.items():
        if "/batched-" in name and "(round" not in name and row.get("phases_s"):
            lines.append(f"| {name} | " + " | ".join(_fmt(row["phases_s"].get(p)) for p in PHASES) + " |")
    if "equivalence" in sec:
        eq = sec["equivalence"]
        lines += ["", f"## Equivalence: batch of one vs one batch of {len(eq['objects'])} (steps {eq['steps']})", "",
                  "| object | SS voxels (alone, batched) | SS IoU | voxels equal | Δtranslation | Δrotation | Δscale | "
                  "xyz max abs / rel L2 | f_dc rel L2 | opacity rel L2 | log_scale rel L2 | rot rel L2 |",
                  "| --- |" + " --- |" * 11]  # fmt: skip
        rows = list(enumerate(eq["objects"])) + [("0, rerun alone", eq["rerun_object_0"])]
        for i, r in rows:
            g = lambda k, f: _fmt(r.get(f"gs_{k}", {}).get(f), ".2e")  # noqa: E731
            lines.append(
                f"| {i} | {r['ss_voxels']} | {r['ss_iou']:.4f} | {r['voxels_equal']} | {r['translation_maxdiff']:.2e} | "
                f"{r['rotation_maxdiff']:.2e} | {r['scale_maxdiff']:.2e} | {g('xyz', 'max_abs')} / {g('xyz', 'rel_l2')} | "
                f"{g('f_dc', 'rel_l2')} | {g('opacity', 'rel_l2')} | {g('log_scale', 'rel_l2')} | {g('rot_wxyz', 'rel_l2')} |"
            )
    if res.get("skipped"):
        lines += ["", "Skipped (time budget): " + "; ".join(res["skipped"])]
    if res.get("errors"):
        lines += ["", "Errors:", *[f"- {e}" for e in res["errors"]]]
    lines += ["", "Notes from the backend:", *[f"- {n}" for n in res.get("notes", [])]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
