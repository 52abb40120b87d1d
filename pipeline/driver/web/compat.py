"""``POST /api/generate_3d``: the replaced project's endpoint, answered from a job so its users' scripts work.

Request (multipart, as before): ``image``, ``text_prompt`` (required), ``seed`` (42), ``max_objects``
(50, clamped to 1..100). The text prompt goes to the segmenter as one phrase (prompt mode, as the old server
did). Unlike the old server the work runs in the engine, not in the request handler: this handler only waits
(asynchronously) for the job, so the server keeps answering other requests meanwhile.

Response ``GenerationResponse``: ``success``, ``job_id``, ``message``, ``num_objects``, ``glb_url`` /
``ply_url`` (the composed scene), ``obj_url`` (null unless ``reconstruct.sam3d.export_obj``), ``mask_url``
(the first object's mask; the old server's combined mask has no equivalent file), ``preview_url``,
``objects[{index, ply_url, glb_url, obj_url, mask_url}]``, ``elapsed_time`` (seconds). URLs point at
``/api/jobs/<id>/files/...`` instead of ``/objects/<id>/<file>``. Errors: 400 (bad input, no object found),
429 (queue full), 500 (the job failed; the message is its error line).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from .views import job_detail

if TYPE_CHECKING:  # pragma: no cover
    from .app import JobService

__all__ = ["GenerationResponse", "CompatObject", "add_generate_3d"]


class CompatObject(BaseModel):
    index: int
    ply_url: str | None = None
    glb_url: str | None = None
    obj_url: str | None = None
    mask_url: str | None = None


class GenerationResponse(BaseModel):
    success: bool
    job_id: str
    message: str
    num_objects: int = 0
    glb_url: str | None = None
    obj_url: str | None = None
    ply_url: str | None = None
    mask_url: str | None = None
    preview_url: str | None = None
    objects: list[CompatObject] = []
    elapsed_time: float = 0.0


def _response(detail: dict[str, Any], elapsed: float) -> GenerationResponse:
    objects = [o for o in detail["objects"] if o.get("files")]
    scene = detail["scene"]
    return GenerationResponse(
        success=True,
        job_id=detail["id"],
        message=f"generated {len(objects)} object(s)",
        num_objects=len(objects),
        glb_url=scene.get("scene_glb_url"),
        ply_url=scene.get("scene_ply_url"),
        obj_url=None,
        mask_url=objects[0].get("mask_url") if objects else None,
        preview_url=scene.get("preview_png_url"),
        objects=[CompatObject(index=i, ply_url=o["files"].get("gaussians.ply"), glb_url=o["files"].get("mesh.glb"),
                              obj_url=o["files"].get("mesh.obj"), mask_url=o.get("mask_url"))
                 for i, o in enumerate(objects)],
        elapsed_time=round(elapsed, 3),
    )


def add_generate_3d(router: APIRouter, service: JobService) -> None:
    """Register ``POST /generate_3d`` on ``router`` (mounted under /api)."""

    @router.post("/generate_3d", response_model=GenerationResponse,
                 summary="Compatibility endpoint of the replaced project (waits for the job)")
    async def generate_3d(
        image: UploadFile = File(...),
        text_prompt: str = Form(..., min_length=1, max_length=500),
        seed: int = Form(42, ge=0, le=2**31 - 1),
        max_objects: int = Form(50),
    ) -> GenerationResponse:
        t0 = time.monotonic()
        data = await image.read()
        try:
            job = await service.submit(data, client_name=image.filename, query=None, prompt=text_prompt.replace(",", " "),
                                       options={"seed": seed, "max_objects": min(max(max_objects, 1), 100)},
                                       source="generate_3d")
        except HTTPException as exc:
            if exc.status_code in (413, 415, 422):
                raise HTTPException(status_code=400, detail=exc.detail) from None
            raise
        job = await service.store.wait_done(job.id)
        detail = await run_in_threadpool(job_detail, job)
        if job.state != "succeeded":
            raise HTTPException(status_code=500, detail={"error": job.record.get("error") or f"job {job.state}",
                                                         "hint": job.record.get("hint"), "job_id": job.id})
        response = _response(detail, time.monotonic() - t0)
        if response.num_objects == 0:
            raise HTTPException(status_code=400, detail={"error": f"no object matches {text_prompt!r}",
                                                         "hint": detail.get("segment_reason"), "job_id": job.id})
        return response
