"""``python -m pipeline export RUN_DIR --formats obj,usdz``: add file formats to a finished run, without 3D work.

Runs in the driver's own interpreter (trimesh and scipy are driver dependencies; OBJ/USDZ/textured GLB also need
``xatlas``, USDZ needs ``usd-core`` — a missing one is named with the command that installs it). Holds the run
directory's lock, writes the files beside the objects and the scene, and rewrites ``objects/manifest.json``
(atomically, last) with their records. The same step runs when a rerun finds the 3D up to date but a format of
``reconstruct.exports`` missing (:func:`add_missing_exports`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import EXPORT_FORMATS, PipelineConfig, apply_overrides
from pipeline.errors import ManifestError, UsageError
from pipeline.handoff import MANIFEST_NAME, OBJECTS_DIR, ObjectsManifest, load_manifest, write_manifest

__all__ = ["add_export_command", "add_missing_exports", "cmd_export"]


def add_export_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``export`` subcommand to the CLI's subparsers."""
    export = sub.add_parser("export", parents=[common], help="add file formats (obj, stl, usdz, glb-textured) to a finished run")
    export.add_argument("run", type=Path, metavar="RUN_DIR", help="a run directory whose 3D stage has finished")
    export.add_argument("--formats", required=True, metavar="LIST", help=f"comma-separated: {', '.join(EXPORT_FORMATS)}")
    export.add_argument("--texture-size", type=int, metavar="N", help="texels per side of baked textures (default: reconstruct.texture_size)")
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Write the formats for every object and the scene of ``args.run``; 1 if any export failed, else 0."""
    from pipeline.driver.lock import run_lock

    overrides = [f"reconstruct.exports={args.formats}"]
    if args.texture_size is not None:
        overrides.append(f"reconstruct.texture_size={args.texture_size}")
    cfg = apply_overrides(config, overrides, origin="--formats/--texture-size").reconstruct
    if not cfg.exports:
        raise UsageError("--formats is empty", hint=f"name one or more of {', '.join(EXPORT_FORMATS)}")
    manifest_path = args.run / OBJECTS_DIR / MANIFEST_NAME
    if not manifest_path.is_file():
        raise UsageError(f"no finished 3D in {args.run} ({OBJECTS_DIR}/{MANIFEST_NAME} is missing)",
                         hint=f"run the 3D stage first: ./run_sam3d_from_masks.sh --run {args.run}")
    with run_lock(args.run):
        manifest = load_manifest(manifest_path, ObjectsManifest)
        if not manifest.objects:
            print(f"{args.run}: no objects, nothing to export")
            return 0
        updated = _export(args.run, manifest, cfg.exports, cfg.texture_size, say=print)
    return 1 if any(r.error for r in updated.exports if r.format in cfg.exports) else 0


def add_missing_exports(run_dir: Path, config: PipelineConfig, *, say: Callable[[str], None]) -> None:
    """After a 3D stage that was up to date: write the formats of ``reconstruct.exports`` that the objects
    manifest lacks (the caller holds the run directory's lock). Nothing to do without a manifest or objects."""
    from pipeline.stages.export_run import missing_exports

    cfg = config.reconstruct
    path = run_dir / OBJECTS_DIR / MANIFEST_NAME
    try:
        manifest = load_manifest(path, ObjectsManifest)
    except ManifestError:
        return
    missing = missing_exports(run_dir, manifest, cfg.exports) if manifest.objects else []
    if missing:
        _export(run_dir, manifest, missing, cfg.texture_size, say=say)


def _export(run_dir: Path, manifest: ObjectsManifest, formats: Sequence[str], texture_size: int, *,
            say: Callable[[str], None]) -> ObjectsManifest:
    """Export, write the manifest last, say one line per format."""
    from pipeline.stages.export_run import export_notes, export_run

    updated = export_run(run_dir, manifest, formats, texture_size=texture_size)
    failures = export_notes(updated.model_copy(update={"exports": [r for r in updated.exports if r.format in formats]}))
    notes = [n for n in manifest.notes if not n.startswith(tuple(f"export {f} " for f in formats))] + failures
    write_manifest(run_dir / OBJECTS_DIR / MANIFEST_NAME, updated.model_copy(update={"notes": notes}))
    for fmt in formats:
        done = [r for r in updated.exports if r.format == fmt and not r.error]
        files = sum(len(r.files) for r in done)
        objects = sum(r.target != "scene" for r in done)
        scene = any(r.target == "scene" for r in done)
        say(f"export {fmt}: {objects} object(s){' and the scene' if scene else ''}, {files} file(s) in {run_dir}")
    for line in failures:
        say(line)
    return updated
