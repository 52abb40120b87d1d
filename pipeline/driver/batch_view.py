"""What a person sees while a batch runs: live counts per stage, the images in flight and an ETA on a terminal;
one line per finished image otherwise; a summary table at the end."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.driver.engine import EngineEvent

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.driver.batch import ItemResult

__all__ = ["BatchView"]


class BatchView:
    """Progress of one batch of ``total`` images through ``stages``; feed it engine events and finished items."""

    def __init__(self, total: int, stages: Sequence[str], *, live: bool | None = None) -> None:
        from rich.console import Console

        self.total = total
        self.stages = tuple(stages)
        self.console = Console(stderr=True)
        self.out = Console()
        self.live = sys.stderr.isatty() if live is None else live
        self.done = 0
        self.stage_done = {s: 0 for s in self.stages}
        self.in_flight: dict[str, str] = {}  # run id → "source: stage"
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "BatchView":
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                # the description holds image paths and user text: plain text, never rich markup
                TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("batch", total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def named(self, run_id: str, source: str) -> None:
        """Say which image a run id stands for."""
        with self._lock:
            self._names[run_id] = source

    def on_event(self, event: EngineEvent) -> None:
        """Engine callback (from engine threads)."""
        with self._lock:
            name = self._names.get(event.run, event.run_dir.name)
            if event.kind == "stage_started":
                self.in_flight[event.run] = f"{name}: {event.stage}"
            elif event.kind == "progress" and event.run in self.in_flight:
                self.in_flight[event.run] = f"{name}: {event.stage} {event.message}"
            elif event.kind in ("stage_finished", "stage_skipped") and event.stage in self.stage_done:
                self.stage_done[event.stage] += 1
                self.in_flight.pop(event.run, None)
            elif event.kind in ("failed", "cancelled", "succeeded"):
                self.in_flight.pop(event.run, None)
        self._refresh()

    def item_done(self, result: "ItemResult") -> None:
        """One image ended (any status)."""
        with self._lock:
            self.done += 1
            n = self.done
        if not self.live:
            times = _stage_words(result)
            error = result.error if result.error and result.status not in ("succeeded", "no objects") else ""
            parts = [f"{result.status:<10} {result.item.source}", f"{result.objects} object(s)", times, error]
            print(f"[{n}/{self.total}] " + "  ".join(p for p in parts if p), flush=True)
        self._refresh()

    def _refresh(self) -> None:
        if self._progress is None:
            return
        with self._lock:
            counts = "  ".join(f"{s} {c}/{self.total}" for s, c in self.stage_done.items())
            flight = "; ".join(list(self.in_flight.values())[:2])
            done = self.done
        self._progress.update(self._task, completed=done, description=f"{counts}  [{flight}]" if flight else counts)

    def print_summary(self, results: Sequence["ItemResult"], summary_path: Path, *, not_written: str | None = None) -> None:
        """A table of counts, the failed images with their error line, and where the summary file is (or
        ``not_written``: why it could not be written)."""
        from rich.table import Table

        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        self.out.print(f"batch: {len(results)} image(s) in {time.monotonic() - self._t0:.1f}s", highlight=False)
        table = Table()
        table.add_column("status")
        table.add_column("images", justify="right")
        for status, count in sorted(counts.items()):
            table.add_row(status, str(count))
        self.out.print(table)
        bad = [r for r in results if r.status not in ("succeeded", "no objects")]
        for r in bad:
            self.out.print(f"{r.status}: {r.item.source}: {r.error}", highlight=False, markup=False)
        self.out.print(f"note: {not_written}" if not_written else f"summary: {summary_path}", highlight=False, markup=False)


def _stage_words(result: "ItemResult") -> str:
    """``segment 0.4s reconstruct 12.0s`` for the stages that ran, ``skip`` for the others; ``up to date`` when
    every stage was skipped."""
    ran = {s for s, d in result.decisions.items() if d.startswith("run")}
    if result.decisions and not ran and result.status in ("succeeded", "no objects"):
        return "up to date"
    stages = list(dict.fromkeys([*result.decisions, *result.timings]))
    return " ".join(f"{s} {result.timings.get(s, 0.0):.1f}s" if s in ran or s not in result.decisions else f"{s} skip"
                    for s in stages)
