"""The engine's per-driver files in ``engine.state_dir``, and their removal once their driver is gone.

Each driver names its files ``<kind>-<host>-<pid>.<ext>`` (``segment-node7-4242.json``: the config its segment
worker reads; ``logs/reconstruct-node7-4242.log``: that worker's own log, across runs; ``logs/vlm-…log``: the
managed vLLM server's). A driver that is killed cannot remove them, so every engine, when it starts, removes
the files of this host's drivers that no longer run: configs at once, logs after :data:`KEEP_LOGS_S` (a crash's
log stays long enough to be read). Files of other hosts (a state dir shared over NFS by cluster nodes) are left
to those hosts, and the child records of :mod:`pipeline.driver.reaper` (``children-…``) to the reaper, which
needs them to stop a dead driver's children. Files named before the host was part of the name
(``segment-4242.json``) go after :data:`KEEP_LEGACY_S`.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from pipeline.handoff import LOGS_DIR

__all__ = ["KEEP_LOGS_S", "alive", "driver_file", "remove_dead_drivers_files"]

KEEP_LOGS_S = 24 * 3600.0
KEEP_LEGACY_S = 7 * 24 * 3600.0
_NAME = re.compile(r"^(?P<kind>segment|reconstruct|vlm)-(?P<host>.+)-(?P<pid>\d+)\.(?:json|log)$")
_LEGACY = re.compile(r"^(?:segment|reconstruct|vlm)-\d+\.(?:json|log)$")


def _host() -> str:
    return socket.gethostname().replace("/", "_")


def driver_file(state_dir: Path, kind: str, suffix: str, *, log: bool = False) -> Path:
    """This driver's file of ``kind`` (``segment``, ``reconstruct``, ``vlm``): ``[logs/]<kind>-<host>-<pid><suffix>``."""
    folder = state_dir / LOGS_DIR if log else state_dir
    return folder / f"{kind}-{_host()}-{os.getpid()}{suffix}"


def alive(pid: int) -> bool:
    """Is process ``pid`` of this host alive (someone else's counts as alive)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_dead_drivers_files(state_dir: Path, *, now: float | None = None) -> list[Path]:
    """Remove what dead drivers of this host left in ``state_dir`` (see the module docstring); the paths removed.
    Unreadable or vanished files are skipped: this is housekeeping, never a reason to fail a run."""
    now = time.time() if now is None else now
    host = _host()
    removed = []
    candidates = [*state_dir.glob("*.json"), *(state_dir / LOGS_DIR).glob("*.log")]
    for path in candidates:
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        match = _NAME.match(path.name)
        if match and match["host"] == host and int(match["pid"]) != os.getpid() and not alive(int(match["pid"])):
            stale = path.suffix == ".json" or age > KEEP_LOGS_S
        else:
            stale = bool(_LEGACY.match(path.name)) and age > KEEP_LEGACY_S
        if stale:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
