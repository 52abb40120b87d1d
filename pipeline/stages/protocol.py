"""The stage-worker protocol, shared by the driver (``pipeline.driver.runner``) and the workers.

A worker is started as ``<env python> -u -m pipeline.stages.<stage> --config <run>/config.json`` and
then reads **jobs** as JSON lines on stdin (or from ``--jobs FILE``) until EOF. It loads its model once,
before the first job, and writes **events** as JSON lines on its stdout:

    {"event": "ready", "pid": 123, "load_s": 7.4}
    {"event": "started", "job": "j1"}
    {"event": "progress", "job": "j1", "done": 2, "total": 5, "message": "object 2/5"}
    {"event": "done", "job": "j1", "result": {...}, "timings": {"total_s": 3.2}}
    {"event": "error", "job": "j1" | null, "message": "...", "hint": "...", "kind": "BackendError"}

Everything else the worker or its libraries print (Python or C level) goes to stderr, which the driver
writes to ``<run>/logs/<stage>.log``: at start the worker moves the real stdout to a private descriptor and
points descriptor 1 at stderr. Exit code: 0 if every job succeeded, 1 otherwise. One worker can serve
many jobs, so a batch mode can keep one warm worker per env.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

__all__ = ["Job", "Event", "Reporter", "StageWorker", "worker_main"]


class Job(BaseModel):
    """One unit of work for a worker: a run directory and stage-specific ``params``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    run_dir: str
    fingerprint: str
    params: dict[str, Any] = Field(default_factory=dict)


class Event(BaseModel):
    """One line a worker writes on its event channel."""

    model_config = ConfigDict(extra="allow")

    event: Literal["ready", "started", "progress", "done", "error"]
    job: str | None = None


class Reporter:
    """Writes events as JSON lines to the worker's private event channel."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def emit(self, event: str, job: str | None = None, **fields: Any) -> None:
        """Write one event and flush it."""
        self._stream.write(json.dumps({"event": event, "job": job, **fields}, default=str) + "\n")
        self._stream.flush()

    def progress(self, job: str, done: int, total: int, message: str = "") -> None:
        """Report ``done`` of ``total`` units of a job."""
        self.emit("progress", job, done=done, total=total, message=message)


class StageWorker(Protocol):
    """What a stage module provides: built once from the config, then ``run`` per job."""

    def run(self, job: Job, reporter: Reporter) -> dict[str, Any]:
        """Do one job, write its outputs, return a JSON-serialisable summary."""


def _take_event_channel() -> IO[str]:
    """Move the real stdout to a private descriptor; make fd 1 (and sys.stdout) point at stderr."""
    sys.stdout.flush()
    private = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(private, "w", buffering=1, encoding="utf-8")


def _jobs(source: IO[str]) -> Iterator[Job]:
    for line in source:
        if line.strip():
            yield Job.model_validate_json(line)


def _error_fields(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, PipelineError):
        return {"message": exc.message, "hint": exc.hint, "kind": type(exc).__name__}
    return {"message": f"{type(exc).__name__}: {exc}", "hint": None, "kind": type(exc).__name__}


def worker_main(stage: str, build: Callable[[PipelineConfig], StageWorker], argv: list[str] | None = None) -> int:
    """Entry point of every stage worker: parse args, build the worker once, serve jobs, report events."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{stage}")
    parser.add_argument("--config", required=True, type=Path, help="resolved config (JSON) of the run")
    parser.add_argument("--jobs", type=Path, help="file of JSON-line jobs (default: stdin)")
    args = parser.parse_args(argv)
    reporter = Reporter(_take_event_channel())
    config = PipelineConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    try:
        worker = build(config)
    except BaseException as exc:  # noqa: BLE001 - reported, then the worker exits non-zero
        traceback.print_exc()
        reporter.emit("error", None, **_error_fields(exc))
        return 1
    reporter.emit("ready", None, pid=os.getpid(), load_s=round(time.perf_counter() - t0, 3))
    ok = True
    source = open(args.jobs, encoding="utf-8") if args.jobs else sys.stdin
    with source:
        for job in _jobs(source):
            reporter.emit("started", job.id)
            t_job = time.perf_counter()
            try:
                result = worker.run(job, reporter)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - one failed job must not hide the others
                traceback.print_exc()
                reporter.emit("error", job.id, **_error_fields(exc))
                ok = False
                continue
            reporter.emit("done", job.id, result=result, timings={"total_s": round(time.perf_counter() - t_job, 3)})
    return 0 if ok else 1
