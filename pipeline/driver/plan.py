"""Pure planning: for each requested stage, "run" or "skip" and why. No side effects.

The checks go cheapest first and stop at the first reason::

    forced (--force STAGE, or at/after --from STAGE)  → run
    an upstream stage in this plan runs               → run ("upstream 'segment' runs")   [dry-run only*]
    no manifest                                       → run ("no previous output")
    manifest unreadable / old schema                  → run (the manifest's own message)
    fingerprint differs                               → run ("inputs, config or code changed")
    an output file missing or modified                → run ("masks/001.png is missing")
    otherwise                                         → skip ("up to date")

(*) During a real run each stage is planned just before it runs, with its fingerprint computed from the
upstream outputs that now exist, so a forced upstream stage that produced identical outputs does not
force its downstream stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from pipeline.atomic import sha256_file
from pipeline.config import STAGE_NAMES, preview
from pipeline.errors import ManifestError, UsageError
from pipeline.handoff import FileRecord

__all__ = ["Decision", "RecordedOutputs", "decide", "check_stage_names", "stages_from"]


@dataclass(frozen=True)
class Decision:
    """What to do with one stage, and the reason shown to the user."""

    stage: str
    action: Literal["run", "skip"]
    reason: str

    @property
    def runs(self) -> bool:
        """True when the stage will run."""
        return self.action == "run"


@dataclass(frozen=True)
class RecordedOutputs:
    """What a previous run left for a stage: its manifest's fingerprint and listed files (or why unusable)."""

    fingerprint: str | None
    files: tuple[FileRecord, ...] = ()
    problem: str | None = None


def check_stage_names(names: Sequence[str], flag: str) -> None:
    """Reject unknown stage names given to ``--force``/``--from`` with a usage error listing the valid ones."""
    for name in names:
        if name not in STAGE_NAMES:
            raise UsageError(f"{flag} {preview(name, 40)!r}: unknown stage", hint=f"stages are: {', '.join(STAGE_NAMES)}")


def stages_from(stage: str | None) -> set[str]:
    """The stages at and after ``stage`` (``--from``); empty for None."""
    if stage is None:
        return set()
    return set(STAGE_NAMES[STAGE_NAMES.index(stage):])


def _first_bad_file(run_dir: Path, files: Sequence[FileRecord]) -> str | None:
    for rec in files:
        path = run_dir / rec.path
        if not path.exists():
            return f"{rec.path} is missing"
        size_differs = rec.size >= 0 and path.stat().st_size != rec.size  # size -1: not recorded
        if size_differs or sha256_file(path) != rec.sha256:
            return f"{rec.path} was modified"
    return None


def decide(
    stage: str,
    *,
    run_dir: Path,
    fingerprint: str | None,
    recorded: RecordedOutputs | ManifestError | None,
    forced: bool,
    upstream_runs: str | None = None,
) -> Decision:
    """Decide one stage. ``fingerprint`` None means "not computable yet" (an upstream stage will rerun)."""
    if forced:
        return Decision(stage, "run", "forced")
    if upstream_runs:
        return Decision(stage, "run", f"upstream '{upstream_runs}' runs")
    if recorded is None:
        return Decision(stage, "run", "no previous output")
    if isinstance(recorded, ManifestError):
        return Decision(stage, "run", recorded.message)
    if recorded.problem:
        return Decision(stage, "run", recorded.problem)
    if fingerprint is None or recorded.fingerprint != fingerprint:
        return Decision(stage, "run", "inputs, config or code changed")
    bad = _first_bad_file(run_dir, recorded.files)
    if bad:
        return Decision(stage, "run", bad)
    return Decision(stage, "skip", "up to date")
