"""The batch's live display treats image paths and user text as plain text, never as rich markup."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from pipeline.driver.batch_view import BatchView
from pipeline.driver.engine import EngineEvent


def test_absolute_paths_and_brackets_show_in_the_live_line(tmp_path: Path) -> None:
    view = BatchView(2, ("segment", "reconstruct"), live=True)
    screen = io.StringIO()
    view.console = Console(file=screen, force_terminal=True, width=200)
    source = "/data/photos/IMG_0001.jpg"  # in "[/data…]" rich's markup parser sees a closing tag: MarkupError
    with view:
        view.named("r1", source)
        view.on_event(EngineEvent("r1", tmp_path, "stage_started", "segment"))
        view.on_event(EngineEvent("r1", tmp_path, "progress", "segment", 0, 1, "segmenting [bold] and [red]"))
        view._progress.refresh()
    shown = screen.getvalue()
    assert "/data/photos/IMG_0001.jpg: segment segmenting [bold] and [red]" in shown
    assert "0:00:0" in shown and "ETA" in shown  # the elapsed-time and ETA columns are still there
