"""The worker protocol: a job whose result is a future finishes while the next job of its group runs."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.stages.protocol import Job, Reporter, _serve_group


class _FinishesLater:
    """A stage worker double: each job's last step waits until the next job has started (or the group ends)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.started: dict[str, threading.Event] = {}

    def run(self, job: Job, config: PipelineConfig, reporter: Reporter) -> Future[dict[str, Any]]:
        self.started.setdefault(job.id, threading.Event()).set()
        following = self.started.setdefault(f"after-{job.id}", threading.Event())

        def finish() -> dict[str, Any]:
            following.wait(1.0)  # the next job's start releases it; the last job's wait just times out
            if job.params.get("fail"):
                raise RuntimeError(f"writing {job.id} failed")
            return {"objects": 1}

        return self.pool.submit(finish)


def _events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_job_ends_after_the_next_one_started_and_every_job_is_answered(tmp_path: Path) -> None:
    worker = _FinishesLater()
    jobs = [Job(id=f"j{i}", run_dir=str(tmp_path), fingerprint="x", log=str(tmp_path / f"j{i}.log"),
                params={"fail": i == 1}) for i in range(3)]
    for a, b in zip(jobs, jobs[1:]):  # job a's last step waits for job b's start
        worker.started[f"after-{a.id}"] = worker.started.setdefault(b.id, threading.Event())
    stream = io.StringIO()
    ok = _serve_group(worker, jobs, PipelineConfig(), Reporter(stream))  # type: ignore[arg-type]
    events = [(e["event"], e["job"]) for e in _events(stream)]
    assert not ok
    assert events.index(("started", "j1")) < events.index(("done", "j0"))
    assert ("done", "j0") in events and ("error", "j1") in events and ("done", "j2") in events
    assert len(events) == 6  # a started and exactly one end per job, nothing after the group
    assert "RuntimeError: writing j1 failed" in (tmp_path / "j1.log").read_text()
