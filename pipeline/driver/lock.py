"""One run at a time per run directory: an exclusive, non-blocking ``flock`` on ``<run>/.lock``.

The lock is released by the kernel when the holder exits, however it exits, so a killed run never
leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import RunLocked

__all__ = ["LOCK_NAME", "run_lock"]

LOCK_NAME = ".lock"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block, or raise RunLocked at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLocked(
                f"run directory {run_dir} is in use by another run (pid {holder})",
                hint="wait for that run to finish, or pass another --out directory",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
