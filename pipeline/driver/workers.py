"""Driver side of the stage-worker protocol (:mod:`pipeline.stages.protocol`).

:class:`WorkerProcess` starts one stage worker in its env, waits for it to load its model, submits jobs (one,
or a group the worker may prepare together) and turns its events into progress callbacks, results or
:class:`~pipeline.errors.StageFailed`. A reader thread queues the worker's events, so a wait can end on a time
limit or a cancel: the worker is then stopped (its whole process group) and must be started again.
:func:`load_key` says when a run needs a different worker: the model-building part of its config changed.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.driver.envs import Env
from pipeline.driver.fingerprint import canonical_json
from pipeline.driver.proc import spawn, stop_process_group, tail_lines
from pipeline.errors import PipelineError, RunCancelled, StageFailed
from pipeline.stages.protocol import Job

__all__ = ["WorkerProcess", "JobOutcome", "ProgressCallback", "load_key", "REQUEST_KEYS"]

ProgressCallback = Callable[[str, int, int, str], None]  # (job id, done, total, message)
TAIL_LINES = 20
_POLL_S = 0.1

# Keys of a stage's config section that each job reads from its run's own config: changing them needs no new
# worker. Everything else in the section (backend, device, model knobs, options) is built into the worker.
REQUEST_KEYS: dict[str, frozenset[str]] = {
    "segment": frozenset({"threshold", "min_area_px", "dedup_iou", "max_objects"}),
    "reconstruct": frozenset({"seed", "frame", "preview", "exports", "texture_size"}),
}


def load_key(config: PipelineConfig, stage: str) -> str:
    """What a worker of ``stage`` is built from: its env and config section minus :data:`REQUEST_KEYS`."""
    section = config.stage(stage).model_dump(mode="json")
    model = {k: v for k, v in section.items() if k not in REQUEST_KEYS[stage]}
    return canonical_json({"env": config.env_for(section["env"]).model_dump(mode="json"), "section": model})


@dataclass
class JobOutcome:
    """One job's end: ``result`` (the worker's summary), ``error``, or ``requeue``; ``wall_s`` from submit to end."""

    job: Job
    result: dict[str, Any] = field(default_factory=dict)
    error: PipelineError | None = None
    wall_s: float = 0.0
    requeue: bool = False  # never started: the worker was stopped for another job of its group


class WorkerProcess:
    """A running ``python -m pipeline.stages.<stage>`` in ``env``; its own output goes to ``log_path``."""

    def __init__(
        self,
        stage: str,
        env: Env,
        *,
        config_path: Path,
        log_path: Path,
        variables: Mapping[str, str | None] | None = None,
    ) -> None:
        self.stage = stage
        self.env = env
        self.config_path = config_path
        self.log_path = log_path
        self.variables = dict(variables or {})
        self.proc: subprocess.Popen | None = None
        self.load_s: float | None = None
        self.load_timings: dict[str, float] = {}  # the worker's start-up steps (ready event's "timings")
        self.start_s: float | None = None  # spawn → ready, measured by the driver
        self.jobs_done = 0
        self._log: IO[bytes] | None = None
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()

    @property
    def argv(self) -> list[str]:
        """The worker's command line (no secrets: those travel in the environment)."""
        return [str(self.env.python), "-u", "-m", f"pipeline.stages.{self.stage}", "--config", str(self.config_path)]

    @property
    def pid(self) -> int | None:
        """The worker's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def alive(self) -> bool:
        """True while the worker process runs."""
        return self.pid is not None

    def __enter__(self) -> "WorkerProcess":
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(graceful=exc_type is None)

    def start(self, timeout_s: float | None = None) -> None:
        """Spawn the worker and wait for its ``ready`` event; raises StageFailed if it dies or times out first."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(("$ " + " ".join(self.argv) + "\n").encode())
        self._log.flush()
        t0 = time.perf_counter()
        self.proc = spawn(
            self.argv,
            env=self.env.child_env(self.variables),
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        threading.Thread(target=self._read_events, args=(self.proc.stdout,), name=f"{self.stage}-events", daemon=True).start()
        try:
            ready = self._next_event(deadline=None if timeout_s is None else time.monotonic() + timeout_s, log=None,
                                     limit_s=timeout_s)
            while ready.get("event") != "ready":
                ready = self._next_event(deadline=None, log=None)
            self.load_s = ready.get("load_s")
            self.load_timings = dict(ready.get("timings") or {})
            self.start_s = round(time.perf_counter() - t0, 3)  # spawn → ready: interpreter, imports and load_s
        except BaseException:
            self.close(graceful=False)
            raise

    def load_report(self) -> dict[str, float]:
        """``load_s`` (the worker's own build time), the worker's start-up steps as ``load_<step>`` (e.g.
        ``load_graph_capture_s``) and ``start_s`` (spawn → ready as the driver saw it: interpreter start, imports
        and the build)."""
        report = {f"load_{k}": v for k, v in self.load_timings.items() if isinstance(v, (int, float))}
        if self.load_s is not None:
            report["load_s"] = self.load_s
        if self.start_s is not None:
            report["start_s"] = self.start_s
        return report

    def close(self, *, graceful: bool = True) -> None:
        """End the worker: close its job stream and let it exit (graceful), then stop its process group."""
        if self.proc is not None:
            if graceful and self.proc.stdin and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                    self.proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            stop_process_group(self.proc, grace_s=5.0)
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream and not stream.closed:
                    try:
                        stream.close()
                    except OSError:
                        pass
        if self._log is not None and not self._log.closed:
            self._log.close()

    def submit(self, job: Job, on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
        """Run one job to its end; returns the worker's result dict or raises its error."""
        callback = (lambda _id, d, t, m: on_progress(d, t, m)) if on_progress else None
        (outcome,) = self.run_group([job], callback)
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    def run_group(
        self,
        jobs: Sequence[Job],
        on_progress: ProgressCallback | None = None,
        *,
        timeout_s: float | None = None,
        cancelled: Callable[[Job], bool] | None = None,
        on_started: Callable[[Job], None] | None = None,
    ) -> list[JobOutcome]:
        """Send ``jobs`` as one group and wait for each to end, in order.

        A job's error ends that job only. The worker is stopped when it exits, when one job runs longer than
        ``timeout_s`` or when ``cancelled(job)`` turns true while that job is in progress: the job in progress
        gets the StageFailed or :class:`RunCancelled`; the jobs of the group that had not started come back with
        ``requeue`` set (no fault of theirs).
        """
        assert self.proc is not None and self.proc.stdin is not None, "start() the worker first"
        t0 = time.perf_counter()
        line = jobs[0].model_dump_json() if len(jobs) == 1 else json.dumps({"group": [j.model_dump(mode="json") for j in jobs]})
        outcomes = {j.id: JobOutcome(j) for j in jobs}
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            error = self._failure("the worker exited before it took the job", log=jobs[0].log)
            return [JobOutcome(j, error=error) for j in jobs]
        pending = [j.id for j in jobs]
        by_id = {j.id: j for j in jobs}
        current: Job | None = None
        job_deadline: float | None = None
        while pending:
            try:
                event = self._next_event(deadline=job_deadline, log=(current or by_id[pending[0]]).log,
                                         cancelled=(lambda: cancelled(current)) if cancelled and current else None,
                                         limit_s=timeout_s)
            except (StageFailed, RunCancelled) as exc:
                self.close(graceful=False)
                blamed = current.id if current else pending[0]
                for jid in pending:
                    outcomes[jid].wall_s = time.perf_counter() - t0
                    if jid == blamed:
                        outcomes[jid].error = exc
                    else:
                        outcomes[jid].requeue = True
                break
            jid = event.get("job")
            if jid not in outcomes:
                continue
            kind = event["event"]
            if kind == "started":
                current = by_id[jid]
                job_deadline = None if timeout_s is None else time.monotonic() + timeout_s
                if on_started is not None:
                    on_started(current)
            elif kind == "progress" and on_progress is not None:
                on_progress(jid, int(event.get("done", 0)), int(event.get("total", 0)), str(event.get("message", "")))
            elif kind in ("done", "error"):
                out = outcomes[jid]
                out.wall_s = time.perf_counter() - t0
                if kind == "done":
                    out.result = dict(event.get("result") or {})
                    timings = out.result.setdefault("timings", {})
                    timings["wall_s"] = out.wall_s
                    job_s = (event.get("timings") or {}).get("total_s")
                    if isinstance(job_s, (int, float)):
                        timings["job_s"] = float(job_s)  # time inside the worker, started → done (wall_s adds the round trip and the group's earlier jobs)
                    self.jobs_done += 1
                else:
                    out.error = self._failure(str(event.get("message")), hint=event.get("hint"), log=by_id[jid].log)
                pending.remove(jid)
                if current is not None and current.id == jid:  # a job may end after the next one started
                    current, job_deadline = None, None
        return [outcomes[j.id] for j in jobs]

    # ------------------------------------------------------------------ events

    def _read_events(self, stream: IO[str]) -> None:
        """Reader thread: queue each JSON event line; an ``eof`` marker when the worker's output ends."""
        try:
            for line in stream:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # not ours: the protocol keeps library prints off this channel, but be lenient
                if isinstance(event, dict) and "event" in event:
                    self._events.put(event)
        except (OSError, ValueError):
            pass
        self._events.put({"event": "eof"})

    def _next_event(
        self, *, deadline: float | None, log: str | None, cancelled: Callable[[], bool] | None = None,
        limit_s: float | None = None,
    ) -> dict[str, Any]:
        """The next event; raises StageFailed on a worker-level error, its exit or the deadline (``limit_s``
        seconds after it was set, for the message), RunCancelled."""
        while True:
            if cancelled is not None and cancelled():
                raise RunCancelled(f"stage '{self.stage}' was cancelled", hint="submit the run again to redo it")
            wait = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._failure(f"timed out after {limit_s:g} s: the worker was stopped and will be restarted "
                                        "for the next run",
                                        hint="raise engine.stage_timeout_s if this stage needs longer", log=log) from None
                continue
            kind = event["event"]
            if kind == "eof":
                assert self.proc is not None
                code = self.proc.wait()
                raise self._failure(f"the worker exited with code {code}", returncode=code, log=log)
            if kind == "error" and event.get("job") is None:
                raise self._failure(str(event.get("message")), hint=event.get("hint"), log=log)
            return event

    def _failure(self, message: str, *, hint: str | None = None, returncode: int | None = None, log: str | None = None) -> StageFailed:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        log_path = Path(log) if log and Path(log).exists() else self.log_path
        return StageFailed(
            self.stage,
            message,
            log_path=log_path,
            tail=tail_lines(log_path, TAIL_LINES),
            hint=hint,
            returncode=returncode,
        )
