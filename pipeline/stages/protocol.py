"""The stage-worker protocol, shared by the driver (``pipeline.driver.runner``) and the workers.

A worker is started as ``<env python> -u -m pipeline.stages.<stage> --config FILE`` and then reads **jobs**
as JSON lines on stdin (or from ``--jobs FILE``) until EOF. ``FILE`` is the config the model is built from,
once, before the first job. Each job may name its run's own config (``config``: the run's ``config.json``),
whose request-level keys (thresholds, seeds, frame, agent settings) the job then uses; the driver starts a new
worker when a run needs a different model (see :func:`pipeline.driver.workers.load_key`). A line may also be
``{"group": [job, job, ...]}``: jobs the worker may prepare together (e.g. one batched image encoder pass)
before running each; every job still gets its own events. The worker writes **events** as JSON lines on its
stdout:

    {"event": "ready", "pid": 123, "load_s": 7.4, "timings": {"graph_capture_s": 1.2}}
    {"event": "started", "job": "j1"}
    {"event": "progress", "job": "j1", "done": 2, "total": 5, "message": "object 2/5"}
    {"event": "done", "job": "j1", "result": {...}, "timings": {"total_s": 3.2}}
    {"event": "error", "job": "j1" | null, "message": "...", "hint": "...", "kind": "BackendError"}

A job's ``run`` may return a :class:`concurrent.futures.Future` of its result instead of the result: its last
step (e.g. compressing mask PNGs and writing the manifest) then finishes on a thread while the next job of the
group already runs, and its ``done`` (or ``error``) event is written when that future completes, so a job's
``started`` may come before the previous job's ``done``. A group's line is answered in full (every job done or
failed) before the next line is read.

Everything else the worker or its libraries print (Python or C level) goes to stderr: at start the worker
moves the real stdout to a private descriptor and points descriptor 1 at stderr. While a job that names a
``log`` file runs, descriptors 1 and 2 are pointed at that file (``<run>/logs/<stage>.log``), so each run
keeps the full output of its own job; between jobs they go to the worker's own log. Exit code: 0 if every
job succeeded, 1 otherwise. The worker exits within a second of its driver's death (it watches its parent
pid), so a killed driver never leaves a worker computing on its own.

A driver that starts a worker for **one run** (the one-shot commands) sets ``PIPELINE_SINGLE_RUN=1`` in its
environment (:func:`serves_single_run`): backends then skip start-up work that only pays off over many runs,
such as SAM3's CUDA graph capture.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, wait
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

__all__ = ["Job", "Event", "Reporter", "StageWorker", "worker_main", "SINGLE_RUN_VARIABLE", "serves_single_run"]

SINGLE_RUN_VARIABLE = "PIPELINE_SINGLE_RUN"  # "1": the driver started this worker for one run


def serves_single_run() -> bool:
    """Whether the driver started this worker for a single run (see the module docstring)."""
    return os.environ.get(SINGLE_RUN_VARIABLE) == "1"


class Job(BaseModel):
    """One unit of work for a worker: a run directory and stage-specific ``params``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    run_dir: str
    fingerprint: str
    params: dict[str, Any] = Field(default_factory=dict)
    config: str | None = None  # the run's resolved config (JSON); None: the worker's own
    log: str | None = None  # the run's log for this stage; None: the worker's own stderr


class Event(BaseModel):
    """One line a worker writes on its event channel."""

    model_config = ConfigDict(extra="allow")

    event: Literal["ready", "started", "progress", "done", "error"]
    job: str | None = None


class Reporter:
    """Writes events as JSON lines to the worker's private event channel."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # jobs finishing on threads emit too: one whole line at a time

    def emit(self, event: str, job: str | None = None, **fields: Any) -> None:
        """Write one event and flush it."""
        line = json.dumps({"event": event, "job": job, **fields}, default=str) + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()

    def progress(self, job: str, done: int, total: int, message: str = "") -> None:
        """Report ``done`` of ``total`` units of a job."""
        self.emit("progress", job, done=done, total=total, message=message)


class StageWorker(Protocol):
    """What a stage module provides: built once from the config, then ``run`` per job.

    ``run`` receives the job's config (the run's own, or the worker's when the job names none). A worker may
    also define ``prepare_group(jobs, configs)``, called once before the jobs of a group run, and
    ``load_timings()`` (seconds per start-up step, e.g. graph capture), sent with the ``ready`` event.
    """

    def run(self, job: Job, config: PipelineConfig, reporter: Reporter) -> dict[str, Any] | Future[dict[str, Any]]:
        """Do one job, write its outputs, return a JSON-serialisable summary (or a future of it, see above)."""


def _take_event_channel() -> IO[str]:
    """Move the real stdout to a private descriptor; make fd 1 (and sys.stdout) point at stderr."""
    sys.stdout.flush()
    private = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(private, "w", buffering=1, encoding="utf-8")


def _groups(source: IO[str]) -> Iterator[list[Job]]:
    """Each input line as a list of jobs: one for a plain job line, several for ``{"group": [...]}``."""
    for line in source:
        if not line.strip():
            continue
        data = json.loads(line)
        items = data["group"] if isinstance(data, dict) and "group" in data else [data]
        yield [Job.model_validate(item) for item in items]


def _job_config(job: Job, default: PipelineConfig) -> PipelineConfig:
    if job.config is None:
        return default
    return PipelineConfig.model_validate_json(Path(job.config).read_text(encoding="utf-8"))


@contextmanager
def _output_to(log: str | None) -> Iterator[None]:
    """Point descriptors 1 and 2 at ``log`` (appending) for the block; a no-op for None."""
    if log is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _watch_parent(interval_s: float = 0.2) -> None:
    """Kill this worker's process group as soon as its parent (the driver) is gone.

    Two layers: the kernel's parent-death signal (Linux ``prctl``; SIGKILL as soon as the parent dies) and a
    thread that polls the parent pid, for platforms without ``prctl`` and for grandchildren in the group.
    """
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    if os.getppid() == parent and parent != 1:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


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
    _watch_parent()
    reporter = Reporter(_take_event_channel())
    config = PipelineConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    try:
        worker = build(config)
    except BaseException as exc:  # noqa: BLE001 - reported, then the worker exits non-zero
        traceback.print_exc()
        reporter.emit("error", None, **_error_fields(exc))
        return 1
    load_s = round(time.perf_counter() - t0, 3)
    load_timings = getattr(worker, "load_timings", None)
    reporter.emit("ready", None, pid=os.getpid(), load_s=load_s, timings=load_timings() if load_timings else {})
    ok = True
    source = open(args.jobs, encoding="utf-8") if args.jobs else sys.stdin
    with source:
        for group in _groups(source):
            ok = _serve_group(worker, group, config, reporter) and ok
    return 0 if ok else 1


def _serve_group(worker: StageWorker, group: list[Job], default: PipelineConfig, reporter: Reporter) -> bool:
    """Run the jobs of one input line; True when all succeeded. A failed job never stops the others."""
    configs: dict[str, PipelineConfig] = {}
    failed: set[str] = set()
    for job in group:
        try:
            configs[job.id] = _job_config(job, default)
        except (OSError, ValueError) as exc:
            reporter.emit("error", job.id, message=f"cannot read the job's config {job.config}: {exc}", hint=None, kind="InputError")
            failed.add(job.id)
    prepare = getattr(worker, "prepare_group", None)
    if prepare is not None and len(configs) > 1:
        try:
            prepare([j for j in group if j.id in configs], configs)
        except Exception:  # noqa: BLE001 - preparing is an optimisation: each job then does its own work
            traceback.print_exc()
    finishing: list[Future[dict[str, Any]]] = []
    for job in group:
        if job.id in failed:
            continue
        reporter.emit("started", job.id)
        t_job = time.perf_counter()
        try:
            with _output_to(job.log):
                result = worker.run(job, configs[job.id], reporter)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - one failed job must not hide the others
            _report_failure(job, exc, reporter, failed)
            continue
        if isinstance(result, Future):
            result.add_done_callback(lambda fut, job=job, t_job=t_job: _report_end(job, fut, t_job, reporter, failed))
            finishing.append(result)
        else:
            reporter.emit("done", job.id, result=result, timings={"total_s": round(time.perf_counter() - t_job, 3)})
    wait(finishing)
    return not failed


def _report_end(job: Job, fut: Future[dict[str, Any]], t_job: float, reporter: Reporter, failed: set[str]) -> None:
    """The ``done`` or ``error`` event of a job whose result came as a future (called when it completes)."""
    exc = fut.exception()
    if exc is not None:
        _report_failure(job, exc, reporter, failed)
        return
    reporter.emit("done", job.id, result=fut.result(), timings={"total_s": round(time.perf_counter() - t_job, 3)})


def _report_failure(job: Job, exc: BaseException, reporter: Reporter, failed: set[str]) -> None:
    """Append the traceback to the job's own log (not fd 2: another job may own it by now); emit its error."""
    if job.log is None:
        traceback.print_exception(exc, file=sys.stderr)
    else:
        sys.stderr.flush()
        with open(job.log, "a", encoding="utf-8") as log:
            traceback.print_exception(exc, file=log)
    reporter.emit("error", job.id, **_error_fields(exc))
    failed.add(job.id)
