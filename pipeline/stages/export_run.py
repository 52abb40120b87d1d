"""The extra file formats of one run directory: read its finished objects, write the formats, record them.

Used by the 3D stage worker right after it made the objects (``reconstruct.exports``), by the driver when a
rerun finds the 3D up to date but a requested format missing, and by ``python -m pipeline export RUN_DIR``
(formats added later, without computing the 3D again). It reads what the objects manifest lists —
``objects/NNN/mesh.glb`` (canonical y-up), ``gaussians.ply`` (canonical z-up, optional) and the pose — and
writes with :mod:`pipeline.stages.exports`, in the manifest's scene frame. One object's failed export is
recorded (:class:`~pipeline.handoff.ExportRecord` with its error) and leaves the others and the other formats
intact; a format whose library is missing is recorded once per target with the package to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.handoff import SCENE_DIR, ExportRecord, ObjectRecord, ObjectsManifest, file_record

__all__ = ["export_notes", "export_run", "missing_exports", "posed_objects"]


def _object_dir(run_dir: Path, record: ObjectRecord) -> Path:
    """The object's folder, from its files (``objects/NNN/``)."""
    return run_dir / Path(record.files[0].path).parent


def posed_objects(run_dir: Path, manifest: ObjectsManifest) -> list[tuple[ObjectRecord, Any]]:
    """``(record, PosedObject)`` for every object that has a mesh, posed into ``manifest.frame``; an object whose
    files cannot be read comes as ``(record, "<one-line reason>")``."""
    out: list[tuple[ObjectRecord, Any]] = []
    for record in manifest.objects:
        if "mesh.glb" not in {Path(f.path).name for f in record.files}:
            continue
        try:
            out.append((record, _posed_object(run_dir, record, manifest.frame)))
        except Exception as exc:  # noqa: BLE001 - a damaged object file fails that object's exports only
            out.append((record, _one_line(exc)))
    return out


def _posed_object(run_dir: Path, record: ObjectRecord, frame: str) -> Any:
    """One object's mesh (and Gaussians, when it has them) with the transforms into ``frame``."""
    import trimesh

    from pipeline.stages.exports import PosedObject
    from pipeline.stages.frames import frame_matrix, glb_node_matrix, pose_matrix
    from pipeline.stages.scene import read_gaussians_ply

    folder = _object_dir(run_dir, record)
    mesh = trimesh.load(folder / "mesh.glb", force="mesh", process=False)
    pose = pose_matrix(np.asarray(record.pose.quat_wxyz), np.asarray(record.pose.translation), np.asarray(record.pose.scale))
    change = np.eye(4)
    change[:3, :3] = frame_matrix(frame)
    has_gaussians = "gaussians.ply" in {Path(f.path).name for f in record.files}
    gaussians = read_gaussians_ply(folder / "gaussians.ply") if has_gaussians else None
    return PosedObject(
        name=f"object_{record.id:03d}",
        mesh=mesh,
        to_scene=glb_node_matrix(pose, frame),
        gaussians=gaussians,
        gaussians_to_scene=change @ pose if gaussians is not None else None,
    )


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def missing_exports(run_dir: Path, manifest: ObjectsManifest, formats: Sequence[str]) -> list[str]:
    """The formats of ``formats`` without a complete, error-free record whose files all still exist."""
    missing = []
    for fmt in formats:
        records = [r for r in manifest.exports if r.format == fmt]
        ok = bool(records) and all(r.error is None and r.files and all((run_dir / f.path).is_file() for f in r.files) for r in records)
        if not ok:
            missing.append(fmt)
    return missing


def export_run(run_dir: Path, manifest: ObjectsManifest, formats: Sequence[str], *, texture_size: int) -> ObjectsManifest:
    """Write ``formats`` for every object with a mesh and for the scene; the manifest with their records (records
    of these formats replaced, others kept). The caller writes the manifest (last, as always)."""
    from pipeline.stages.exports import ExportUnavailable, write_object, write_scene

    if not formats:
        return manifest
    objects = posed_objects(run_dir, manifest)
    readable = [obj for _, obj in objects if not isinstance(obj, str)]
    records: list[ExportRecord] = []
    for fmt in formats:
        try:
            for record, obj in objects:
                if isinstance(obj, str):  # its files could not be read
                    records.append(ExportRecord(format=fmt, target=record.id, error=f"cannot read the object: {obj}"))
                    continue
                records.append(_one(run_dir, fmt, record.id, lambda: write_object(
                    obj, fmt, _object_dir(run_dir, record), frame=manifest.frame, texture_size=texture_size)))
            if readable:
                records.append(_one(run_dir, fmt, "scene", lambda: write_scene(
                    readable, fmt, run_dir / SCENE_DIR, frame=manifest.frame, texture_size=texture_size)))
        except ExportUnavailable as exc:  # the library is missing: every target of this format fails alike
            records = [r for r in records if r.format != fmt]
            records += [ExportRecord(format=fmt, target=t, error=str(exc)) for t in [r.id for r, _ in objects] + ["scene"]]
    kept = [r for r in manifest.exports if r.format not in formats]
    return manifest.model_copy(update={"exports": kept + records})


def _one(run_dir: Path, fmt: str, target: int | str, write: Any) -> ExportRecord:
    """Run one writer; its files as records, or its failure as a one-line error (ExportUnavailable propagates)."""
    from pipeline.stages.exports import ExportUnavailable

    try:
        paths = write()
    except ExportUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - one object's failed export must not stop the others
        return ExportRecord(format=fmt, target=target, error=_one_line(exc))
    return ExportRecord(format=fmt, target=target, files=[file_record(run_dir, Path(p)) for p in paths])


def export_notes(manifest: ObjectsManifest) -> list[str]:
    """One note per format and error, naming the targets it hit (``export usdz failed for objects 000, 001 and
    the scene: USDZ export needs usd-core: pip install usd-core``)."""
    failed: dict[tuple[str, str], list[str]] = {}
    for r in manifest.exports:
        if r.error:
            failed.setdefault((r.format, r.error), []).append("the scene" if r.target == "scene" else f"{r.target:03d}")
    notes = []
    for (fmt, error), targets in failed.items():
        objects = [t for t in targets if t != "the scene"]
        where = ([f"object{'s' * (len(objects) > 1)} {', '.join(objects)}"] if objects else []) + (["the scene"] if "the scene" in targets else [])
        notes.append(f"export {fmt} failed for {' and '.join(where)}: {error}")
    return notes
