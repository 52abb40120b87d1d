"""Segmentation stage worker: image + phrases (or a query through the VLM agent) → masks + manifest.

Run by the driver as ``<sam3 env python> -u -m pipeline.stages.segment --config <run>/config.json``
(see :mod:`pipeline.stages.protocol`). Job params:

    {"mode": "prompt", "prompts": ["horse", "rider"]}
    {"mode": "query", "query": "the two horses on the left", "vlm_url": "http://127.0.0.1:8001/v1"}

Reads ``<run>/input/manifest.json`` and the photo it names (decoded once per job, checked against its sha256;
the images of a job group are decoded on threads while earlier jobs of the group run); writes
``<run>/masks/NNN.png`` (0/255, displayed H×W), ``<run>/masks/preview.jpg`` (the displayed image, ≤ 1600 px, for
pages and overlays) and, last, ``<run>/masks/manifest.json``; in query mode also ``<run>/agent/`` (transcript +
overlays). Outputs are built in ``<name>.partial`` directories and renamed into place, so a killed worker leaves
no manifest.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from pipeline.atomic import fresh_dir, replace_dir, sha256_file, write_with
from pipeline.backends import load_backend_class
from pipeline.backends.base import Segmenter
from pipeline.config import PipelineConfig
from pipeline.errors import InputError
from pipeline.handoff import (
    AGENT_DIR,
    MANIFEST_NAME,
    MASKS_DIR,
    InputManifest,
    MaskManifest,
    MaskObject,
    write_manifest,
)
from pipeline.images import write_mask
from pipeline.inputs import load_input, read_input
from pipeline.stages.postprocess import Candidate, select_objects
from pipeline.stages.protocol import Job, Reporter, worker_main

if TYPE_CHECKING:
    from pipeline.stages.agent.loop import Proposal

__all__ = ["SegmentWorker", "write_masks"]

NO_MATCH = "no object matches"
MASK_WRITERS = 8  # at most this many threads encode a run's mask PNGs
DECODERS = 4  # threads decoding a job group's photos ahead of the jobs
PREVIEW_NAME = "preview.jpg"
PREVIEW_MAX_SIDE = 1600  # pixels; pages and overlays never need more


def write_masks(
    run_dir: Path,
    candidates: list[Candidate],
    *,
    fingerprint: str,
    mode: str,
    backend: str,
    query: str | None = None,
    prompts: list[str] | None = None,
    reason: str | None = None,
    workers: int | None = None,
    image: InputManifest | None = None,
    preview: Image.Image | None = None,
) -> MaskManifest:
    """Write ``masks/NNN.png`` for each candidate through a staging dir, then the manifest, last.

    ``image``: the run's input manifest (read from the run when None); ``preview``: the displayed image, written
    downscaled as ``masks/preview.jpg``. PNG encoding (≈ 8 ms per 1440×1080 mask on one core) runs on
    ``workers`` threads (default: up to 8, one per core; Pillow releases the GIL while it compresses), the
    preview beside them; ``workers=1`` writes them one after another."""
    image = image or load_input(run_dir)
    width, height = image.width, image.height
    staging = fresh_dir(run_dir / f"{MASKS_DIR}.partial")
    names = [f"{i:03d}.png" for i in range(len(candidates))]

    def write(i: int) -> str:
        write_mask(staging / names[i], candidates[i].mask)
        return sha256_file(staging / names[i])

    workers = workers or min(MASK_WRITERS, os.cpu_count() or 1)
    if workers > 1 and (len(candidates) > 1 or preview is not None):
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(candidates) + 1)), thread_name_prefix="mask-png") as pool:
            previewed = pool.submit(write_preview, staging / PREVIEW_NAME, preview) if preview is not None else None
            digests = list(pool.map(write, range(len(candidates))))
            if previewed is not None:
                previewed.result()
    else:
        if preview is not None:
            write_preview(staging / PREVIEW_NAME, preview)
        digests = [write(i) for i in range(len(candidates))]
    objects = [
        MaskObject(
            id=i,
            label=cand.label,
            phrases=list(cand.phrases),
            score=round(cand.score, 6),
            bbox_xyxy=cand.box_xyxy,
            area=cand.area,
            file=f"{MASKS_DIR}/{names[i]}",
            sha256=digests[i],
            decision=cand.decision,
        )
        for i, cand in enumerate(candidates)
    ]
    final = run_dir / MASKS_DIR
    replace_dir(staging, final)
    manifest = MaskManifest(
        fingerprint=fingerprint,
        image=image.file,
        width=width,
        height=height,
        mode=mode,  # type: ignore[arg-type]
        query=query,
        prompts=list(prompts or []),
        backend=backend,
        objects=objects,
        reason=reason if reason else (NO_MATCH if not objects else None),
        preview=f"{MASKS_DIR}/{PREVIEW_NAME}" if preview is not None else None,
    )
    write_manifest(final / MANIFEST_NAME, manifest)
    return manifest


def write_preview(path: Path, image: Image.Image) -> Path:
    """Write ``image`` as a JPEG (quality 85) no larger than :data:`PREVIEW_MAX_SIDE` on its longer side.

    The smallest integer box-filter reduction that fits (``Image.reduce``: a 12 MP photo → 1344×1008 in a few
    ms, where a filtered resize of the full image costs ~100 ms); smaller images are written as they are."""
    factor = -(-max(image.size) // PREVIEW_MAX_SIDE)  # ceil
    small = image.reduce(factor) if factor > 1 else image
    return write_with(path, lambda tmp: small.save(tmp, format="JPEG", quality=85))


class SegmentWorker:
    """Holds one segmentation backend (model loaded once) and serves segmentation jobs."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        cls = load_backend_class("segment", config.segment.backend)
        if not (isinstance(cls, type) and issubclass(cls, Segmenter)):
            raise InputError(f"segment backend {config.segment.backend!r} is not a Segmenter subclass")
        self.segmenter: Segmenter = cls(config.segment)
        self._vlm_pool: ThreadPoolExecutor | None = None
        self._ahead: dict[str, Proposal] = {}
        self._decoders = ThreadPoolExecutor(max_workers=DECODERS, thread_name_prefix="decode")
        self._decoded: dict[str, Future[tuple[Image.Image, InputManifest]]] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mask-writer")

    def load_timings(self) -> dict[str, float]:
        """The backend's start-up seconds (e.g. ``build_s``, ``graph_capture_s``)."""
        return self.segmenter.load_timings()

    def prepare_group(self, jobs: list[Job], configs: dict[str, PipelineConfig]) -> None:
        """Start decoding the group's photos on threads (each job then waits only for its own), hand the images to
        the backend together where it batches them (one encoder pass), and ask the VLM for the first phrases of
        every query-mode job at once, so those requests overlap the SAM3 work."""
        for job in jobs:
            self._decoded[job.id] = self._decoders.submit(read_input, Path(job.run_dir))
        queries = [job for job in jobs if job.params.get("mode") == "query"]
        batches = type(self.segmenter).prefetch is not Segmenter.prefetch  # the default does nothing: don't wait
        if not queries and not batches:
            return
        images = {job.id: self._decoded[job.id].result()[0] for job in jobs}
        if queries:
            from pipeline.stages.agent.loop import propose_ahead  # needs openai: only imported in query mode

            if self._vlm_pool is None:
                self._vlm_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vlm-ahead")
            for job in queries:
                self._ahead[job.id] = propose_ahead(self._vlm_pool, images[job.id], job.params["query"],
                                                    config=configs[job.id], vlm_url=job.params["vlm_url"])
        if batches:
            self.segmenter.prefetch(list(images.values()))

    def _image(self, job: Job) -> tuple[Image.Image, InputManifest]:
        """The job's decoded photo: the one decoded ahead for its group, else decoded now."""
        ahead = self._decoded.pop(job.id, None)
        return ahead.result() if ahead is not None else read_input(Path(job.run_dir))

    def run(self, job: Job, config: PipelineConfig, reporter: Reporter) -> Future[dict[str, Any]]:
        """Segment one run's input image; returns (a future of) ``{"objects": N, "timings": {...}}``.

        Request-level keys (threshold, min_area_px, dedup_iou, max_objects, the agent and VLM sampling
        settings) come from ``config``, the run's own; the model is the one this worker was built with.
        """
        run_dir = Path(job.run_dir)
        seg = config.segment
        ahead = self._ahead.pop(job.id, None)  # its first VLM proposal, when prepare_group asked for it
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        image, stored = self._image(job)
        timings["read_image_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.segmenter.set_image(image)
        timings["set_image_s"] = time.perf_counter() - t0
        mode = job.params.get("mode", "prompt")
        reason = None
        if mode == "prompt":
            prompts = list(job.params["prompts"])
            reporter.progress(job.id, 0, 1, f"segmenting {len(prompts)} phrase(s)")
            t0 = time.perf_counter()
            detections = self.segmenter.predict(prompts)
            timings["predict_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            candidates = select_objects(
                detections,
                threshold=seg.threshold,
                min_area_px=seg.min_area_px,
                dedup_iou=seg.dedup_iou,
                max_objects=seg.max_objects,
            )
            timings["postprocess_s"] = time.perf_counter() - t0
            query = None
        else:
            from pipeline.stages.agent.loop import run_agent  # the agent needs openai: only imported in query mode

            query = job.params["query"]
            staging = fresh_dir(run_dir / f"{AGENT_DIR}.partial")
            t0 = time.perf_counter()
            outcome = run_agent(
                self.segmenter,
                image,
                query,
                config=config,
                vlm_url=job.params["vlm_url"],
                out_dir=staging,
                progress=lambda done, total, msg: reporter.progress(job.id, done, total, msg),
                proposal=ahead,
            )
            timings["agent_s"] = time.perf_counter() - t0
            replace_dir(staging, run_dir / AGENT_DIR)
            candidates, reason, prompts = outcome.candidates, outcome.reason, outcome.phrases

        def finish() -> dict[str, Any]:
            t0 = time.perf_counter()
            manifest = write_masks(run_dir, candidates, fingerprint=job.fingerprint, mode=mode, backend=seg.backend,
                                   query=query, prompts=prompts, reason=reason, image=stored, preview=image)
            timings["write_s"] = time.perf_counter() - t0
            reporter.progress(job.id, 1, 1, f"{len(manifest.objects)} object(s)")
            return {"objects": len(manifest.objects), "reason": manifest.reason, "timings": timings}

        # PNG compression and the manifest finish on the writer thread while the next job of the group already
        # runs on the model (see pipeline.stages.protocol: its done event comes when they are written)
        return self._writer.submit(finish)


if __name__ == "__main__":
    raise SystemExit(worker_main("segment", SegmentWorker))
