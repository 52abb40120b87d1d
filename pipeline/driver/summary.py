"""The batch summary, ``ROOT/batch.json``: how each image of a batch went, safe with two drivers on one root.

A batch writes its summary twice: when it starts (every image ``pending``, ``ended`` null), so that an older
summary never stays behind claiming results this batch may change, and when it ends. Both writes hold an
``flock`` on the summary's folder and merge with the summary found there when it belongs to a batch that ran at
the same time (its driver still alive, or it ended after this batch started): images of that batch this one did
not list are kept, and an image this one found ``busy`` (its run directory locked by that batch) keeps that
batch's entry. A summary of an earlier batch is replaced, not merged.

A summary that cannot be written (a full disk, a read-only mount) is not an error of the images: the writer
returns one line saying so (and removes an older summary when it can), and the batch goes on.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.atomic import write_json_atomic
from pipeline.driver.statefiles import alive

__all__ = ["SUMMARY_SCHEMA_VERSION", "ItemStatus", "SummaryItem", "DriverRef", "BatchSummary", "summary_clock",
           "this_driver", "write_summary", "read_summary"]

SUMMARY_SCHEMA_VERSION = 2
ItemStatus = Literal["pending", "succeeded", "no objects", "failed", "busy", "cancelled", "invalid"]
_FINAL = frozenset({"succeeded", "no objects", "failed", "cancelled", "invalid"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SummaryItem(_Model):
    """One image: ``status`` is pending (not finished when the summary was written), succeeded, no objects,
    failed, busy (its run directory was in use by another run), cancelled or invalid (its line cannot run);
    ``timings`` in seconds per stage; ``stages`` the decision per stage in words."""

    source: str
    image: str | None
    run_dir: str
    status: ItemStatus
    objects: int = 0
    timings: dict[str, float] = Field(default_factory=dict)
    stages: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    notes: list[str] = Field(default_factory=list)


class DriverRef(_Model):
    """A batch driver: its host and pid, and when it started and ended (ISO 8601, UTC, milliseconds)."""

    host: str
    pid: int
    started: str
    ended: str | None = None
    stopped: str | None = None  # the signal that stopped it cleanly, if one did

    def same(self, other: "DriverRef") -> bool:
        return (self.host, self.pid, self.started) == (other.host, other.pid, other.started)


class BatchSummary(_Model):
    """``batch.json``: ``driver`` wrote it last; ``drivers`` are every batch merged into it; ``counts`` by status."""

    schema_version: Literal[2] = SUMMARY_SCHEMA_VERSION
    started: str
    ended: str | None
    stopped: str | None
    driver: DriverRef
    drivers: list[DriverRef]
    counts: dict[str, int]
    items: list[SummaryItem]


def summary_clock() -> str:
    """Now, UTC, ISO 8601 with milliseconds (the summary compares these to tell overlapping batches apart)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def this_driver(started: str, *, ended: str | None = None, stopped: str | None = None) -> DriverRef:
    """The running process as a :class:`DriverRef`."""
    return DriverRef(host=socket.gethostname(), pid=os.getpid(), started=started, ended=ended, stopped=stopped)


def read_summary(path: Path) -> BatchSummary | None:
    """The summary at ``path``, or None when there is none or it is unreadable or of another schema version."""
    try:
        return BatchSummary.model_validate_json(Path(path).read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def _overlaps(existing: BatchSummary, me: DriverRef) -> bool:
    """Did the batch that wrote ``existing`` run while this one did (still running, or ended after we started)?"""
    other = existing.driver
    if other.same(me):
        return False
    if existing.ended is None:
        return other.host != me.host or alive(other.pid)  # another host's driver cannot be checked: assume alive
    return existing.ended >= me.started


def _merge(ours: Sequence[SummaryItem], me: DriverRef, existing: BatchSummary | None) -> tuple[list[SummaryItem], list[DriverRef], str]:
    """Our items merged with those of an overlapping batch's summary; the drivers; the earliest start."""
    if existing is None or not _overlaps(existing, me):
        return list(ours), [me], me.started
    theirs = {item.run_dir: item for item in existing.items}
    merged: list[SummaryItem] = []
    for item in ours:
        other = theirs.pop(item.run_dir, None)
        keep_theirs = other is not None and other.status in _FINAL and item.status in ("busy", "pending")
        merged.append(other if keep_theirs else item)  # type: ignore[arg-type]
    merged += theirs.values()
    drivers = [d for d in existing.drivers if not d.same(me)] + [me]
    return merged, drivers, min(existing.started, me.started)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file: it works on a read-only mount too)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_summary(path: Path, items: Sequence[SummaryItem], *, started: str, ended: str | None = None,
                  stopped: str | None = None) -> str | None:
    """Write (merge, see the module docstring) the summary atomically. None when written; otherwise one line
    saying why not, after removing the older summary at ``path`` when the file system allows it."""
    path = Path(path)
    me = this_driver(started, ended=ended, stopped=stopped)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(path.parent):
            merged, drivers, first = _merge(items, me, read_summary(path))
            counts: dict[str, int] = {}
            for item in merged:
                counts[item.status] = counts.get(item.status, 0) + 1
            summary = BatchSummary(started=first, ended=ended, stopped=stopped, driver=me, drivers=drivers,
                                   counts=counts, items=merged)
            write_json_atomic(path, summary.model_dump(mode="json"))
        return None
    except OSError as exc:
        return _not_written(path, exc)


def _not_written(path: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    try:
        path.unlink()
    except FileNotFoundError:
        return f"the summary {path} could not be written ({reason}); --summary FILE writes it elsewhere"
    except OSError:
        return (f"the summary {path} could not be written ({reason}); the one there is an older batch's, left as it "
                "was; --summary FILE writes it elsewhere")
    return (f"the summary {path} could not be written ({reason}); the older one there was removed so that it is not "
            "taken for this batch's; --summary FILE writes it elsewhere")

