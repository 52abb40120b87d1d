"""What the user sees while a run goes: stage lines, a live progress bar (on a terminal), a summary."""

from __future__ import annotations

import sys

from pipeline.config import PipelineConfig
from pipeline.handoff import MANIFEST_NAME, MASKS_DIR, OBJECTS_DIR, SCENE_DIR
from pipeline.driver.runner import RunOutcome, RunRequest, Runner

__all__ = ["run_with_progress", "summarise"]


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


def run_with_progress(req: RunRequest, config: PipelineConfig) -> int:
    """Execute ``req`` with rich progress on stderr; print the plan (dry run) or the summary. Returns 0."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if req.dry_run:
        for d in Runner(config).plan(req):
            print(f"{d.stage}: {d.action} ({d.reason})")
        return 0
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not sys.stderr.isatty(),
    )
    with progress:
        runner = Runner(config, say=lambda msg: console.print(msg, highlight=False), progress=progress)
        outcome = runner.execute(req)
    for line in summarise(outcome):
        print(line)
    return 0
