"""Benchmark the SAM 3D Objects backend: per-object time with and without the shared pointmap, peak GPU memory.

Usage (in the sam3d-objects env, on a GPU)::

    python benchmarks/bench_sam3d.py --checkpoint-dir CKPT [--random-weights] [--objects 3] \
        [--stage1-steps 25 --stage2-steps 25] [--decode gaussian,mesh] [--out results.md] [--stage-run DIR]

``--stage-run DIR`` first builds a run directory (input/image.png + masks/ via ``write_masks``) and drives
the real stage worker ``python -m pipeline.stages.reconstruct`` on it with one job on stdin, then checks the
objects manifest and scene files. The table is written as Markdown to ``--out``.

The image is synthetic (1024×768, smooth colour gradients) with elliptical masks. With ``--random-weights`` the
numbers are timings of the real networks at realistic sizes (see pipeline/backends/sam3d_random.py), not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.config import PipelineConfig  # noqa: E402


def synthetic_image(width: int = 1024, height: int = 768) -> np.ndarray:
    """(H, W, 3) uint8 smooth gradients — something for DINO and MoGe to chew on."""
    v, u = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    rgb = np.stack([u, v, 0.5 + 0.5 * np.sin(6 * u * v)], -1)
    return (rgb * 255).astype(np.uint8)


def ellipse_masks(n: int, width: int = 1024, height: int = 768) -> list[np.ndarray]:
    """``n`` non-overlapping elliptical (H, W) bool masks spread over the image."""
    v, u = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    masks = []
    for i in range(n):
        cx = width * (i + 0.5) / n
        cy = height * (0.45 + 0.1 * (i % 2))
        rx, ry = 0.4 * width / n, 0.25 * height
        masks.append(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0)
    return masks


def make_config(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "envs": {"sam3d-objects": {"kind": "current"}},
            "reconstruct": {
                "device": "cuda",
                "preview": True,
                "sam3d": {
                    "checkpoint_dir": str(args.checkpoint_dir),
                    "random_weights": args.random_weights,
                    "stage1_steps": args.stage1_steps,
                    "stage2_steps": args.stage2_steps,
                    "decode_formats": args.decode.split(","),
                },
            },
        }
    )


def stage_run(config: PipelineConfig, run_dir: Path, n_objects: int) -> dict:
    """Build a run dir and drive ``python -m pipeline.stages.reconstruct`` on it; returns a summary."""
    from PIL import Image

    from pipeline.driver import proc
    from pipeline.driver.sources import store_photo
    from pipeline.handoff import MANIFEST_NAME, OBJECTS_DIR, ObjectsManifest, load_manifest
    from pipeline.stages.postprocess import Candidate
    from pipeline.stages.segment import write_masks

    run_dir.mkdir(parents=True, exist_ok=True)
    image = synthetic_image()
    Image.fromarray(image).save(run_dir / "photo.png")
    store_photo(run_dir, run_dir / "photo.png")
    candidates = []
    for i, mask in enumerate(ellipse_masks(n_objects)):
        ys, xs = np.nonzero(mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        candidates.append(Candidate(mask=mask, box_xyxy=box, score=0.9, phrases=[f"blob {i}"]))
    write_masks(run_dir, candidates, fingerprint="bench", mode="import", backend="bench")
    config_path = run_dir / "config.json"
    config_path.write_text(config.model_dump_json(), encoding="utf-8")
    job = json.dumps({"id": "j1", "run_dir": str(run_dir), "fingerprint": "bench"}) + "\n"
    jobs_path = run_dir / "jobs.jsonl"
    jobs_path.write_text(job, encoding="utf-8")
    argv = [sys.executable, "-u", "-m", "pipeline.stages.reconstruct", "--config", str(config_path), "--jobs", str(jobs_path)]
    t0 = time.perf_counter()
    result = proc.run_command(argv, env=dict(os.environ), cwd=ROOT, log_path=run_dir / "stage.log")
    wall = time.perf_counter() - t0
    summary: dict = {"wall_s": round(wall, 1), "returncode": result.returncode}
    manifest_path = run_dir / OBJECTS_DIR / MANIFEST_NAME
    if manifest_path.exists():
        manifest = load_manifest(manifest_path, ObjectsManifest)
        summary["objects"] = len(manifest.objects)
        summary["scene"] = [f.path for f in manifest.scene]
        summary["object_files"] = [f.path for f in manifest.objects[0].files] if manifest.objects else []
        summary["notes"] = manifest.notes
    return summary


def bench(config: PipelineConfig, n_objects: int) -> dict:
    """Time load, prepare (pointmap once) and per-object reconstruction with and without the shared pointmap."""
    import torch

    from pipeline.backends.sam3d import Sam3dReconstructor

    t0 = time.perf_counter()
    rec = Sam3dReconstructor(config.reconstruct)
    load_s = time.perf_counter() - t0
    image = synthetic_image()
    masks = ellipse_masks(n_objects)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ctx = rec.prepare(image)
    prepare_s = time.perf_counter() - t0
    rows = []
    for i, mask in enumerate(masks):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = rec.reconstruct(ctx, mask, seed=42 + i)
        torch.cuda.synchronize()
        shared_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30
        row = {
            "object": i,
            "voxels": int(out.timings.get("voxels", -1)),
            "gaussians": len(out.gaussians) if out.gaussians is not None else 0,
            "mesh_faces": int(len(out.mesh.faces)) if out.mesh is not None else 0,
            "shared_s": shared_s,
            "peak_gib": peak,
        }
        # The same object, letting the pipeline recompute the pointmap itself (what the notebook does).
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            rec.run_object(ctx, mask, 42 + i, pointmap=None)
            torch.cuda.synchronize()
            row["own_pointmap_s"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            row["own_pointmap_s"] = None
            row["own_pointmap_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
    return {
        "load_s": load_s,
        "prepare_s": prepare_s,
        "rows": rows,
        "notes": ctx.notes,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
    }


def to_markdown(result: dict, args: argparse.Namespace, stage: dict | None) -> str:
    lines = [
        f"# SAM 3D Objects backend benchmark — {result['device']}, {date.today().isoformat()}",
        "",
        f"torch {result['torch']}, Python {platform.python_version()}, weights: "
        f"{'random (no checkpoint)' if args.random_weights else 'checkpoint'}, steps {args.stage1_steps}/{args.stage2_steps}, "
        f"decode {args.decode}, image 1024×768, {args.objects} elliptical masks.",
        "",
        f"- model build (load): {result['load_s']:.1f} s",
        f"- prepare (pointmap once per image): {result['prepare_s']:.2f} s",
        "",
        "| object | voxels | Gaussians | mesh faces | time, shared pointmap (s) | time, own pointmap (s) | peak GPU memory (GiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        own = f"{r['own_pointmap_s']:.2f}" if r.get("own_pointmap_s") is not None else f"failed ({r.get('own_pointmap_error')})"
        lines.append(
            f"| {r['object']} | {r['voxels']} | {r['gaussians']} | {r['mesh_faces']} | {r['shared_s']:.2f} | {own} | {r['peak_gib']:.1f} |"
        )
    lines += ["", "Notes from the backend:", *[f"- {n}" for n in result["notes"]]]
    if stage is not None:
        lines += ["", "Stage worker run (`python -m pipeline.stages.reconstruct`, one job on stdin):", "", "```", json.dumps(stage, indent=2), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--stage1-steps", type=int, default=25)
    parser.add_argument("--stage2-steps", type=int, default=25)
    parser.add_argument("--decode", default="gaussian,mesh")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--stage-run", type=Path, help="also drive the stage worker on a run dir built here")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)
    config = make_config(args)
    stage = stage_run(config, args.stage_run, 1) if args.stage_run else None
    if stage is not None:
        print(json.dumps(stage, indent=2), flush=True)
    if args.skip_bench:
        return 0
    result = bench(config, args.objects)
    text = to_markdown(result, args, stage)
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
