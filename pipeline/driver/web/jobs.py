"""The web app's job store: one run directory per job under a root folder, so jobs survive a restart.

Layout of a job (its run directory, see README "Run directory contract", plus two web files)::

    <root>/<job id>/job.json            JobRecord: what was asked, state, error, timestamps (written atomically)
    <root>/<job id>/upload/image.<ext>  the uploaded bytes as received (name chosen here, never the client's)
    <root>/<job id>/run.json, input/, masks/, objects/, scene/, agent/, logs/   the run itself

States: ``queued`` → ``running`` → ``succeeded`` | ``failed`` | ``cancelled``; ``interrupted`` is given on
start-up to a job that was queued or running when the server stopped. Interrupted jobs are **not** resumed:
a restart often follows a crash or an out-of-memory caused by one of them, and silently re-running work the
user may no longer want would hold the GPU; the job page says so and the user can submit it again.

Engine events arrive on engine threads (:meth:`JobStore.on_event`); the store keeps each job's event list in
memory and wakes the asyncio waiters of the server's loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.atomic import write_json_atomic

__all__ = ["INTERRUPTED_ERROR", "INTERRUPTED_HINT", "JOB_RECORD", "TERMINAL", "JobState", "Job", "JobStore", "new_job_id"]

JOB_RECORD = "job.json"
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
_EVENT_STATE = {"queued": "queued", "started": "running", "succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}
_SCHEMA_VERSION = 1


INTERRUPTED_ERROR = "interrupted: the server stopped before this job finished"
INTERRUPTED_HINT = "submit the image again"


def new_job_id() -> str:
    """12 hex characters of a random UUID (never derived from client input)."""
    return uuid.uuid4().hex[:12]


@dataclass
class Job:
    """One job: its persisted record (``record``, the content of job.json) plus in-memory events."""

    id: str
    dir: Path
    record: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    handle: Any = None  # the engine's RunHandle while this server process owns the job

    @property
    def state(self) -> str:
        return str(self.record["state"])

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


class JobStore:
    """Jobs by id, backed by ``<root>/<id>/job.json``; thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, list[asyncio.Event]] = {}

    # ------------------------------------------------------------------ start-up

    def load(self) -> int:
        """Read every ``job.json`` under the root; mark unfinished ones ``interrupted``. Returns the count."""
        for path in sorted(self.root.glob(f"*/{JOB_RECORD}")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue  # a half-deleted job: not listed
            if not isinstance(record, dict) or record.get("schema_version") != _SCHEMA_VERSION or "id" not in record:
                continue
            job = Job(id=str(record["id"]), dir=path.parent, record=record)
            if job.state not in TERMINAL:
                record.update(
                    state="interrupted",
                    stage=None,
                    finished=time.time(),
                    error=INTERRUPTED_ERROR,
                    hint=INTERRUPTED_HINT,
                )
                self._persist(job)
            job.events.append(self._event(job, record["state"], message=record.get("error") or ""))
            self._jobs[job.id] = job
        return len(self._jobs)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The asyncio loop whose waiters :meth:`on_event` wakes."""
        self._loop = loop

    # ------------------------------------------------------------------ jobs

    def create(self, job_id: str, record: dict[str, Any]) -> Job:
        """Register a new job (its directory must exist) in state ``queued`` and write job.json."""
        record = {"schema_version": _SCHEMA_VERSION, "id": job_id, "state": "queued", "stage": None,
                  "created": time.time(), "started": None, "finished": None, "error": None, "hint": None,
                  "progress": None, **record}
        job = Job(id=job_id, dir=self.root / job_id, record=record)
        with self._lock:
            self._persist(job)
            self._jobs[job_id] = job
        return job

    def discard(self, job_id: str) -> None:
        """Forget a job that never reached the engine and delete its directory."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is not None:
            shutil.rmtree(job.dir, ignore_errors=True)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        """Every job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.record["created"], reverse=True)

    def active_count(self) -> int:
        """Jobs queued or running (what the queue bound counts)."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.state in ("queued", "running"))

    def queue_position(self, job: Job) -> int | None:
        """How many unfinished jobs were submitted before this queued one (None unless queued)."""
        if job.state != "queued":
            return None
        with self._lock:
            return sum(1 for j in self._jobs.values()
                       if j.state in ("queued", "running") and j.record["created"] < job.record["created"])

    def events_since(self, job_id: str, seq: int) -> tuple[list[dict[str, Any]], bool]:
        """Events with ``seq`` greater than ``seq``, and whether the job has finished."""
        with self._lock:
            job = self._jobs[job_id]
            return [e for e in job.events if e["seq"] > seq], job.done

    def mark(self, job_id: str, state: str, *, error: str | None = None, hint: str | None = None) -> None:
        """Set a state from the server side (e.g. ``cancelled`` for a job the engine dropped)."""
        with self._lock:
            job = self._jobs[job_id]
            if job.done:
                return
            self._apply(job, state, stage=None, error=error, hint=hint)
            job.events.append(self._event(job, state, message=error or ""))
        self._wake(job_id)

    def interrupt_active(self) -> int:
        """Mark every queued or running job ``interrupted`` (the server is stopping); returns how many."""
        with self._lock:
            active = [j.id for j in self._jobs.values() if not j.done]
        for job_id in active:
            self.mark(job_id, "interrupted", error=INTERRUPTED_ERROR, hint=INTERRUPTED_HINT)
        return len(active)

    # ------------------------------------------------------------------ engine events

    def on_event(self, event: Any) -> None:
        """Engine callback (any thread): record the event, update the job's state, wake its waiters."""
        job_id = Path(event.run_dir).name
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return
            kind = str(event.kind)
            payload = self._event(job, kind, stage=event.stage, done=event.done, total=event.total,
                                  message=event.message, at=event.time)
            job.events.append(payload)
            if kind in _EVENT_STATE:
                error = event.message if kind == "failed" else None
                hint = getattr(getattr(job.handle, "error", None), "hint", None) if kind == "failed" else None
                self._apply(job, _EVENT_STATE[kind], stage=None if kind != "started" else job.record["stage"],
                            error=error, hint=hint)
            elif kind in ("stage_started", "progress"):
                job.record["stage"] = event.stage
                job.record["progress"] = {"stage": event.stage, "done": event.done, "total": event.total,
                                          "message": event.message}
                if job.record["state"] == "queued":
                    self._apply(job, "running", stage=event.stage)
        self._wake(job_id)

    def _apply(self, job: Job, state: str, *, stage: str | None, error: str | None = None, hint: str | None = None) -> None:
        record = job.record
        record["state"] = state
        record["stage"] = stage
        if state == "running" and record["started"] is None:
            record["started"] = time.time()
        if state in TERMINAL:
            record["finished"] = time.time()
            record["progress"] = None
            if error:
                record["error"] = error
            if hint:
                record["hint"] = hint
        self._persist(job)

    @staticmethod
    def _event(job: Job, kind: str, *, stage: str | None = None, done: int = 0, total: int = 0,
               message: str = "", at: float | None = None) -> dict[str, Any]:
        return {"seq": len(job.events) + 1, "job": job.id, "kind": kind, "stage": stage, "done": done,
                "total": total, "message": message, "time": at if at is not None else time.time()}

    @staticmethod
    def _persist(job: Job) -> None:
        if job.dir.is_dir():
            write_json_atomic(job.dir / JOB_RECORD, job.record)

    # ------------------------------------------------------------------ waiting (server loop only)

    def waiter(self, job_id: str) -> asyncio.Event:
        """An event set at the job's next change; register it *before* reading events to miss none."""
        ev = asyncio.Event()
        self._waiters.setdefault(job_id, []).append(ev)
        return ev

    def drop_waiter(self, job_id: str, ev: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id, [])
        if ev in waiters:
            waiters.remove(ev)

    def _wake(self, job_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._set_waiters, job_id)
        except RuntimeError:  # the loop closed meanwhile (server shutting down)
            pass

    def _set_waiters(self, job_id: str) -> None:
        for ev in self._waiters.pop(job_id, []):
            ev.set()

    async def wait_done(self, job_id: str, timeout_s: float | None = None) -> Job:
        """Wait (without blocking the loop) until the job finishes; returns it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            ev = self.waiter(job_id)
            job = self.get(job_id)
            assert job is not None
            if job.done:
                self.drop_waiter(job_id, ev)
                return job
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise TimeoutError(job_id)
            try:
                await asyncio.wait_for(ev.wait(), timeout=min(remaining or 30.0, 30.0))
            except asyncio.TimeoutError:
                self.drop_waiter(job_id, ev)
