"""Reconstruction stage worker: image + masks manifest → per-object 3D files + composed scene + manifest.

Run by the driver as ``<sam3d env python> -u -m pipeline.stages.reconstruct --config <run>/config.json``
(see :mod:`pipeline.stages.protocol`). Reads the run's input photo (``<run>/input/manifest.json``; decoded once,
checked against its sha256) and ``<run>/masks/manifest.json``.
Per-image work (the pointmap) is done once and shared by every object. Writes
``<run>/objects/NNN/{gaussians.ply, mesh.glb, pose.json}``, ``<run>/scene/{scene.ply, scene.glb}``, the formats
of ``reconstruct.exports`` (:mod:`pipeline.stages.export_run`) and, last, ``<run>/objects/manifest.json``. Object ``i`` uses seed ``reconstruct.seed + i``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import fresh_dir, replace_dir, sha256_file
from pipeline.backends import load_backend_class
from pipeline.backends.base import ObjectReconstruction, Reconstructor
from pipeline.config import PipelineConfig
from pipeline.errors import InputError
from pipeline.handoff import (
    MANIFEST_NAME,
    MASKS_DIR,
    OBJECTS_DIR,
    SCENE_DIR,
    MaskManifest,
    ObjectRecord,
    ObjectsManifest,
    file_record,
    load_manifest,
    write_manifest,
)
from pipeline.images import read_mask
from pipeline.inputs import read_input
from pipeline.stages.export_run import export_notes, export_run
from pipeline.stages.protocol import Job, Reporter, worker_main

__all__ = ["ReconstructWorker"]



def _records(run_dir: Path, folder: Path) -> list:
    return [file_record(run_dir, p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME]


class ReconstructWorker:
    """Holds one reconstruction backend (models loaded once) and serves reconstruction jobs."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        cls = load_backend_class("reconstruct", config.reconstruct.backend)
        if not (isinstance(cls, type) and issubclass(cls, Reconstructor)):
            raise InputError(f"reconstruct backend {config.reconstruct.backend!r} is not a Reconstructor subclass")
        self.reconstructor: Reconstructor = cls(config.reconstruct)

    def run(self, job: Job, config: PipelineConfig, reporter: Reporter) -> dict[str, Any]:
        """Reconstruct every object of one run; returns ``{"objects": N, "timings": {...}}``.

        Request-level keys (seed, frame, preview, export_obj) come from ``config``, the run's own; the models
        are the ones this worker was built with.
        """
        from pipeline.stages.scene import compose_scene, render_preview, write_object_files

        cfg = config.reconstruct
        run_dir = Path(job.run_dir)
        masks_manifest_path = run_dir / MASKS_DIR / MANIFEST_NAME
        masks = load_manifest(masks_manifest_path, MaskManifest)
        timings: dict[str, float] = {}
        context = None
        if masks.objects:  # no object: nothing to decode or prepare, only the empty manifest to write
            t0 = time.perf_counter()
            decoded, _ = read_input(run_dir)
            image = np.asarray(decoded)
            timings["read_image_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            context = self.reconstructor.prepare(image)
            timings["prepare_s"] = time.perf_counter() - t0
        objects_staging = fresh_dir(run_dir / f"{OBJECTS_DIR}.partial")
        scene_staging = fresh_dir(run_dir / f"{SCENE_DIR}.partial")
        results: list[tuple[int, Any, ObjectReconstruction]] = []
        notes: list[str] = []
        total = len(masks.objects)
        object_masks = [read_mask(run_dir / obj.file, (masks.width, masks.height)) for obj in masks.objects]
        reporter.progress(job.id, 0, total, f"{total} object(s)")

        last = [time.perf_counter()]

        def finished(i: int, rec: ObjectReconstruction) -> None:
            now = time.perf_counter()  # a batching backend reports its per-object share as run_s
            timings[f"object_{i:03d}_s"] = float(rec.timings.get("run_s", now - last[0]))
            last[0] = now
            write_object_files(rec, objects_staging / f"{i:03d}", export_obj=cfg.sam3d.export_obj)
            results.append((i, masks.objects[i], rec))
            reporter.progress(job.id, len(results), total, f"object {i + 1}/{total}: {masks.objects[i].label}")

        if context is not None:
            self.reconstructor.reconstruct_many(
                context, object_masks, [cfg.seed + i for i in range(total)], on_done=finished
            )
        results.sort(key=lambda r: r[0])
        for i, _, rec in results:
            notes.extend(f"object {i:03d}: {n}" for n in rec.notes)
        if results:
            compose_scene([r for _, _, r in results], scene_staging, frame=cfg.frame)
            if cfg.preview:
                note = render_preview(scene_staging, frame=cfg.frame)
                if note:
                    notes.append(note)
        else:
            notes.append("no objects in masks/manifest.json: nothing to reconstruct, no scene written")
        replace_dir(objects_staging, run_dir / OBJECTS_DIR)
        replace_dir(scene_staging, run_dir / SCENE_DIR)
        records = [
            ObjectRecord(
                id=i,
                mask_id=obj.id,
                label=obj.label,
                seed=cfg.seed + i,
                pose=rec.pose,
                files=_records(run_dir, run_dir / OBJECTS_DIR / f"{i:03d}"),
            )
            for i, obj, rec in results
        ]
        manifest = ObjectsManifest(
            fingerprint=job.fingerprint,
            masks_manifest_sha256=sha256_file(masks_manifest_path),
            backend=cfg.backend,
            frame=cfg.frame,
            objects=records,
            scene=_records(run_dir, run_dir / SCENE_DIR),
            notes=notes,
        )
        if cfg.exports and records:
            t0 = time.perf_counter()
            manifest = export_run(run_dir, manifest, cfg.exports, texture_size=cfg.texture_size)
            timings["export_s"] = time.perf_counter() - t0
            notes.extend(export_notes(manifest))
            manifest = manifest.model_copy(update={"notes": notes})
        write_manifest(run_dir / OBJECTS_DIR / MANIFEST_NAME, manifest)
        reporter.progress(job.id, total, total, f"{total} object(s)")
        return {"objects": total, "notes": notes, "timings": timings}


if __name__ == "__main__":
    raise SystemExit(worker_main("reconstruct", ReconstructWorker))
