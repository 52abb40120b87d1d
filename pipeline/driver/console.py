"""What the user sees while a run goes: stage lines, a live progress bar (on a terminal), a summary.

A one-shot run is an engine with one run: :func:`run_with_progress` opens an :class:`~pipeline.driver.engine.Engine`,
prints its events as ``<stage>: <message>`` lines on stderr and the summary on stdout.
"""

from __future__ import annotations

import sys
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.driver.engine import Engine, EngineEvent
from pipeline.driver.runner import RunOutcome, RunRequest, Runner
from pipeline.handoff import MANIFEST_NAME, MASKS_DIR, OBJECTS_DIR, SCENE_DIR

__all__ = ["run_with_progress", "summarise", "StageLines"]


def summarise(outcome: RunOutcome) -> list[str]:
    """Lines that tell the user what the run produced and where."""
    run_dir = outcome.run_dir
    lines = [f"run directory: {run_dir}"]
    masks = run_dir / MASKS_DIR / MANIFEST_NAME
    if masks.exists():
        lines.append(f"  masks:   {masks}")
    objects = run_dir / OBJECTS_DIR / MANIFEST_NAME
    if objects.exists():
        lines.append(f"  objects: {objects}")
        scene = run_dir / SCENE_DIR
        if scene.exists():
            lines += [f"  scene:   {p}" for p in sorted(scene.iterdir()) if p.is_file()]
    return lines


class StageLines:
    """Turns engine events into ``<stage>: <message>`` lines and a per-stage progress bar."""

    def __init__(self, console: Any, progress: Any = None) -> None:
        self.console = console
        self.progress = progress
        self._tasks: dict[tuple[str, str], Any] = {}

    def __call__(self, event: EngineEvent) -> None:
        if event.kind in ("stage_started", "stage_skipped", "stage_finished", "note"):
            prefix = f"{event.stage}: " if event.stage else ""
            self.console.print(prefix + event.message, highlight=False, markup=False)
        if self.progress is None or event.stage is None:
            return
        key = (event.run, event.stage)
        if event.kind == "stage_started":
            self._tasks[key] = self.progress.add_task(event.stage, total=None)
        elif event.kind == "progress" and key in self._tasks:
            self.progress.update(self._tasks[key], completed=event.done, total=event.total or None,
                                 description=f"{event.stage}: {event.message}")
        elif event.kind == "stage_finished" and key in self._tasks:
            self.progress.remove_task(self._tasks.pop(key))


def run_with_progress(req: RunRequest, config: PipelineConfig) -> int:
    """Execute ``req`` (one run on a fresh engine) with progress on stderr; print the plan or summary. Returns 0."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if req.dry_run:
        for d in Runner(config).plan(req):
            print(f"{d.stage}: {d.action} ({d.reason})")
        return 0
    console = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not sys.stderr.isatty(),
    )
    with progress, Engine(config, on_event=StageLines(console, progress), single_run=True) as engine:
        for line in engine.stale:
            console.print(f"stopped a stale child: {line}", highlight=False, markup=False)
        outcome = engine.run(req)
    for line in summarise(outcome):
        print(line)
    return 0
