"""What a person sees while ``envs create`` runs a build step: env, step i/n, elapsed time, packages, log.

The step's child writes only to its log; :class:`LogProgress` reads the log as it grows and counts what pip
(``Collecting`` or ``Processing``, ``Downloading``, ``Using cached``, ``Building wheel for``, ``Installing collected packages``,
``Successfully installed``) or the conda tool (micromamba's ``+ package`` transaction lines, conda's phases)
reports, or (``lines``) the last ``progress: …`` line a child of ours prints. On a terminal :class:`LiveDisplay` redraws one status line twice a second (rich); elsewhere
:class:`PlainDisplay` prints one line when a step starts and one when it ends, plus a heartbeat every minute
(so CI logs do not look stalled during a 30-minute compile).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

__all__ = ["Counter", "LogProgress", "StepDisplay", "PlainDisplay", "LiveDisplay", "make_display"]

Counter = Literal["pip", "conda", "lines", "none"]
_CONDA_PHASES = (
    ("Collecting package metadata", "reading channels"),
    ("Solving environment", "solving"),
    ("Downloading and Extracting Packages", "downloading"),
    ("Preparing transaction", "preparing"),
    ("Verifying transaction", "verifying"),
    ("Executing transaction", "linking"),
    ("Transaction starting", "linking"),
    ("Linking ", "linking"),
)
_MAMBA_PACKAGE = re.compile(r"^\s+\+ \S+\s+\S+")
_BUILDING = re.compile(r"Building wheel for (\S+)")


class LogProgress:
    """Counts progress lines appended to ``log`` since it was created (the current step's lines only)."""

    def __init__(self, log: Path, counter: Counter) -> None:
        self.log = Path(log)
        self.counter = counter
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self._partial = b""
        self.collected = self.downloaded = self.cached = self.satisfied = 0
        self.installing = self.installed = self.linked = 0
        self.building: str | None = None
        self.phase: str | None = None
        self.latest: str | None = None

    def poll(self) -> None:
        """Read what the child wrote since the last call and update the counts."""
        if self.counter == "none" or not self.log.exists():
            return
        with open(self.log, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._line(raw.decode("utf-8", errors="replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        text = line.strip()
        if self.counter == "lines":
            if text.startswith("progress: "):
                self.latest = text[len("progress: "):]
            return
        if self.counter == "conda":
            for marker, phase in _CONDA_PHASES:
                if text.startswith(marker):
                    self.phase = phase
            if _MAMBA_PACKAGE.match(line):
                self.linked += 1
            return
        if text.startswith(("Collecting ", "Processing ")):
            self.collected += 1
        elif text.startswith("Downloading "):
            self.downloaded += 1
        elif text.startswith("Using cached "):
            self.cached += 1
        elif text.startswith("Requirement already satisfied"):
            self.satisfied += 1
        elif text.startswith("Installing collected packages:"):
            self.installing = len([p for p in text.split(":", 1)[1].split(",") if p.strip()])
            self.building = None
        elif text.startswith("Successfully installed "):
            self.installed = len(text.split()[2:])
            self.installing = 0
        else:
            match = _BUILDING.search(text)
            if match:
                self.building = match.group(1)

    def summary(self) -> str:
        """A few words: ``37 collected, 12 downloaded, installing 35`` (empty when nothing was counted)."""
        if self.counter == "lines":
            return self.latest or ""
        if self.counter == "conda":
            parts = [f"{self.linked} packages" if self.linked else "", self.phase or ""]
            return ", ".join(p for p in parts if p)
        parts = []
        for count, word in ((self.collected, "collected"), (self.downloaded, "downloaded"),
                            (self.cached, "cached"), (self.satisfied, "already there")):
            if count:
                parts.append(f"{count} {word}")
        if self.installed:
            parts.append(f"{self.installed} installed")
        elif self.installing:
            parts.append(f"installing {self.installing}")
        elif self.building:
            parts.append(f"building {self.building}")
        return ", ".join(parts)


class StepDisplay:
    """Base display: ``note`` lines, and ``start`` → ``poll``… → ``finish`` around each step."""

    def __init__(self, write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.write = write or (lambda text: print(text, flush=True))
        self.clock = clock
        self.progress: LogProgress | None = None
        self.label = ""
        self.log: Path | None = None
        self.t0 = 0.0

    def note(self, text: str) -> None:
        """One line of information (``sam3: up to date at …``)."""
        self.write(text)

    def start(self, env: str, index: int, total: int, step: str, log: Path, counter: Counter) -> None:
        """A step begins; its child appends to ``log``."""
        self.progress = LogProgress(log, counter)
        self.label = f"{env} [{index}/{total}] {step}"
        self.log = log
        self.t0 = self.clock()

    def elapsed(self) -> float:
        """Seconds since the current step started."""
        return self.clock() - self.t0

    def poll(self) -> None:
        """Called about twice a second while the step's child runs."""
        if self.progress is not None:
            self.progress.poll()

    def finish(self, ok: bool, detail: str = "") -> None:
        """The step ended: ``ok``, or failed/interrupted as ``detail`` says."""
        if self.progress is not None:
            self.progress.poll()
        counts = self.progress.summary() if self.progress is not None else ""
        word = "done" if ok else (detail or "failed")
        extra = f" ({counts})" if counts else ""
        self.write(f"{'✓' if ok else '✗'} {self.label}: {word} in {self.elapsed():.0f} s{extra}")
        self.progress = None

    def close(self) -> None:
        """Release the terminal (live displays)."""


class PlainDisplay(StepDisplay):
    """Not a terminal: a line per step start and end, and a heartbeat line every ``heartbeat_s`` seconds."""

    def __init__(self, write: Callable[[str], None] | None = None, *, heartbeat_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(write, clock)
        self.heartbeat_s = heartbeat_s
        self._next_beat = 0.0

    def start(self, env: str, index: int, total: int, step: str, log: Path, counter: Counter) -> None:
        super().start(env, index, total, step, log, counter)
        self._next_beat = self.t0 + self.heartbeat_s
        self.write(f"{self.label}: started (log: {log})")

    def poll(self) -> None:
        super().poll()
        if self.progress is not None and self.clock() >= self._next_beat:
            self._next_beat += self.heartbeat_s
            counts = self.progress.summary()
            self.write(f"{self.label}: {self.elapsed():.0f} s" + (f", {counts}" if counts else ""))


class LiveDisplay(StepDisplay):
    """A terminal: one rich status line (spinner, env, step, seconds, counts) and the log path under it."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console()
        super().__init__(lambda text: self.console.print(text, markup=False, highlight=False, soft_wrap=True))
        self._live: Any = None

    def _render(self) -> Any:
        from rich.console import Group
        from rich.spinner import Spinner
        from rich.text import Text

        counts = self.progress.summary() if self.progress is not None else ""
        line = Text(f"{self.label}  {self.elapsed():.0f} s" + (f"  {counts}" if counts else ""),
                    no_wrap=True, overflow="ellipsis")
        return Group(Spinner("dots", text=line), Text(f"  log: {self.log}", style="dim", no_wrap=True, overflow="ellipsis"))

    def start(self, env: str, index: int, total: int, step: str, log: Path, counter: Counter) -> None:
        from rich.live import Live

        super().start(env, index, total, step, log, counter)
        self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=True)
        self._live.start()

    def poll(self) -> None:
        super().poll()
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    def finish(self, ok: bool, detail: str = "") -> None:
        self.close()
        super().finish(ok, detail)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def make_display() -> StepDisplay:
    """A live display on a terminal, plain lines otherwise."""
    return LiveDisplay() if sys.stdout.isatty() else PlainDisplay()
