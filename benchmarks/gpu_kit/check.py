"""GPU kit: import everything both stages, the driver and ``serve`` need, and print the versions (run.sh runs it).

Fails (exit 1) naming each module that does not import, before any model is built. Also imports every Hydra
``_target_`` module of the kit's checkpoint configs. Runs on CPU too (CUDA only reported).

    python3 benchmarks/gpu_kit/check.py [--kit .gpu-kit]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = [
    # the driver and serve
    "pydantic", "yaml", "numpy", "PIL", "rich", "plyfile", "trimesh", "scipy", "skimage", "fastapi", "starlette",
    "uvicorn", "multipart", "httpx", "anyio._backends._asyncio", "pipeline.driver.cli", "pipeline.driver.web.app", "pipeline.api",
    # SAM3
    "torch", "torchvision", "triton", "timm", "sam3", "sam3.model_builder", "open_clip", "ftfy", "iopath",
    "pycocotools", "pipeline.backends.sam3", "benchmarks.gpu_kit.fixed_masks",
    # SAM 3D Objects (the attention backend is chosen first, as the backend does)
    "hydra", "omegaconf", "loguru", "easydict", "optree", "astor", "spconv", "spconv.pytorch", "spconv_triton",
    "lightning", "cv2", "utils3d", "moge", "moge.model.v1", "pytorch3d.transforms", "pytorch3d.renderer",
    "pytorch3d.structures", "pipeline.backends.sam3d", "sam3d_objects.pipeline.inference_pipeline_pointmap",
]
VERSIONS = ["torch", "torchvision", "triton", "timm", "numpy", "typing_extensions", "pydantic", "fastapi", "sam3",
            "open_clip", "hydra", "omegaconf", "spconv_triton", "lightning", "trimesh", "PIL"]


def _targets(kit: Path) -> list[str]:
    found = set()
    for path in sorted((kit / "checkpoints").glob("*.yaml")):
        for target in re.findall(r"_target_:\s*([\w.]+)", path.read_text(encoding="utf-8")):
            if target.split(".")[0] in ("sam3d_objects", "moge", "torchvision"):
                found.add(target)
    return sorted(found)


def _import_target(target: str) -> None:
    """Import the module of a Hydra target (``pkg.mod.Class`` or ``pkg.mod.Class.method``) and resolve it."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name + "."):
                continue
            raise
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return
    raise ModuleNotFoundError(target)


def unmet_requirements(site: Path) -> list[str]:
    """Each requirement of a package installed in ``site`` (the kit's wheels) that this interpreter does not meet."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["packaging is not installed: requirements not checked"]
    out = []
    for dist in metadata.distributions(path=[str(site)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                out.append(f"{dist.metadata['Name']} {dist.version} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                out.append(f"{dist.metadata['Name']} {dist.version} needs {req}: {have} here")
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path, default=ROOT / ".gpu-kit")
    ap.add_argument("--site", type=Path, help="where run.sh installed the kit's wheels (their requirements checked)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("LIDRA_SKIP_INIT", "true")
    failed = []
    t0 = time.perf_counter()
    import torch

    if not torch.cuda.is_available():  # a CPU torch with a CUDA torchvision wheel (as the product's CPU path)
        from pipeline.backends import sam3_cpu

        sam3_cpu.ensure_torchvision()
    for name in MODULES:
        if name == "sam3d_objects.pipeline.inference_pipeline_pointmap":
            try:
                from pipeline.backends.sam3d import _select_attention_backend

                note = _select_attention_backend()
                print(f"attention: {note or 'flash_attn'}")
            except Exception as exc:  # noqa: BLE001
                failed.append(f"attention backend: {type(exc).__name__}: {exc}")
        try:
            if name == "sam3d_objects.pipeline.inference_pipeline_pointmap" and not torch.cuda.is_available():
                # upstream reads the GPU's name when this module is imported; on a CPU check, pretend one
                real = torch.cuda.is_available, torch.cuda.get_device_name
                torch.cuda.is_available, torch.cuda.get_device_name = (lambda: True), (lambda *a: "no GPU (check.py)")
                try:
                    importlib.import_module(name)
                finally:
                    torch.cuda.is_available, torch.cuda.get_device_name = real
            else:
                importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - report them all
            failed.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            if os.environ.get("GPU_KIT_TRACE"):
                traceback.print_exc()
    targets = _targets(args.kit)
    for target in targets:
        try:
            _import_target(target)
        except BaseException as exc:  # noqa: BLE001
            failed.append(f"_target_ {target}: {type(exc).__name__}: {str(exc)[:300]}")
    for name in VERSIONS:
        mod = sys.modules.get(name)
        print(f"{name} {getattr(mod, '__version__', '?') if mod else 'not imported'}"
              f" ({os.path.dirname(getattr(mod, '__file__', '') or '') if mod else ''})")
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = torch.cuda.is_available()
        print(f"CUDA available: {cuda}" + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
    print(f"imports: {len(MODULES)} modules + {len(targets)} checkpoint targets in {time.perf_counter() - t0:.1f} s; "
          f"{len(failed)} failed")
    for line in failed:
        print(f"FAILED {line}")
    if args.site:
        unmet = unmet_requirements(args.site)
        print(f"requirements of the kit's packages not met here (pip --no-deps ignores them; the imports above decide): {len(unmet)}")
        for line in unmet:
            print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
