"""Children die with the driver, however the driver dies.

Three layers, from fastest to last resort:

1. **A guardian process** (``python -m pipeline.driver.reaper``, stdlib only), started in its own session by an
   active :class:`ChildGuard` just before it registers its first child (a driver that starts no child, such as a
   rerun whose stages are all up to date, starts no guardian and waits for none). The driver tells it on a pipe which process groups it started; when the pipe
   reaches end of file — the driver exited, was killed with SIGKILL, or crashed — the guardian sends SIGTERM to
   every group still registered, waits :data:`GRACE_S`, then SIGKILL. This is what stops a managed vLLM server
   (whose code we do not control) within a second of the driver's death.
2. **Stage workers watch their parent** themselves (``prctl`` parent-death signal and a pid poll, see
   :mod:`pipeline.stages.protocol`).
3. **Records**: every guarded child is listed with its pid and kernel start time in
   ``<state_dir>/children-<host>-<driver pid>.json``. A new :class:`ChildGuard` on the same host stops the
   children listed by drivers that are gone (matching the start time, so a reused pid is never signalled).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["ChildGuard", "process_start_time", "stop_stale_children", "GRACE_S"]

GRACE_S = 0.5
RECORD_PREFIX = "children-"


def process_start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its closing parenthesis
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _is_same_process(pid: int, start_time: int | None) -> bool:
    return start_time is not None and process_start_time(pid) == start_time


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _record_path(state_dir: Path, pid: int) -> Path:
    return state_dir / f"{RECORD_PREFIX}{socket.gethostname()}-{pid}.json"


def stop_stale_children(state_dir: Path) -> list[str]:
    """Stop the children recorded by drivers of this host that are gone; returns one line per child stopped."""
    stopped: list[str] = []
    for path in state_dir.glob(f"{RECORD_PREFIX}{socket.gethostname()}-*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if _is_same_process(int(record["driver_pid"]), record.get("driver_start")):
            continue  # that driver is alive: its children are its business
        for child in record.get("children", []):
            if _is_same_process(int(child["pid"]), child.get("start")):
                _kill_group(int(child["pid"]), signal.SIGKILL)
                stopped.append(f"{child.get('what', 'child')} (pid {child['pid']}) left by driver pid {record['driver_pid']}")
        path.unlink(missing_ok=True)
    return stopped


class ChildGuard:
    """Registers each child process group with a guardian process and a record file (see module docstring).

    Use as a context manager around everything that starts children; :func:`pipeline.driver.proc.spawn`
    registers each child with the innermost active guard of the process.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._children: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._guardian: Any = None
        self._pipe: IO[str] | None = None
        self.stale: list[str] = []

    def __enter__(self) -> "ChildGuard":
        from pipeline.driver import proc

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.stale = stop_stale_children(self.state_dir)
        self._write_record()
        proc.push_guard(self)
        return self

    def ready(self) -> None:
        """Start the guardian process unless it runs (called before each guarded child is started)."""
        with self._lock:
            if self._guardian is None:
                self._start_guardian()

    def _start_guardian(self) -> None:
        import subprocess

        from pipeline.driver import proc

        self._guardian = proc.spawn(
            [sys.executable, "-m", "pipeline.driver.reaper"],
            env=os.environ,
            cwd=Path(__file__).resolve().parent.parent.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            guarded=False,
        )
        self._pipe = self._guardian.stdin

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the guardian (it stops whatever is still registered) and remove the record."""
        from pipeline.driver import proc

        proc.pop_guard(self)
        if self._pipe is not None:
            try:
                self._pipe.close()
            except OSError:
                pass
            self._pipe = None
        if self._guardian is not None:
            try:
                self._guardian.wait(timeout=5)
            except Exception:  # noqa: BLE001 - the guardian is best effort; the record remains as backstop
                pass
            self._guardian = None
        _record_path(self.state_dir, os.getpid()).unlink(missing_ok=True)

    def watch(self, pid: int, what: str) -> None:
        """Register the process group led by ``pid`` (a child started with its own session)."""
        self.ready()
        with self._lock:
            self._children[pid] = {"pid": pid, "start": process_start_time(pid), "what": what}
            self._send(f"add {pid}")
            self._write_record()

    def forget(self, pid: int) -> None:
        """Unregister a child group the driver stopped itself."""
        with self._lock:
            if self._children.pop(pid, None) is not None:
                self._send(f"del {pid}")
                self._write_record()

    def _send(self, line: str) -> None:
        if self._pipe is not None:
            try:
                self._pipe.write(line + "\n")
                self._pipe.flush()
            except OSError:
                pass

    def _write_record(self) -> None:
        record = {
            "driver_pid": os.getpid(),
            "driver_start": process_start_time(os.getpid()),
            "host": socket.gethostname(),
            "children": list(self._children.values()),
        }
        path = _record_path(self.state_dir, os.getpid())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)


def _serve(stream: IO[str]) -> None:
    """Guardian loop: track ``add PGID`` / ``del PGID`` lines; on end of input stop every group still listed."""
    groups: set[int] = set()
    for line in stream:
        verb, _, arg = line.strip().partition(" ")
        if verb == "add" and arg.isdigit():
            groups.add(int(arg))
        elif verb == "del" and arg.isdigit():
            groups.discard(int(arg))
    for pgid in groups:
        _kill_group(pgid, signal.SIGTERM)
    if groups:
        time.sleep(GRACE_S)
    for pgid in groups:
        _kill_group(pgid, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not end the guardian
    _serve(sys.stdin)
