"""The FastAPI app: REST API over one warm engine, server-sent events, files, and the web page.

``create_app(config, settings, engine_factory)`` builds the app; the engine is started in the app's lifespan
and closed when the server stops. Every ``/api`` route requires the bearer token when one is set. Work that
could block (decoding an upload's header, handing a request to the engine, zipping a run) runs in a thread,
so one slow client never stalls the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import tempfile
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from pipeline.atomic import write_bytes_atomic
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

from .health import gpu_memory
from .jobs import TERMINAL, Job, JobStore, new_job_id
from .security import BodyLimit, require_token
from .uploads import UploadRejected, inspect_upload
from .views import export_files, job_detail, job_summary, list_files

__all__ = ["WebSettings", "EngineFactory", "create_app", "STATIC_DIR"]

log = logging.getLogger("pipeline.web")
STATIC_DIR = Path(__file__).resolve().parent / "static"
EngineFactory = Callable[[PipelineConfig, Callable[[Any], None]], Any]
Frame = Literal["opencv", "opengl", "pytorch3d"]
_HEARTBEAT_S = 15.0


@dataclass(frozen=True)
class WebSettings:
    """Server settings (``python -m pipeline serve`` flags). Sizes in bytes and pixels."""

    jobs_root: Path
    token: str | None = None
    demo: bool = False
    max_upload_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_queue: int = 16
    cors_origins: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()  # non-empty: refuse other Host headers (DNS-rebinding guard on loopback)
    extra: dict[str, Any] = field(default_factory=dict)


def _error(status: int, message: str, hint: str | None = None, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": message, "hint": hint}, headers=headers)


def _with_overrides(config: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    from pipeline.config import apply_overrides

    return apply_overrides(config, overrides) if overrides else config


class JobService:
    """Creates jobs (upload checks, run directory, engine submission) and answers questions about them."""

    def __init__(self, config: PipelineConfig, settings: WebSettings, store: JobStore) -> None:
        self.config = config
        self.settings = settings
        self.store = store
        self.engine: Any = None
        self._submit_lock = asyncio.Lock()

    async def submit(self, data: bytes, *, client_name: str | None, query: str | None, prompt: str | None,
                     options: dict[str, Any], source: str = "api") -> Job:
        """Validate and queue one job; raises HTTPException with a one-line error and a hint."""
        query = query.strip() if query is not None else None
        from pipeline.driver.runner import check_request_text, split_phrases

        if (query is None or not query) == (not split_phrases(prompt)):
            raise _error(422, "give exactly one of 'query' or 'prompt'",
                         "prompt: noun phrases for the segmenter ('red cube, blue ball'); query: a sentence for the VLM agent")
        try:  # the limits of run.limits, as on the command line
            text = check_request_text(query or None, prompt, self.config.run.limits)
        except PipelineError as exc:
            raise _error(422, exc.message, exc.hint) from None
        prompts = text.prompts
        if query and self.settings.demo:
            raise _error(422, "query mode needs the VLM, which the demo server does not run",
                         "use a prompt: any phrase gets the photo's salient objects, colour words ('red, white') pick among them")
        try:
            info = await run_in_threadpool(inspect_upload, data, max_pixels=self.settings.max_pixels)
        except UploadRejected as exc:
            raise _error(exc.status, exc.message, exc.hint) from None
        overrides = [f"{key}={value}" for key, value in (
            ("segment.threshold", options.get("threshold")), ("segment.max_objects", options.get("max_objects")),
            ("reconstruct.seed", options.get("seed")), ("reconstruct.frame", options.get("frame")),
            ("reconstruct.exports", options.get("export"))) if value is not None]
        try:
            config = _with_overrides(self.config, overrides)
        except PipelineError as exc:
            raise _error(422, exc.message, exc.hint) from None
        async with self._submit_lock:
            if self.store.active_count() >= self.settings.max_queue:
                raise _error(429, f"the queue is full ({self.settings.max_queue} jobs queued or running)",
                             "try again when a job has finished", headers={"Retry-After": "10"})
            job_id = new_job_id()
            run_dir = self.store.root / job_id
            upload = run_dir / "upload" / f"image.{info.ext}"
            await run_in_threadpool(write_bytes_atomic, upload, data)
            self.engine.sources.seed(upload, info.sha256, info.facts, written_here=True)
            name = Path(client_name or "").name[:120] or None  # shown to the user only, never a path
            job = self.store.create(job_id, {
                "mode": "query" if query else "prompt", "query": query or None, "prompts": list(prompts),
                "notes": list(text.notes),
                "options": {k: v for k, v in options.items() if v is not None}, "source": source,
                "demo": self.settings.demo,
                "upload": {"name": name, "format": info.format, "bytes": info.bytes, "width": info.width, "height": info.height},
            })
            from pipeline.driver.runner import RunRequest

            request = RunRequest(run_dir=run_dir, image=upload, query=query or None, prompts=prompts, config=config,
                                 notes=text.notes)
            try:
                job.handle = await run_in_threadpool(self.engine.submit, request)
            except PipelineError as exc:
                self.store.discard(job_id)
                raise _error(422, exc.message, exc.hint) from None
        log.info("job %s queued (%s, %s, %d bytes)", job_id, job.record["mode"], info.format, info.bytes)
        return job

    def waiting(self, job: Job) -> str | None:
        """What a queued or starting job waits for, in words (None once it runs)."""
        if job.state == "queued":
            ahead = self.store.queue_position(job) or 0
            return f"waiting for the GPU worker: {ahead} job(s) ahead" if ahead else "waiting for the GPU worker to pick it up"
        if job.state == "running" and job.record.get("stage"):
            try:
                stage = (self.engine.health().get("stages") or {}).get(job.record["stage"], {})
            except Exception:  # noqa: BLE001 - health is advisory here
                return None
            if stage.get("state") in ("not started", "loading"):
                return f"loading the {job.record['stage']} model (the first job after a start waits for it)"
        return None


def _safe_path(run_dir: Path, rel: str) -> Path:
    """``run_dir/rel`` if it is a regular file inside ``run_dir`` reached without symlinks; else HTTP 400/404."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise _error(400, "file paths are relative to the run directory, without '..' or hidden names",
                     "use a path from the job's 'files' list")
    path = run_dir
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise _error(404, f"no such file in this job: {rel}")
    try:
        resolved = path.resolve(strict=True)
        resolved.relative_to(run_dir.resolve())
    except (OSError, ValueError):
        raise _error(404, f"no such file in this job: {rel}") from None
    if not resolved.is_file():
        raise _error(404, f"no such file in this job: {rel}")
    return resolved


def _zip_run(run_dir: Path, files: list[str]) -> Path:
    """A temporary zip of ``files`` (relative to ``run_dir``), under the run directory's name."""
    fd, name = tempfile.mkstemp(suffix=".zip", prefix="pipeline-job-")
    import os

    os.close(fd)
    with zipfile.ZipFile(name, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=4) as zf:
        for rel in files:
            zf.write(run_dir / rel, f"{run_dir.name}/{rel}")
    return Path(name)


def _sse(event: dict[str, Any]) -> bytes:
    return f"id: {event['seq']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode()


def _index_html() -> str:
    index = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if not (STATIC_DIR / "vendor" / "versions.json").exists():
        note = ('<div class="fatal">The page\'s 3D libraries are not built. Run '
                '<code>npm ci --prefix web &amp;&amp; npm run --prefix web build</code> and reload. The REST API works '
                'without them (see <a href="/docs">/docs</a>).</div>')
        index = index.replace("<body>", "<body>" + note, 1)
    return index


def create_app(config: PipelineConfig, settings: WebSettings, engine_factory: EngineFactory) -> FastAPI:
    """Build the app. ``engine_factory(config, on_event)`` returns an engine (started in the lifespan)."""
    store = JobStore(settings.jobs_root)
    store.load()
    service = JobService(config, settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.bind_loop(asyncio.get_running_loop())
        engine = engine_factory(config, store.on_event)
        service.engine = await run_in_threadpool(engine.__enter__)
        try:
            yield
        finally:
            stopped = store.interrupt_active()  # before close: the engine's own "cancelled" events are then ignored
            if stopped:
                log.info("%d unfinished job(s) marked interrupted", stopped)
            store.bind_loop(None)  # type: ignore[arg-type]
            await run_in_threadpool(engine.close)

    app = FastAPI(title="image → 3D objects", version="1", lifespan=lifespan,
                  description="Upload an image with a prompt or a query; get masks, Gaussian splats (PLY) and meshes (GLB).")
    app.state.service = service
    app.state.store = store
    api = APIRouter(prefix="/api", dependencies=[Depends(require_token(settings.token))])

    def get_job(job_id: str) -> Job:
        job = store.get(job_id)
        if job is None:
            raise _error(404, f"no job {job_id!r}", "list the jobs with GET /api/jobs")
        return job

    @api.post("/jobs", status_code=202, summary="Submit an image with a prompt or a query")
    async def submit_job(
        image: UploadFile = File(..., description="JPEG, PNG, WebP, BMP or TIFF; type detected from the content"),
        query: str | None = Form(None, description="a sentence for the VLM agent (query mode)"),
        prompt: str | None = Form(None, description="noun phrases for the segmenter, comma-separated (prompt mode)"),
        threshold: float | None = Form(None, ge=0.0, le=1.0, description="segment.threshold"),
        max_objects: int | None = Form(None, ge=1, le=100, description="segment.max_objects"),
        seed: int | None = Form(None, ge=0, le=2**31 - 1, description="reconstruct.seed (object i gets seed + i)"),
        frame: Frame | None = Form(None, description="reconstruct.frame of the scene files"),
        export: str | None = Form(None, max_length=100,
                                  description="reconstruct.exports: more formats, comma-separated (obj, stl, usdz, glb-textured)"),
    ) -> JSONResponse:
        data = await image.read()
        job = await service.submit(data, client_name=image.filename, query=query, prompt=prompt,
                                   options={"threshold": threshold, "max_objects": max_objects, "seed": seed, "frame": frame,
                                            "export": export or None})
        body = job_summary(job, queue_position=store.queue_position(job))
        return JSONResponse(body, status_code=202, headers={"Location": body["urls"]["self"]})

    @api.get("/jobs", summary="Every job, newest first")
    async def list_jobs() -> list[dict[str, Any]]:
        return [job_summary(j, queue_position=store.queue_position(j)) for j in store.all()]

    @api.get("/jobs/{job_id}", summary="A job: state, stage, timings, objects, agent decisions, files")
    async def get_job_detail(job_id: str) -> dict[str, Any]:
        job = get_job(job_id)
        return await run_in_threadpool(job_detail, job, queue_position=store.queue_position(job), waiting=service.waiting(job))

    @api.get("/jobs/{job_id}/events", summary="Server-sent events of the job's progress (replayed from the start)",
             response_class=StreamingResponse)
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        get_job(job_id)
        last = request.headers.get("last-event-id", "0")
        start = int(last) if last.isdigit() else 0

        async def stream() -> AsyncIterator[bytes]:
            seq = start
            yield b"retry: 2000\n\n"
            while True:
                waiter = store.waiter(job_id)
                events, done = store.events_since(job_id, seq)
                for event in events:
                    seq = event["seq"]
                    yield _sse(event)
                if done and not events:
                    store.drop_waiter(job_id, waiter)
                    return
                if events:
                    store.drop_waiter(job_id, waiter)
                    continue
                try:
                    await asyncio.wait_for(waiter.wait(), timeout=_HEARTBEAT_S)
                except asyncio.TimeoutError:
                    store.drop_waiter(job_id, waiter)
                    yield b": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.delete("/jobs/{job_id}", status_code=202, summary="Cancel a job (queued: dropped; running: its worker stopped)")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = get_job(job_id)
        if job.done:
            raise _error(409, f"job {job_id} has already {job.state}", "nothing to cancel")
        was_queued = job.state == "queued"
        cancelled = bool(job.handle is not None and await run_in_threadpool(job.handle.cancel))
        if cancelled and was_queued:
            store.mark(job_id, "cancelled", error="cancelled before it started")
        elif cancelled:
            await store.wait_done(job_id, timeout_s=60.0)
        return job_summary(job)

    @api.get("/jobs/{job_id}/files/{path:path}", summary="A file of the job's run directory", response_class=FileResponse)
    async def job_file(job_id: str, path: str) -> FileResponse:
        job = get_job(job_id)
        target = _safe_path(job.dir, path)
        media = {".glb": "model/gltf-binary", ".ply": "application/octet-stream", ".json": "application/json",
                 ".log": "text/plain; charset=utf-8"}.get(target.suffix) or mimetypes.guess_type(target.name)[0]
        return FileResponse(target, media_type=media or "application/octet-stream",
                            headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})

    @api.get("/jobs/{job_id}/zip", summary="The job's run directory as a zip, or only one export format's files",
             response_class=FileResponse)
    async def job_zip(job_id: str, format: str | None = None) -> FileResponse:  # noqa: A002 - the query parameter's name
        job = get_job(job_id)
        if not job.done:
            raise _error(409, f"job {job_id} is still {job.state}", "download the zip once the job has finished")
        if format is None:
            files = await run_in_threadpool(list_files, job.dir)
        else:
            files = export_files(job.dir, format)
            if not files:
                raise _error(404, f"job {job_id} has no {format!r} files",
                             f"submit it with export={format}, or run: python -m pipeline export RUN_DIR --formats {format}")
        path = await run_in_threadpool(_zip_run, job.dir, files)
        name = f"{job_id}-{format}.zip" if format else f"{job_id}.zip"
        return FileResponse(path, media_type="application/zip", filename=name,
                            background=BackgroundTask(path.unlink, missing_ok=True))

    @api.get("/health", summary="Workers' states, envs, GPU memory, queue length")
    async def health() -> dict[str, Any]:
        engine_health: dict[str, Any] = {}
        if service.engine is not None:
            engine_health = await run_in_threadpool(service.engine.health)
        jobs = store.all()
        return {
            "status": "ok",
            "demo": settings.demo,
            "engine": engine_health,
            "envs": {s: {"env": config.stage(s).env, "kind": config.env_for(config.stage(s).env).kind,
                         "backend": config.stage(s).backend} for s in ("segment", "reconstruct")},
            "gpus": await run_in_threadpool(gpu_memory),
            "jobs": {"queued": sum(j.state == "queued" for j in jobs), "running": sum(j.state == "running" for j in jobs),
                     "finished": sum(j.state in TERMINAL for j in jobs)},
            "limits": {"max_queue": settings.max_queue, "max_upload_bytes": settings.max_upload_bytes,
                       "max_pixels": settings.max_pixels},
        }

    from .compat import add_generate_3d

    add_generate_3d(api, service)
    app.include_router(api)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(await run_in_threadpool(_index_html), headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])
    if settings.trusted_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.trusted_hosts))
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes + 64 * 1024)  # multipart framing on top
    return app
