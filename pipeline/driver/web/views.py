"""JSON views of a job for the REST API: its state, per-stage timings, objects, agent decisions and file URLs.

Everything is read from the run directory's manifests (pipeline/handoff.py), so a job listed after a restart
looks exactly like one just finished. URLs are relative to the server root.

Per-object ``splat_matrix`` is the 4×4 transform (column-major, as three.js ``Matrix4.fromArray`` takes it)
from the canonical z-up object frame of ``objects/NNN/gaussians.ply`` into the scene frame named by
``scene.frame``; the mesh of object *i* is node ``object_{i:03d}`` of ``scene/scene.glb``, already posed in
the same frame (see pipeline/stages/scene.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, ManifestError
from pipeline.handoff import (
    AGENT_DIR,
    MANIFEST_NAME,
    MASKS_DIR,
    OBJECTS_DIR,
    RUN_RECORD,
    MaskManifest,
    ObjectsManifest,
    RunRecord,
    load_manifest,
)
from pipeline.inputs import load_input
from pipeline.stages.frames import frame_matrix, pose_matrix  # numpy only: safe on the driver side

from .jobs import Job

__all__ = ["job_urls", "job_summary", "job_detail", "file_url", "list_files"]

_TRANSCRIPT = f"{AGENT_DIR}/transcript.json"


def file_url(job_id: str, rel: str) -> str:
    """The API URL of a file of the job's run directory (``rel`` uses ``/``)."""
    return f"/api/jobs/{job_id}/files/{rel}"


def job_urls(job_id: str) -> dict[str, str]:
    """The URLs of a job: itself, its events, its zip."""
    base = f"/api/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "zip": f"{base}/zip", "files": f"{base}/files/"}


def job_summary(job: Job, *, queue_position: int | None = None) -> dict[str, Any]:
    """The short form listed by ``GET /api/jobs``."""
    r = job.record
    return {
        "id": job.id,
        "state": r["state"],
        "stage": r.get("stage"),
        "progress": r.get("progress"),
        "queue_position": queue_position,
        "mode": r.get("mode"),
        "query": r.get("query"),
        "prompts": r.get("prompts", []),
        "options": r.get("options", {}),
        "upload": r.get("upload"),
        "created": r["created"],
        "started": r.get("started"),
        "finished": r.get("finished"),
        "error": r.get("error"),
        "hint": r.get("hint"),
        "demo": bool(r.get("demo")),
        "urls": job_urls(job.id),
    }


def _load(path: Path, model: type) -> Any:
    try:
        return load_manifest(path, model) if path.exists() else None
    except ManifestError:
        return None


def _splat_matrix(pose: Any, frame: str) -> list[float]:
    change = np.eye(4)
    change[:3, :3] = frame_matrix(frame)
    m = change @ pose_matrix(np.asarray(pose.quat_wxyz), np.asarray(pose.translation), np.asarray(pose.scale))
    return [round(float(v), 6) for v in m.T.reshape(-1)]  # column-major


def _objects(job: Job, masks: MaskManifest | None, objs: ObjectsManifest | None) -> list[dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for m in masks.objects if masks else []:
        out[m.id] = {"id": m.id, "label": m.label, "phrases": m.phrases, "score": m.score, "bbox_xyxy": list(m.bbox_xyxy),
                     "area": m.area, "decision": m.decision, "mask_url": file_url(job.id, m.file), "files": {}}
    for index, rec in enumerate(objs.objects if objs else []):
        entry = out.setdefault(rec.mask_id, {"id": rec.mask_id, "label": rec.label, "files": {}})
        entry.update(
            object_id=rec.id,
            node=f"object_{index:03d}",
            seed=rec.seed,
            pose=rec.pose.model_dump(mode="json"),
            splat_matrix=_splat_matrix(rec.pose, objs.frame) if objs.frame else None,
            files={Path(f.path).name: file_url(job.id, f.path) for f in rec.files},
        )
    return [out[k] for k in sorted(out)]


def _transcript(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / _TRANSCRIPT
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    rounds = []
    for r in data.get("rounds", []):
        r = dict(r)
        if r.get("overlay"):
            r["overlay_url"] = file_url(run_dir.name, f"{AGENT_DIR}/{r['overlay']}")
        rounds.append(r)
    return {"query": data.get("query"), "rounds": rounds, "outcome": data.get("outcome")}


def _exports(job: Job, objs: ObjectsManifest | None) -> list[dict[str, Any]]:
    """Per export format: the scene's files, how many objects have it, the URL of its zip, and its errors."""
    out: dict[str, dict[str, Any]] = {}
    for r in objs.exports if objs else []:
        entry = out.setdefault(r.format, {"format": r.format, "scene_files": {}, "objects": 0, "errors": [],
                                          "zip_url": f"/api/jobs/{job.id}/zip?format={r.format}"})
        if r.error:
            entry["errors"].append(f"{'scene' if r.target == 'scene' else f'object {r.target:03d}'}: {r.error}")
        elif r.target == "scene":
            entry["scene_files"] = {Path(f.path).name: file_url(job.id, f.path) for f in r.files}
        else:
            entry["objects"] += 1
    return list(out.values())


def export_files(run_dir: Path, fmt: str) -> list[str]:
    """The run-relative paths of one export format's files (objects and scene), from the objects manifest."""
    objs = _load(run_dir / OBJECTS_DIR / MANIFEST_NAME, ObjectsManifest)
    return [f.path for r in (objs.exports if objs else []) if r.format == fmt and not r.error for f in r.files]


def list_files(run_dir: Path) -> list[str]:
    """Regular files of the run directory (relative, ``/``-separated), hidden names and symlinks left out."""
    files = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if any(part.startswith(".") for part in rel.parts) or path.is_symlink() or not path.is_file():
            continue
        if any(p.is_symlink() for p in path.parents if run_dir in p.parents):
            continue
        files.append(rel.as_posix())
    return files


def _input_view(job_id: str, run_dir: Path, masks: MaskManifest | None) -> dict[str, Any]:
    """``input_url`` (the stored original photo, as uploaded), ``input`` (how it becomes the displayed image:
    format, EXIF orientation, stored and displayed size) and ``preview_url`` (the displayed image, oriented and
    ≤ 1600 px, once the segment stage has run: what the page draws the masks over)."""
    try:
        stored = load_input(run_dir)
    except (InputError, ManifestError):  # no input yet (a queued job) or an unreadable manifest: nothing to show
        stored = None
    preview = masks.preview if masks and masks.preview and (run_dir / masks.preview).is_file() else None
    return {
        "input_url": file_url(job_id, stored.file.path) if stored else None,
        "input": {"normalisation": stored.normalisation, **stored.facts} if stored else None,
        "preview_url": file_url(job_id, preview) if preview else None,
    }


def job_detail(job: Job, *, queue_position: int | None = None, waiting: str | None = None) -> dict[str, Any]:
    """The full form of ``GET /api/jobs/{id}``."""
    run_dir = job.dir
    record = _load(run_dir / RUN_RECORD, RunRecord)
    masks = _load(run_dir / MASKS_DIR / MANIFEST_NAME, MaskManifest)
    objs = _load(run_dir / OBJECTS_DIR / MANIFEST_NAME, ObjectsManifest)
    scene: dict[str, Any] = {"frame": objs.frame if objs else None}
    for f in objs.scene if objs else []:
        scene[Path(f.path).stem + "_" + Path(f.path).suffix.lstrip(".") + "_url"] = file_url(job.id, f.path)
    stages = {}
    for name, st in (record.stages.items() if record else []):
        stages[name] = {"status": st.status, "reason": st.reason, "duration_s": st.duration_s, "timings": st.timings}
    detail = job_summary(job, queue_position=queue_position)
    detail.update(
        waiting=waiting,
        stages=stages,
        **_input_view(job.id, run_dir, masks),
        image_size=[masks.width, masks.height] if masks else None,
        objects=_objects(job, masks, objs),
        segment_reason=masks.reason if masks else None,
        notes=list(dict.fromkeys(objs.notes)) if objs else [],
        scene=scene,
        exports=_exports(job, objs),
        transcript=_transcript(run_dir),
        files=[file_url(job.id, rel) for rel in list_files(run_dir)] if job.done else [],
    )
    return detail
