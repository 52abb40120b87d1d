"""Batch mode: many images through one warm engine, each into its own run directory.

Inputs (:func:`read_items`): image folders, globs or files, with one ``--query``/``--prompt`` for all; or a
JSONL/CSV list whose lines carry their own ``image`` (relative to the list file), ``query`` or ``prompt``
(commas split phrases), an optional ``out`` (run directory under the batch root) and per-line options as dotted
config keys (``"segment.threshold": 0.3``) or the shortcuts of :data:`SHORTCUTS`. A line that cannot run is
recorded with its line number and skipped; the others go on.

Each image's run directory is ``ROOT/<image stem>-<8 hex>`` (hash of the image path, the request and the
per-line options), so a rerun of the same batch finds its runs and skips what is up to date. The summary
(:func:`write_summary`, ``ROOT/batch.json`` by default) lists per image: status, objects, per-stage seconds and
decisions, error line. Exit codes: 0 all succeeded, 1 some failed, 130 Ctrl-C, 143 SIGTERM/SIGUSR1 (a clean
stop: the image in flight is abandoned and marked interrupted, finished ones are kept).
"""

from __future__ import annotations

import csv
import glob
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.atomic import write_json_atomic
from pipeline.config import STAGE_NAMES, PipelineConfig, apply_overrides
from pipeline.driver.engine import Engine, RunHandle
from pipeline.driver.runner import RunRequest, Runner, split_phrases
from pipeline.errors import EXIT_INTERRUPTED, EXIT_STAGE_FAILED, PipelineError, UsageError
from pipeline.handoff import MANIFEST_NAME, MASKS_DIR, OBJECTS_DIR, MaskManifest, ObjectsManifest, load_manifest, now_iso

__all__ = [
    "BatchItem", "ItemResult", "SHORTCUTS", "IMAGE_SUFFIXES", "EXIT_STOPPED", "read_items", "run_batch",
    "write_summary", "SUMMARY_NAME", "requests_for",
]

SUMMARY_NAME = "batch.json"
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped by a signal (e.g. SLURM's warning before the time limit)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
SHORTCUTS = {
    "threshold": "segment.threshold",
    "max_objects": "segment.max_objects",
    "seed": "reconstruct.seed",
    "frame": "reconstruct.frame",
    "export": "reconstruct.exports",
}
_LINE_KEYS = frozenset({"image", "query", "prompt", "out"})


@dataclass(frozen=True)
class BatchItem:
    """One image of a batch. ``error`` is set when the line cannot run (it is then reported, never run)."""

    source: str
    image: Path | None
    query: str | None
    prompts: tuple[str, ...]
    overrides: tuple[str, ...]
    run_dir: Path
    error: str | None = None


@dataclass
class ItemResult:
    """How one image went: ``status`` is succeeded, no objects, failed, cancelled or invalid."""

    item: BatchItem
    status: str
    objects: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.item.source,
            "image": str(self.item.image) if self.item.image else None,
            "run_dir": str(self.item.run_dir),
            "status": self.status,
            "objects": self.objects,
            "timings": self.timings,
            "stages": self.decisions,
            "error": self.error,
        }


# ---------------------------------------------------------------------------------------------- reading


def _expand(pattern: str) -> list[Path]:
    """A folder (its images, sorted), a glob (its matches that are images) or one file."""
    path = Path(pattern)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UsageError(f"no images in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})",
                             hint="point --images at a folder of photos, or pass a glob such as 'photos/*.jpg'")
        return found
    if any(ch in pattern for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UsageError(f"no images match {pattern!r}", hint="check the pattern; quote it so the shell leaves it alone")
        return found
    return [path]


def _run_dir(out_root: Path, image: Path, query: str | None, prompts: Sequence[str], overrides: Sequence[str]) -> Path:
    from pipeline.api import default_run_dir, run_key

    key = run_key(query, prompts) + "".join(f"\n{o}" for o in sorted(overrides))
    return default_run_dir(_with_root(out_root), image, key)


def _with_root(out_root: Path) -> PipelineConfig:
    return PipelineConfig.model_validate({"run": {"out_root": str(out_root)}})


def _overrides(row: dict[str, Any]) -> tuple[str, ...]:
    out = []
    for key, value in row.items():
        if key in _LINE_KEYS or value is None or value == "":
            continue
        dotted = SHORTCUTS.get(key, key)
        if "." not in dotted:
            raise ValueError(f"unknown option {key!r} (use a dotted config key or one of {', '.join(SHORTCUTS)})")
        out.append(f"{dotted}={json.dumps(value) if not isinstance(value, str) else value}")
    return tuple(out)


def _item_from_row(row: dict[str, Any], source: str, base: Path, out_root: Path, query: str | None,
                   prompts: tuple[str, ...]) -> BatchItem:
    image = row.get("image")
    if not image:
        raise ValueError("no 'image'")
    image_path = Path(str(image)).expanduser()
    if not image_path.is_absolute():
        image_path = base / image_path
    line_query = row.get("query") or None
    line_prompts = split_phrases(row["prompt"]) if row.get("prompt") else ()
    if line_query is not None and line_prompts:
        raise ValueError("both 'query' and 'prompt'; give one")
    if line_query is None and not line_prompts:
        line_query, line_prompts = query, prompts
    if line_query is None and not line_prompts:
        raise ValueError("no 'query' or 'prompt' (and none given on the command line)")
    overrides = _overrides(row)
    run_dir = out_root / str(row["out"]) if row.get("out") else _run_dir(out_root, image_path, line_query, line_prompts, overrides)
    return BatchItem(source, image_path, line_query, line_prompts, overrides, run_dir)


def _rows(list_file: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) for each non-empty line; a row that cannot be parsed comes as its error text."""
    if list_file.suffix.lower() == ".csv":
        with open(list_file, newline="", encoding="utf-8") as fh:
            for n, row in enumerate(csv.DictReader(fh), start=2):
                yield n, {k.strip(): v.strip() if isinstance(v, str) else v for k, v in row.items() if k}
        return
    with open(list_file, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, f"not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            yield n, row if isinstance(row, dict) else f"not a JSON object ({type(row).__name__})"


def read_items(
    *,
    images: Sequence[str] = (),
    list_file: Path | None = None,
    query: str | None = None,
    prompts: Sequence[str] = (),
    out_root: Path,
) -> list[BatchItem]:
    """The batch's items, in order. Usage errors (no images, unreadable list) raise; bad lines become items
    with an ``error``."""
    prompts = split_phrases(prompts) if prompts else ()
    if bool(images) == (list_file is not None):
        raise UsageError("give either --images DIR|GLOB ... or --list FILE", hint="e.g. --images photos/ --prompt horse")
    items: list[BatchItem] = []
    if list_file is not None:
        if not list_file.is_file():
            raise UsageError(f"list file not found: {list_file}", hint="pass a .jsonl or .csv file")
        for n, row in _rows(list_file):
            source = f"{list_file.name}:{n}"
            if isinstance(row, str):
                items.append(BatchItem(source, None, None, (), (), out_root, error=row))
                continue
            try:
                items.append(_item_from_row(row, source, list_file.parent, out_root, query, prompts))
            except ValueError as exc:
                items.append(BatchItem(source, None, None, (), (), out_root, error=str(exc)))
        if not items:
            raise UsageError(f"{list_file} has no lines", hint="one JSON object per line, e.g. {\"image\": \"a.jpg\", \"prompt\": \"horse\"}")
        return items
    if (query is None) == (not prompts):
        raise UsageError("give exactly one of --query TEXT or --prompt TEXT for the images",
                         hint="or use --list FILE whose lines carry their own query or prompt")
    for pattern in images:
        for image in _expand(pattern):
            items.append(BatchItem(str(image), image, query, prompts, (), _run_dir(out_root, image, query, prompts, ())))
    return items


# ---------------------------------------------------------------------------------------------- running


class _Stopped(Exception):
    """SIGTERM or SIGUSR1 arrived: stop cleanly."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(signal.Signals(signum).name)


def requests_for(items: Sequence[BatchItem], config: PipelineConfig, stages: tuple[str, ...],
              force: frozenset[str], from_stage: str | None) -> Iterator[tuple[BatchItem, RunRequest | str]]:
    for item in items:
        if item.error is not None:
            yield item, item.error
            continue
        try:
            cfg = apply_overrides(config, item.overrides, origin="this line")
        except PipelineError as exc:
            yield item, exc.message
            continue
        yield item, RunRequest(run_dir=item.run_dir, stages=stages, image=item.image, query=item.query,
                               prompts=item.prompts, force=force, from_stage=from_stage, config=cfg)


def _finished(item: BatchItem, handle: RunHandle) -> ItemResult:
    outcome = handle.outcome
    timings = {s.decision.stage: round(s.duration_s, 3) for s in outcome.stages if s.duration_s is not None} if outcome else {}
    decisions = {s.decision.stage: f"{s.decision.action} ({s.decision.reason})" for s in outcome.stages} if outcome else {}
    if handle.state != "succeeded":
        error = handle.error.message if handle.error else handle.state
        return ItemResult(item, handle.state, 0, timings, decisions, error)
    objects, reason = _count_objects(item.run_dir)
    return ItemResult(item, "succeeded" if objects else "no objects", objects, timings, decisions, reason)


def _count_objects(run_dir: Path) -> tuple[int, str | None]:
    """Objects in the run's newest manifest, and the segmenter's reason when there are none."""
    objects_path, masks_path = run_dir / OBJECTS_DIR / MANIFEST_NAME, run_dir / MASKS_DIR / MANIFEST_NAME
    try:
        masks = load_manifest(masks_path, MaskManifest) if masks_path.exists() else None
        if objects_path.exists():
            return len(load_manifest(objects_path, ObjectsManifest).objects), masks.reason if masks else None
        return (len(masks.objects), masks.reason) if masks else (0, None)
    except PipelineError as exc:
        return 0, exc.message


def write_summary(path: Path, results: Sequence[ItemResult], *, started: str, stopped: str | None) -> None:
    """``batch.json``: counts by status and one entry per image (written atomically)."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    write_json_atomic(path, {
        "schema_version": 1, "started": started, "ended": now_iso(), "stopped": stopped,
        "counts": counts, "items": [r.as_json() for r in results],
    })


def run_batch(
    config: PipelineConfig,
    items: Sequence[BatchItem],
    *,
    stages: tuple[str, ...] = STAGE_NAMES,
    force: frozenset[str] = frozenset(),
    from_stage: str | None = None,
    summary_path: Path,
    dry_run: bool = False,
) -> int:
    """Run every item through one engine with live progress; print a summary; write ``summary_path``.
    Returns the exit code (see the module docstring)."""
    from pipeline.driver.batch_view import BatchView

    pairs = list(requests_for(items, config, stages, force, from_stage))
    if dry_run:
        return _print_plan(pairs)
    started = now_iso()
    results: dict[int, ItemResult] = {}
    view = BatchView(len(pairs), stages)
    old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGUSR1)}
    stopped: str | None = None
    handles: dict[str, tuple[int, BatchItem]] = {}
    pending: list[tuple[int, RunHandle]] = []
    try:
        with view, Engine(config, on_event=view.on_event) as engine:
            for i, (item, req) in enumerate(pairs):
                if isinstance(req, str):
                    results[i] = ItemResult(item, "invalid", error=req)
                    view.item_done(results[i])
                    continue
                try:
                    h = engine.submit(req)
                except PipelineError as exc:
                    results[i] = ItemResult(item, "failed", error=exc.message)
                    view.item_done(results[i])
                    continue
                handles[h.id] = (i, item)
                view.named(h.id, item.source)
                pending.append((i, h))
            for i, h in pending:
                h._done.wait()
                results[i] = _finished(handles[h.id][1], h)
                view.item_done(results[i])
    except KeyboardInterrupt:
        stopped = "SIGINT"
    except _Stopped as exc:
        stopped = str(exc)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    for i, h in pending:  # after a stop: runs that ended before the engine closed count as they ended
        if i not in results and h.done():
            results[i] = _finished(handles[h.id][1], h)
    ordered = [results.get(i) or ItemResult(item, "cancelled", error="not run: the batch was stopped")
               for i, (item, _) in enumerate(pairs)]
    write_summary(summary_path, ordered, started=started, stopped=stopped)
    view.print_summary(ordered, summary_path)
    if stopped == "SIGINT":
        return EXIT_INTERRUPTED
    if stopped:
        return EXIT_STOPPED
    return EXIT_STAGE_FAILED if any(r.status not in ("succeeded", "no objects") for r in ordered) else 0


def _print_plan(pairs: Sequence[tuple[BatchItem, RunRequest | str]]) -> int:
    for item, req in pairs:
        if isinstance(req, str):
            print(f"{item.source}: invalid: {req}")
            continue
        try:
            plan = Runner(req.config or PipelineConfig()).plan(req)
        except PipelineError as exc:
            print(f"{item.source}: error: {exc.message}")
            continue
        print(f"{item.source} → {item.run_dir}: " + ", ".join(f"{d.stage} {d.action} ({d.reason})" for d in plan))
    return 0
