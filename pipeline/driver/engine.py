"""The warm engine: one worker per stage (each in its env) and, in query mode, one vLLM server, kept across runs.

Every way of running the tool goes through it: the one-shot CLI (an engine with one run), ``batch``, the
Python API's ``with Pipeline...`` block and the web server. A run flows through two **lanes**, one per stage,
each a queue, a warm :class:`~pipeline.driver.workers.WorkerProcess` and two threads: one opens and plans the
next group of runs (locks, stored inputs, decisions; photos were hashed and checked on submission, on a small
pool) while the other runs the current group on the worker, so that preparation is off the GPU's path::

    submit ──▶ [segment lane] ──▶ [reconstruct lane] ──▶ done
                 image i+1          image i               (the lanes overlap)

The segment lane sends waiting images to its worker together (up to ``engine.segment_group``), so the
backend can encode them in one batched pass. A lane starts its worker on first use, and again when a run needs
a different model (:func:`~pipeline.driver.workers.load_key`) or after the worker died; a run whose stage
killed the worker, timed out (``engine.stage_timeout_s``) or was cancelled fails alone, with its log's tail;
the runs of its group that had not started are queued again, and the engine goes on. After ``engine.max_restarts`` consecutive failed starts a lane stops trying and fails
its runs at once with the start error. Every child is registered with a
:class:`~pipeline.driver.reaper.ChildGuard`, so none outlives the driver, even a killed one.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

from pipeline.atomic import write_json_atomic
from pipeline.config import STAGE_NAMES, PipelineConfig
from pipeline.driver.budget import check_gpu_budget
from pipeline.driver.envs import resolve_env
from pipeline.driver.reaper import ChildGuard
from pipeline.driver.runner import ActiveRun, RunOutcome, RunRequest, Runner, StageOutcome, validate_request
from pipeline.driver.sources import SourceIndex, SourcePhoto
from pipeline.driver.statefiles import driver_file, remove_dead_drivers_files
from pipeline.driver.workers import JobOutcome, WorkerProcess, load_key
from pipeline.errors import ConfigError, PipelineError, RunCancelled, StageFailed, UsageError, output_error
from pipeline.handoff import LOGS_DIR
from pipeline.stages.protocol import SINGLE_RUN_VARIABLE, Job

__all__ = ["Engine", "RunHandle", "EngineEvent", "EventKind", "RunState"]

EventKind = Literal[
    "queued", "started", "note", "stage_started", "progress", "stage_skipped", "stage_finished",
    "succeeded", "failed", "cancelled",
]
RunState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
_JOIN_S = 30.0
_PHOTO_CHECKERS = 2  # threads that hash and check submitted photos while earlier runs use the workers


@dataclass(frozen=True)
class EngineEvent:
    """Something that happened to a run. ``message`` is what a person reads ("run (forced)", "object 2/5",
    the error line); ``done``/``total`` count units of a stage (objects, agent rounds)."""

    run: str
    run_dir: Path
    kind: EventKind
    stage: str | None = None
    done: int = 0
    total: int = 0
    message: str = ""
    time: float = field(default_factory=time.time)


class RunHandle:
    """A submitted run: its state now, and the means to wait for it or cancel it."""

    def __init__(self, engine: "Engine", request: RunRequest, config: PipelineConfig) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.config = config
        self.state: RunState = "queued"
        self.stage: str | None = None
        self.error: PipelineError | None = None
        self.outcome: RunOutcome | None = None
        self.active: ActiveRun | None = None
        self.submitted = time.time()
        self.photo: Future[SourcePhoto] | None = None  # its photo, checked ahead on the engine's pool
        self.claimed = False  # a lane has given it to its worker (before: queued, even once opened ahead)
        self._ending = False
        self._engine = engine
        self._done = threading.Event()
        self._cancel = threading.Event()

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return self.request.run_dir

    @property
    def cancel_requested(self) -> bool:
        """True once :meth:`cancel` was called or the engine is stopping."""
        return self._cancel.is_set() or self._engine.stopping

    def done(self) -> bool:
        """True once the run succeeded, failed or was cancelled."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> RunOutcome:
        """Block until the run ends; return its outcome or raise its error (``TimeoutError`` past ``timeout``)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.id} still {self.state} after {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome

    def cancel(self) -> bool:
        """Cancel: a queued run is dropped, a running one has its worker stopped. False if it already ended."""
        if self.done():
            return False
        self._cancel.set()
        self._engine._drop_if_queued(self)
        return True


@dataclass(frozen=True)
class _WarmUp:
    """A request to a lane's serving thread: start the worker for ``config`` before a run needs it."""

    config: PipelineConfig


class _Lane:
    """One stage: a queue of runs, a thread that serves it, and the stage's warm worker."""

    def __init__(self, engine: "Engine", stage: str) -> None:
        self.engine = engine
        self.stage = stage
        self.queue: deque[RunHandle] = deque()
        self.cond = threading.Condition()
        self.worker: WorkerProcess | None = None
        self.worker_key: str | None = None
        self.state = "not started"
        self.start_failures = 0
        self.start_error: StageFailed | None = None
        # one group prepared ahead: the next runs are opened and planned while the worker computes the current one
        self.ready: queue.Queue[list[tuple[RunHandle, StageOutcome]] | _WarmUp | None] = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._serve, name=f"lane-{stage}", daemon=True)
        self.prep_thread = threading.Thread(target=self._prepare_ahead, name=f"lane-{stage}-prep", daemon=True)

    def start(self) -> None:
        """Start the lane's two threads."""
        self.prep_thread.start()
        self.thread.start()

    def join(self, timeout_s: float) -> None:
        """Wait for both threads (after the engine set ``closing``)."""
        for thread in (self.prep_thread, self.thread):
            if thread.is_alive():
                thread.join(timeout_s)

    # ------------------------------------------------------------------ queue

    def put(self, handle: RunHandle) -> None:
        with self.cond:
            self.queue.append(handle)
            self.cond.notify()

    def put_front(self, handles: list[RunHandle]) -> None:
        """Queue ``handles`` again, first, in their order (runs whose group's worker was stopped before them)."""
        with self.cond:
            self.queue.extendleft(reversed(handles))
            self.cond.notify()

    def remove(self, handle: RunHandle) -> bool:
        with self.cond:
            if handle in self.queue:
                self.queue.remove(handle)
                return True
        return False

    def _take(self) -> list[RunHandle]:
        """Wait for runs; return the next one, or for the segment lane up to ``segment_group`` waiting runs."""
        with self.cond:
            while not self.queue and not self.engine.closing:
                self.cond.wait(0.5)
            if not self.queue:
                return []
            limit = self.engine.config.engine.segment_group if self.stage == "segment" else 1
            taken = [self.queue.popleft()]
            while self.queue and len(taken) < limit:
                taken.append(self.queue.popleft())
            return taken

    def _prepare_ahead(self) -> None:
        """Prep thread: take waiting runs, open and plan them, forward those that skip, and hand the rest to the
        serving thread as groups (it blocks while one group already waits, so it stays one group ahead)."""
        while True:
            handles = self._take()
            if not handles:
                self.ready.put(None)
                return
            try:
                groups = self._prepare(handles)
            except BaseException as exc:  # noqa: BLE001 - a lane must never die silently with runs in it
                self._fail_all(handles, exc)
                continue
            for group in groups:
                self.ready.put(group)

    def _serve(self) -> None:
        """Serving thread: run each prepared group on the lane's worker (or start the worker ahead)."""
        while True:
            group = self.ready.get()
            if group is None:
                return
            if isinstance(group, _WarmUp):
                try:
                    self._worker_for(group.config)
                except PipelineError:
                    pass  # counted in start_failures; the run that needs the worker meets the error itself
                continue
            try:
                self._run_group(group)
            except BaseException as exc:  # noqa: BLE001 - a lane must never die silently with runs in it
                self._fail_all([h for h, _ in group], exc)

    def _fail_all(self, handles: list[RunHandle], exc: BaseException) -> None:
        for h in handles:
            self._fail_one(h, exc)

    def _fail_one(self, h: RunHandle, exc: BaseException, outcome: StageOutcome | None = None) -> None:
        """Fail one run with ``exc``: its stage recorded as failed and its staging folders removed (as far as
        the disk allows), then finished. A run already finished is left as it is."""
        if h.done():
            return
        error = _as_pipeline_error(exc, self.stage, h.run_dir)
        if h.active is not None:
            outcome = outcome or next((o for o in reversed(h.active.outcomes) if o.decision.stage == self.stage), None)
            if outcome is not None:
                try:
                    h.active.fail(outcome, error.message)
                except OSError:  # run.json cannot be written (a full disk): the run's error says why
                    pass
        self.engine._finish(h, error=error)

    # ------------------------------------------------------------------ one group of runs

    def _prepare(self, handles: list[RunHandle]) -> list[list[tuple[RunHandle, StageOutcome]]]:
        """Open and plan ``handles``; the runs to compute, grouped by the worker (model) they need."""
        ready: list[tuple[RunHandle, StageOutcome]] = []
        for h in handles:
            if h.cancel_requested:
                self.engine._finish(h, cancelled=True)
                continue
            try:  # one run's error (a lock it cannot open, a full disk) is that run's alone
                if h.active is None:
                    self.engine._start_run(h)
                outcome = h.active.decide(self.stage)  # type: ignore[union-attr]
                if not outcome.decision.runs:
                    self.engine._mark_running(h)
                    h.active.skip(outcome)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - recorded as the run's error
                self._fail_one(h, exc)
                continue
            if outcome.decision.runs:
                ready.append((h, outcome))
                self.engine._warm_next(h, self.stage)
            else:
                self.engine._emit(h, "stage_skipped", self.stage, message=f"skip ({outcome.decision.reason})")
                self.engine._forward(h, self.stage)
        by_key: dict[str, list[tuple[RunHandle, StageOutcome]]] = {}
        for h, outcome in ready:
            by_key.setdefault(load_key(h.config, self.stage), []).append((h, outcome))
        return list(by_key.values())

    def _run_group(self, group: list[tuple[RunHandle, StageOutcome]]) -> None:
        claimed = self.engine._claim([h for h, _ in group])
        for h, _ in group:
            if h not in claimed:  # cancelled while it waited, prepared
                self.engine._finish(h, cancelled=True)
        group = [(h, outcome) for h, outcome in group if h in claimed]
        if not group:
            return
        config = group[0][0].config
        params, group = self._vlm_params(group)
        if not group:
            return
        try:
            worker = self._start_retrying(config, lambda message: [
                self.engine._emit(h, "progress", self.stage, message=message) for h, _ in group])
        except PipelineError as exc:
            self._fail_group(group, exc)
            return
        jobs: list[Job] = []
        by_job: dict[str, tuple[RunHandle, StageOutcome]] = {}
        for h, outcome in group:
            try:
                job = h.active.begin(self.stage, params)  # type: ignore[union-attr]
                _write_log_header(Path(job.log or ""), worker)
            except Exception as exc:  # noqa: BLE001 - one run's write failure fails that run only
                self._fail_one(h, exc, outcome)
                continue
            jobs.append(job)
            by_job[job.id] = (h, outcome)
            h.stage = self.stage
            self.engine._emit(h, "stage_started", self.stage, message=f"run ({outcome.decision.reason})")
        fresh = worker.jobs_done == 0
        vlm_from = self.engine._vlm_log_size() if "vlm_url" in params else None
        self.state = "busy"
        results = worker.run_group(
            jobs,
            lambda jid, done, total, msg: self.engine._emit(by_job[jid][0], "progress", self.stage, done, total, msg),
            timeout_s=config.engine.stage_timeout_s,
            cancelled=lambda job: by_job[job.id][0].cancel_requested,
        )
        self.state = "idle" if worker.alive() else "not started"
        if vlm_from is not None:
            for h, _ in group:
                if h.request.mode == "query":
                    self.engine._copy_vlm_log(vlm_from, h.run_dir / LOGS_DIR / "vlm.log")
        requeue = []
        for result in results:
            h, outcome = by_job[result.job.id]
            if result.requeue:
                requeue.append(h)
                continue
            try:
                self._record(h, outcome, result, load=worker.load_report() if fresh else None)
            except Exception as exc:  # noqa: BLE001 - e.g. its run.json cannot be written: that run fails alone
                self._fail_one(h, exc, outcome)
            fresh = False
        self.put_front(requeue)

    def _vlm_params(self, group: list[tuple[RunHandle, StageOutcome]]) -> tuple[dict[str, Any], list[tuple[RunHandle, StageOutcome]]]:
        """Extra job params (the VLM endpoint for query-mode segment runs; the server starts here) and the runs
        that can go on: when the VLM cannot start, only the query-mode runs fail, with its error."""
        queries = [(h, o) for h, o in group if self.stage == "segment" and h.request.mode == "query"]
        if not queries:
            return {}, group
        try:
            return {"vlm_url": self.engine._ensure_vlm(queries[0][0].config)}, group
        except PipelineError as exc:
            self._fail_group(queries, exc)
            return {}, [(h, o) for h, o in group if h.request.mode != "query"]

    def _fail_group(self, group: list[tuple[RunHandle, StageOutcome]], exc: PipelineError) -> None:
        for h, outcome in group:
            h.active.fail(outcome, exc.message)  # type: ignore[union-attr]
            self.engine._finish(h, error=exc)

    def _record(
        self, h: RunHandle, outcome: StageOutcome, result: JobOutcome, *, load: dict[str, float] | None
    ) -> None:
        active = h.active
        assert active is not None
        if result.error is None:
            if load:
                result.result.setdefault("timings", {}).update(load)
            active.succeed(outcome, result.result)
            n = result.result.get("objects", 0)
            self.engine._emit(h, "stage_finished", self.stage, message=f"done in {outcome.duration_s:.1f}s ({n} object(s))")
            if h.cancel_requested:  # cancelled while it waited in its group: its stage output is whole, go no further
                self.engine._finish(h, cancelled=True)
            else:
                self.engine._forward(h, self.stage)
            return
        cancelled = isinstance(result.error, RunCancelled)
        active.fail(outcome, "interrupted" if cancelled else result.error.message)
        self.engine._finish(h, error=None if cancelled else result.error, cancelled=cancelled)

    # ------------------------------------------------------------------ the warm worker

    def warm_up(self, config: PipelineConfig) -> None:
        """Have the serving thread start the lane's worker for ``config`` now, when it is idle and has none, so a
        run reaching this lane later finds its model loaded. (The serving thread, not a short-lived one, must
        start it: a worker's parent-death signal follows the thread that started it.)"""
        if (self.worker is not None and self.worker.alive()) or self.engine.closing:
            return
        try:
            self.ready.put_nowait(_WarmUp(config))
        except queue.Full:
            pass  # a group waits: the lane is about to start its worker anyway

    def _worker_for(self, config: PipelineConfig) -> WorkerProcess:
        """The lane's worker for ``config``'s model: reused while alive and built from the same key."""
        key = load_key(config, self.stage)
        if self.worker is not None and self.worker.alive() and self.worker_key == key:
            return self.worker
        self.close_worker()
        if self.start_failures > config.engine.max_restarts and self.start_error is not None:
            raise StageFailed(
                self.stage,
                f"its worker failed to start {self.start_failures} times; last: {self.start_error.message}",
                log_path=self.start_error.log_path, tail=self.start_error.tail,
                hint=self.start_error.hint or "fix the cause shown in the log, then restart the engine",
            )
        self.engine.check_budget()
        section = config.stage(self.stage)
        env = resolve_env(config, section.env)
        state_dir = self.engine.state_dir
        config_path = driver_file(state_dir, self.stage, ".json")
        write_json_atomic(config_path, config.model_dump(mode="json"))
        variables = dict(section.variables)
        if self.engine.single_run:
            variables[SINGLE_RUN_VARIABLE] = "1"
        worker = WorkerProcess(
            self.stage, env, config_path=config_path,
            log_path=driver_file(state_dir, self.stage, ".log", log=True), variables=variables,
        )
        self.state = "loading"
        try:
            worker.start()
        except StageFailed as exc:
            self.state = "failed"
            self.start_failures += 1
            self.start_error = exc
            raise
        self.start_failures, self.start_error = 0, None
        self.worker, self.worker_key, self.state = worker, key, "idle"
        return worker

    def _start_retrying(self, config: PipelineConfig, say: Callable[[str], Any]) -> WorkerProcess:
        """The lane's worker, started again after a failed start (a model load killed by the OOM killer, a
        flaky filesystem) up to ``engine.max_restarts`` times in a row; then the last start's error. ``say``
        tells the waiting runs about each new try."""
        while True:
            try:
                return self._worker_for(config)
            except StageFailed as exc:
                if self.start_failures > config.engine.max_restarts or self.engine.closing:
                    raise
                say(f"the {self.stage} worker failed to start ({exc.message}); try {self.start_failures + 1} "
                    f"of {config.engine.max_restarts + 1}")

    def close_worker(self) -> None:
        if self.worker is not None:
            self.worker.close(graceful=self.worker.alive())
            self.worker.config_path.unlink(missing_ok=True)
            self.worker = None
            self.state = "not started"

    def health(self) -> dict[str, Any]:
        worker = self.worker
        return {
            "state": self.state,
            "pid": worker.pid if worker else None,
            "load_s": worker.load_s if worker else None,
            "jobs": worker.jobs_done if worker else 0,
            "queued": len(self.queue),
            "start_failures": self.start_failures,
        }


class Engine:
    """Warm stage workers and the vLLM server, shared by many runs (see the module docstring).

    Use as a context manager; leaving the block stops every child. ``on_event`` is called from the engine's
    threads: keep it short and thread-safe. ``single_run``: the engine serves one run (the one-shot commands);
    its workers skip start-up work that only pays off over many runs (``PIPELINE_SINGLE_RUN``, see
    :mod:`pipeline.stages.protocol`).
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        on_event: Callable[[EngineEvent], None] | None = None,
        single_run: bool = False,
    ) -> None:
        self.config = config
        self.on_event = on_event
        self.single_run = single_run
        self.state_dir = config.engine.resolved_state_dir()
        self.stopping = False
        self.closing = False
        self._lanes = {stage: _Lane(self, stage) for stage in STAGE_NAMES}
        self._handles: dict[str, RunHandle] = {}
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self._vlm_url: str | None = None
        self._vlm_lock = threading.Lock()
        self._vlm_error: PipelineError | None = None
        self._started = False
        self._budget_lock = threading.Lock()  # its own: nvidia-smi must not hold up the runs' bookkeeping
        self._budget_checked = False
        self._budget_error: ConfigError | None = None
        self.stale: list[str] = []
        self.sources = SourceIndex(self.state_dir)
        self._checkers = ThreadPoolExecutor(max_workers=_PHOTO_CHECKERS, thread_name_prefix="photo-check")

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Check the GPU memory budget (a one-shot engine: before its first worker), stop children left by killed
        drivers, start the lanes."""
        if self._started:
            return
        if not self.single_run:  # a one-shot engine checks before its first worker starts: a rerun may start none
            self.check_budget()
        (self.state_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
        remove_dead_drivers_files(self.state_dir)
        guard = self._stack.enter_context(ChildGuard(self.state_dir))
        self.stale = guard.stale
        for lane in self._lanes.values():
            lane.start()
        self._started = True

    def check_budget(self) -> None:
        """Check once that the stages sharing a GPU fit on it (``engine.check_gpu_memory``); ConfigError if not."""
        with self._budget_lock:
            if self._budget_checked or not self.config.engine.check_gpu_memory:
                if self._budget_error is not None:
                    raise self._budget_error
                return
            self._budget_checked = True
            try:
                check_gpu_budget(self.config, with_vlm=False)
            except ConfigError as exc:
                self._budget_error = exc  # every later start meets the same answer without asking again
                raise

    def stop(self) -> None:
        """Take no more runs; cancel queued ones; stop the workers of running ones (marked interrupted)."""
        self.stopping = True
        for lane in self._lanes.values():
            with lane.cond:
                dropped = list(lane.queue)
                lane.queue.clear()
            for h in dropped:
                self._finish(h, cancelled=True)

    def close(self) -> None:
        """:meth:`stop`, wait for the lanes, then stop every worker and the vLLM server. Idempotent."""
        if self.closing:
            return
        self.stop()
        self.closing = True
        for lane in self._lanes.values():
            with lane.cond:
                lane.cond.notify_all()
            lane.join(_JOIN_S)
        for lane in self._lanes.values():
            lane.close_worker()
        for h in list(self._handles.values()):  # runs a lane could not finish in time
            if not h.done():
                self._finish(h, cancelled=True)
        self._stack.close()
        self._checkers.shutdown(wait=True, cancel_futures=True)
        self.sources.close()
        if not any(h.state == "failed" for h in self._handles.values()):  # keep worker logs only when useful
            for stage in (*STAGE_NAMES, "vlm"):
                driver_file(self.state_dir, stage, ".log", log=True).unlink(missing_ok=True)

    # ------------------------------------------------------------------ runs

    def submit(self, req: RunRequest) -> RunHandle:
        """Queue a run; bad requests (usage, unreadable image, missing env) are refused here, at once."""
        if req.dry_run:
            raise UsageError("the engine runs requests; plan a dry run with Runner(config).plan(request)")
        if self.stopping or self.closing:
            raise UsageError("the engine is stopping and takes no more runs")
        self.start()
        config = req.config or self.config
        validate_request(req)
        stages = [s for s in STAGE_NAMES if s in req.stages]
        if not stages:
            raise UsageError("the request names no stage", hint=f"stages are: {', '.join(STAGE_NAMES)}")
        for stage in stages:
            resolve_env(config, config.stage(stage).env)
        handle = RunHandle(self, req, config)
        if req.image is not None:  # hashed and checked now, off the lanes, while earlier runs compute
            handle.photo = self._checkers.submit(self.sources.identify, Path(req.image), max_pixels=config.run.max_pixels)
        with self._lock:
            self._handles[handle.id] = handle
        self._emit(handle, "queued")
        self._lanes[stages[0]].put(handle)
        return handle

    def run(self, req: RunRequest) -> RunOutcome:
        """Submit one run and wait for it; raises its error."""
        return self.submit(req).wait()

    def batch(self, requests: Iterable[RunRequest]) -> Iterator[RunHandle]:
        """Submit every request, then yield the handles as their runs end (finished order)."""
        handles = [self.submit(r) for r in requests]
        pending = list(handles)
        while pending:
            for h in [h for h in pending if h.done()]:
                pending.remove(h)
                yield h
            if pending:
                pending[0]._done.wait(0.05)

    def handle(self, run_id: str) -> RunHandle | None:
        """The handle of a submitted run, by id."""
        return self._handles.get(run_id)

    def cancel(self, run_id: str) -> bool:
        """Cancel a run by id; False if unknown or already ended."""
        h = self._handles.get(run_id)
        return h.cancel() if h is not None else False

    def health(self) -> dict[str, Any]:
        """Each lane's worker state, the VLM server, and how many runs are queued and running."""
        states = [h.state for h in self._handles.values()]
        return {
            "stages": {stage: lane.health() for stage, lane in self._lanes.items()},
            "vlm": {"state": "up" if self._vlm_url else "not started", "url": self._vlm_url},
            "queued": states.count("queued"),
            "running": states.count("running"),
        }

    # ------------------------------------------------------------------ used by the lanes

    def _start_run(self, h: RunHandle) -> None:
        """Open the run (lock, stored input, record); it stays queued until a lane claims it or skips a stage."""
        runner = Runner(h.config, say=lambda msg: self._emit(h, "note", message=msg), photos=self._photos_for(h))
        h.active = runner.open(h.request)

    def _photos_for(self, h: RunHandle) -> Callable[[Path], SourcePhoto]:
        """The run's photo as checked ahead (its errors raised here); any other path is checked now."""
        def photo(path: Path) -> SourcePhoto:
            if h.photo is not None and h.request.image is not None and Path(path) == Path(h.request.image):
                return h.photo.result()
            return self.sources.identify(path, max_pixels=h.config.run.max_pixels)
        return photo

    def _ensure_vlm(self, config: PipelineConfig) -> str:
        """The VLM endpoint, starting the managed server on first use; a start that failed is not retried by
        this engine (a server start can take minutes): every later query-mode run fails with the same error."""
        with self._vlm_lock:
            if self._vlm_error is not None:
                raise self._vlm_error
            if self._vlm_url is None:
                from pipeline.driver.vlm_server import vlm_service

                try:
                    if config.engine.check_gpu_memory and config.vlm.url is None:
                        check_gpu_budget(config, with_vlm=True)
                    self._vlm_url = self._stack.enter_context(vlm_service(config, log_path=self._vlm_log))
                except PipelineError as exc:
                    self._vlm_error = exc
                    raise
            return self._vlm_url

    @property
    def _vlm_log(self) -> Path:
        return driver_file(self.state_dir, "vlm", ".log", log=True)

    def _vlm_log_size(self) -> int:
        return self._vlm_log.stat().st_size if self._vlm_log.exists() else 0

    def _copy_vlm_log(self, start: int, dest: Path) -> None:
        """Copy what the managed vLLM server logged since byte ``start`` into a run's ``logs/vlm.log``."""
        header = f"# vLLM server at {self._vlm_url}; its whole log: {self._vlm_log}\n"
        data = b""
        if self._vlm_log.exists():
            with open(self._vlm_log, "rb") as fh:
                fh.seek(start)
                data = fh.read()
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(header.encode() + data)

    def _warm_next(self, h: RunHandle, stage: str) -> None:
        """A run's ``stage`` will compute: start the worker of its next stage meanwhile (the two models load in
        parallel; a one-shot `run` then waits for the slower load, not for both one after the other)."""
        later = [s for s in STAGE_NAMES[STAGE_NAMES.index(stage) + 1 :] if s in h.request.stages]
        if later:
            self._lanes[later[0]].warm_up(h.config)

    def _forward(self, h: RunHandle, stage: str) -> None:
        """Hand a run to the lane of its next requested stage, or finish it."""
        later = [s for s in STAGE_NAMES[STAGE_NAMES.index(stage) + 1 :] if s in h.request.stages]
        if later and not h.cancel_requested:
            self._lanes[later[0]].put(h)
        elif later:
            self._finish(h, cancelled=True)
        else:
            self._finish(h)

    def _drop_if_queued(self, h: RunHandle) -> None:
        """Finish a cancelled run at once unless a worker has it: waiting in a lane's queue, or opened ahead."""
        if any(lane.remove(h) for lane in self._lanes.values()):
            self._finish(h, cancelled=True)
            return
        with self._lock:
            prepared = h.state == "queued" and h.active is not None and not h.claimed
        if prepared:
            self._finish(h, cancelled=True)

    def _claim(self, handles: list[RunHandle]) -> list[RunHandle]:
        """The runs a lane may now give its worker (those not ended or cancelled meanwhile); they are running."""
        with self._lock:
            claimed = [h for h in handles if not h._ending and not h.cancel_requested]
            for h in claimed:
                h.claimed = True
        for h in claimed:
            self._mark_running(h)
        return claimed

    def _mark_running(self, h: RunHandle) -> None:
        """A queued run starts: its state and the ``started`` event."""
        with self._lock:
            if h.state != "queued":
                return
            h.state = "running"
        self._emit(h, "started")

    def _finish(self, h: RunHandle, *, error: PipelineError | None = None, cancelled: bool = False) -> None:
        with self._lock:  # exactly once, whoever gets here first (a lane, a cancel, the engine's close)
            if h._ending:
                return
            h._ending = True
        if h.active is not None:
            try:
                if cancelled:  # stages planned but never begun (a begun one records its own end)
                    h.active.drop_planned("cancelled before it started")
            except OSError:  # run.json cannot be written (a full disk): the run still ends, and says so
                pass
            h.outcome = h.active.result()
            h.active.close()
        else:
            h.outcome = RunOutcome(h.run_dir, [])
        h.stage = None
        if cancelled:
            h.state, h.error = "cancelled", RunCancelled(f"run {h.run_dir} was cancelled", hint="submit it again to redo it")
            self._emit(h, "cancelled", message="cancelled")
        elif error is not None:
            h.state, h.error = "failed", error
            self._emit(h, "failed", message=error.message)
        else:
            h.state = "succeeded"
            self._emit(h, "succeeded")
        h._done.set()

    def _emit(self, h: RunHandle, kind: EventKind, stage: str | None = None, done: int = 0, total: int = 0, message: str = "") -> None:
        if self.on_event is not None:
            self.on_event(EngineEvent(h.id, h.run_dir, kind, stage, done, total, message))


def _write_log_header(path: Path, worker: WorkerProcess) -> None:
    """Start a run's stage log with the worker's command line and pid (the worker appends the rest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("$ " + " ".join(worker.argv) + f"\n# warm worker pid {worker.pid}, job {worker.jobs_done + 1}\n")


def _as_pipeline_error(exc: BaseException, stage: str, run_dir: Path) -> PipelineError:
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, OSError) and (error := output_error(exc, run_dir)) is not None:
        return error
    return StageFailed(stage, f"internal error in the engine: {type(exc).__name__}: {exc}",
                       hint="rerun with --debug and report this with the traceback")
