"""Driver side of the stage-worker protocol (:mod:`pipeline.stages.protocol`).

:class:`WorkerProcess` starts one stage worker in its env, waits for it to load its model, submits jobs
and turns its events into progress callbacks, results or :class:`~pipeline.errors.StageFailed`. It is a
context manager: the worker (and everything it started: its process group) is stopped on success,
failure and Ctrl-C. One instance can serve many jobs, which is what a batch mode keeps warm.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Callable, Mapping

from pipeline.config import PROJECT_ROOT
from pipeline.driver.envs import Env
from pipeline.errors import StageFailed
from pipeline.driver.proc import spawn, stop_process_group, tail_lines
from pipeline.stages.protocol import Job

__all__ = ["WorkerProcess", "ProgressCallback"]

ProgressCallback = Callable[[int, int, str], None]
TAIL_LINES = 20


class WorkerProcess:
    """A running ``python -m pipeline.stages.<stage>`` in ``env``; output goes to ``log_path``."""

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
        self._log: IO[bytes] | None = None
        self.load_s: float | None = None

    @property
    def argv(self) -> list[str]:
        """The worker's command line (no secrets: those travel in the environment)."""
        return [str(self.env.python), "-u", "-m", f"pipeline.stages.{self.stage}", "--config", str(self.config_path)]

    def __enter__(self) -> "WorkerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self._log.write(("$ " + " ".join(self.argv) + "\n").encode())
        self._log.flush()
        self.proc = spawn(
            self.argv,
            env=self.env.child_env(self.variables),
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        try:
            ready = self._next_event(None)
            self.load_s = ready.get("load_s")
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(graceful=exc_type is None)

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

    def submit(self, job: Job, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Send one job and block until the worker reports it done; returns the worker's result dict."""
        assert self.proc is not None and self.proc.stdin is not None, "use WorkerProcess as a context manager"
        try:
            self.proc.stdin.write(job.model_dump_json() + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._failure("the worker exited before it took the job") from None
        t0 = time.perf_counter()
        while True:
            event = self._next_event(job.id)
            kind = event["event"]
            if kind == "progress" and on_progress is not None:
                on_progress(int(event.get("done", 0)), int(event.get("total", 0)), str(event.get("message", "")))
            elif kind == "done":
                result = dict(event.get("result") or {})
                result.setdefault("timings", {})["wall_s"] = time.perf_counter() - t0
                return result

    def _next_event(self, job_id: str | None) -> dict[str, Any]:
        """Read the next event; raise StageFailed on an error event or if the worker's output ends."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                raise self._failure(f"the worker exited with code {code}", returncode=code)
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours: the protocol keeps library prints off this channel, but be lenient
            if event.get("event") == "error":
                raise self._failure(str(event.get("message")), hint=event.get("hint"))
            if event.get("event") in ("ready", "done", "progress", "started"):
                if event.get("event") == "ready" or event.get("job") == job_id:
                    return event

    def _failure(self, message: str, *, hint: str | None = None, returncode: int | None = None) -> StageFailed:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return StageFailed(
            self.stage,
            message,
            log_path=self.log_path,
            tail=tail_lines(self.log_path, TAIL_LINES),
            hint=hint,
            returncode=returncode,
        )
