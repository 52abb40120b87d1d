"""Export formats (``pipeline.stages.exports``) on CPU: time per object and file size, per format.

Two synthetic objects, both a random blob (marching cubes of an ellipsoid's distance perturbed by random
low-frequency waves: the kind of surface SAM 3D Objects' FlexiCubes decoder gives) with a smooth vertex-colour
field, posed by a fixed pose into the opencv frame:

- ``demo``: ~6 000 vertices (the demo backend's meshes are of this order);
- ``sam3d``: ~50 000 vertices / ~100 000 faces (SAM 3D Objects' decoded meshes are of this order);

plus, for the textured GLB, a bake from Gaussians (20 000 for demo, 200 000 for sam3d) on the blob's surface.

Per format: ``first call`` = a write with the bake memo cleared (unwrap + bake + encode + write: what one
object costs when a single format is exported), ``cached`` = the same write with the bake memoised (what each
further format of the same object costs), medians of ``--reps`` calls; the file size is the sum of the files
written. Texture 1024×1024 unless ``--texture-size``.

    python benchmarks/bench_exports.py --reps 5 [--markdown benchmarks/results/exports-cpu-<date>.md]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.backends.base import GaussianSet  # noqa: E402 - after the path
from pipeline.stages import exports  # noqa: E402
from pipeline.stages.frames import Z_UP_FROM_Y_UP, frame_matrix, glb_node_matrix, pose_matrix  # noqa: E402

SIZES = {"demo": (64, 20_000), "sam3d": (182, 200_000)}  # marching-cubes grid size, Gaussians
FRAME = "opencv"


def cpu_description() -> str:
    """CPU model (from /proc/cpuinfo) and the cores this process may use (nproc)."""
    try:
        models = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo", encoding="utf-8") if ln.startswith("model name")]
    except OSError:
        models = []
    return f"{models[0] if models else platform.processor() or 'unknown CPU'}, nproc {len(os.sched_getaffinity(0))}"


def blob(grid: int, seed: int = 0):
    """A random-ish closed surface (trimesh) with RGBA vertex colours, in the canonical y-up frame, ~[-0.5, 0.5]³."""
    import trimesh
    from skimage.measure import marching_cubes

    rng = np.random.default_rng(seed)
    axis = np.linspace(-0.5, 0.5, grid)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    field = np.sqrt((x / 0.4) ** 2 + (y / 0.3) ** 2 + (z / 0.25) ** 2)
    for _ in range(8):
        w = rng.normal(size=3) * 8.0
        field += 0.05 * np.sin(w[0] * x + w[1] * y + w[2] * z + rng.uniform(0, 6.3))
    vertices, faces, _, _ = marching_cubes(field, 0.9, spacing=(1.0 / (grid - 1),) * 3)
    mesh = trimesh.Trimesh(vertices - 0.5, faces)
    p = mesh.vertices
    rgb = np.stack([128 + 100 * np.sin(6 * p[:, 0]), 128 + 100 * np.cos(5 * p[:, 1]), 128 + 100 * np.sin(4 * p[:, 2])], 1)
    mesh.visual.vertex_colors = np.column_stack([np.rint(rgb), np.full(len(p), 255)]).astype(np.uint8)
    return mesh


def gaussians_on(mesh, count: int, seed: int = 0) -> GaussianSet:
    """``count`` small Gaussians sampled on ``mesh``'s surface, in the canonical z-up frame."""
    import trimesh

    points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    rng = np.random.default_rng(seed)
    return GaussianSet(
        xyz=(points @ Z_UP_FROM_Y_UP.T).astype(np.float32),
        f_dc=rng.normal(scale=0.5, size=(count, 3)).astype(np.float32),
        opacity=rng.normal(2.0, 1.0, size=count).astype(np.float32),
        log_scale=np.full((count, 3), np.log(0.004), np.float32),
        rot_wxyz=np.tile(np.float32([1, 0, 0, 0]), (count, 1)),
    )


def posed(mesh, gaussians: GaussianSet | None) -> exports.PosedObject:
    pose = pose_matrix(np.array([0.9, 0.1, -0.3, 0.2]) / np.linalg.norm([0.9, 0.1, -0.3, 0.2]), [0.2, -0.1, 3.0], [1.3] * 3)
    change = np.eye(4)
    change[:3, :3] = frame_matrix(FRAME)
    return exports.PosedObject(
        name="object_000", mesh=mesh, to_scene=glb_node_matrix(pose, FRAME), gaussians=gaussians,
        gaussians_to_scene=None if gaussians is None else change @ pose,
    )  # fmt: skip


def time_write(obj: exports.PosedObject, fmt: str, out: Path, size: int, reps: int, *, cached: bool) -> tuple[float, int]:
    """Median seconds of ``write_object`` over ``reps`` calls and the bytes written."""
    times, written = [], []
    for _ in range(reps):
        if not cached:
            exports._BAKES.clear()  # measure the unwrap + bake too (private memo: benchmark only)
        t0 = time.perf_counter()
        written = exports.write_object(obj, fmt, out, frame=FRAME, texture_size=size)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(p.stat().st_size for p in written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    import trimesh
    import xatlas  # noqa: F401 - fail early when missing
    from pxr import Usd

    size = args.texture_size
    lines = [f"# Export formats on CPU — {cpu_description()}, {date.today().isoformat()}", "",
             f"Command: `python benchmarks/bench_exports.py --reps {args.reps} --texture-size {size}`.", "",
             f"Python {platform.python_version()}, numpy {np.__version__}, trimesh {trimesh.__version__}, "
             f"usd-core {'.'.join(map(str, Usd.GetVersion()[1:]))}; medians of {args.reps} calls of write_object; "
             f"texture {size}×{size}. *first call*: bake memo cleared (unwrap + bake + write); *cached*: the bake "
             "memoised (each further format of the same object).", "",
             "| object | vertices / faces | format | first call, s | cached, s | file size |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for label, (grid, n_gaussians) in SIZES.items():
            mesh = blob(grid)
            cases = [(fmt, posed(mesh, None)) for fmt in exports.FORMATS]
            cases.append(("glb-textured", posed(mesh, gaussians_on(mesh, n_gaussians))))
            for fmt, obj in cases:
                source = f" (from {n_gaussians:,} Gaussians)" if obj.gaussians is not None else ""
                out = Path(tmp) / label / fmt
                first, nbytes = time_write(obj, fmt, out, size, args.reps, cached=False)
                cached, _ = time_write(obj, fmt, out, size, args.reps, cached=True)
                lines.append(f"| {label} | {len(mesh.vertices):,} / {len(mesh.faces):,} | {fmt}{source} | {first:.2f} | "
                             f"{cached:.2f} | {nbytes / 1e6:.2f} MB |")  # fmt: skip
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
