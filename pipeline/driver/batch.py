"""Batch mode: many images through one warm engine, each into its own run directory.

Inputs (:func:`read_items`): image folders, globs or files, with one ``--query``/``--prompt`` for all; or a
JSONL/CSV list whose lines carry their own ``image`` (relative to the list file), ``query`` or ``prompt``
(commas split phrases), an optional ``out`` (run directory under the batch root) and per-line options as dotted
config keys (``"segment.threshold": 0.3``) or the shortcuts of :data:`SHORTCUTS`. A line that cannot run is
recorded with its line number and skipped; the others go on.

Each image's run directory is ``ROOT/<image stem>-<8 hex>`` (hash of the image path, the request and the
per-line options), so a rerun of the same batch finds its runs and skips what is up to date. The summary
(:mod:`pipeline.driver.summary`, ``ROOT/batch.json`` by default; written when the batch starts and when it ends,
merged with a batch running on the same root at the same time) lists per image: status, objects, per-stage
seconds and decisions, error line; a summary that cannot be written (a full disk) is said in one line and the
batch goes on. Exit codes: 0 all succeeded, 1 some failed or were busy in another run, 130 Ctrl-C, 143 SIGTERM/SIGUSR1 (a clean
stop: the image in flight is abandoned and marked interrupted, finished ones are kept).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipeline.config import MAX_DEPTH, STAGE_NAMES, PipelineConfig, RequestLimits, apply_overrides, check_shape, preview
from pipeline.driver.engine import Engine, RunHandle
from pipeline.driver.runner import RunRequest, Runner, check_request_text
from pipeline.driver.summary import ItemStatus, SummaryItem, summary_clock, write_summary
from pipeline.errors import EXIT_INTERRUPTED, EXIT_STAGE_FAILED, PipelineError, RunLocked, UsageError
from pipeline.handoff import MANIFEST_NAME, MASKS_DIR, OBJECTS_DIR, MaskManifest, ObjectsManifest, load_manifest

__all__ = [
    "BatchItem", "ItemResult", "SHORTCUTS", "IMAGE_SUFFIXES", "EXIT_STOPPED", "read_items", "run_batch",
    "SUMMARY_NAME", "requests_for", "MAX_LINE_BYTES",
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
#: Longest line of a ``--list`` file (the file itself may be any size; a longer line is reported, not read).
MAX_LINE_BYTES = 64 * 1024
_MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
Reporter = Callable[[str], None]


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
    notes: tuple[str, ...] = ()  # what was changed in its request (repeated phrases dropped)


@dataclass
class ItemResult:
    """How one image went: ``status`` is one of :data:`~pipeline.driver.summary.ItemStatus`."""

    item: BatchItem
    status: ItemStatus
    objects: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def as_item(self) -> SummaryItem:
        """Its entry in ``batch.json``."""
        return SummaryItem(
            source=self.item.source, image=str(self.item.image) if self.item.image else None,
            run_dir=str(self.item.run_dir), status=self.status, objects=self.objects, timings=self.timings,
            stages=self.decisions, error=self.error, notes=list(self.item.notes),
        )


# ---------------------------------------------------------------------------------------------- reading


def _say_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _folder(folder: Path, recursive: bool) -> tuple[list[Path], list[str]]:
    """A folder's images (sorted; with ``recursive`` its subfolders' too, symlinked folders not followed) and what
    was skipped, in words."""
    found: list[Path] = []
    subfolders = links = 0
    other: dict[str, int] = {}

    def classify(path: Path) -> None:
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
        else:
            other[path.suffix.lower() or "no extension"] = other.get(path.suffix.lower() or "no extension", 0) + 1

    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):  # followlinks=False: a link cannot loop the walk
            links += sum((Path(dirpath) / d).is_symlink() for d in dirnames)
            dirnames.sort()
            for name in filenames:
                classify(Path(dirpath) / name)
    else:
        for path in folder.iterdir():
            if path.is_dir():
                subfolders += 1
            else:
                classify(path)
    skipped = []
    if subfolders:
        skipped.append(f"{subfolders} subfolder{'s' if subfolders > 1 else ''} (--recursive includes them)")
    if links:
        skipped.append(f"{links} symlinked folder{'s' if links > 1 else ''} (not followed)")
    if other:
        total = sum(other.values())
        kinds = ", ".join(sorted(other)[:6]) + (", ..." if len(other) > 6 else "")
        skipped.append(f"{total} file{'s' if total > 1 else ''} of another type ({kinds})")
    return sorted(found), skipped


def _expand(pattern: str, *, recursive: bool = False, say: Reporter = _say_stderr) -> list[Path]:
    """A folder (its images, sorted), a glob (its matches that are images) or one file; what a folder or glob
    held besides images is said in one line."""
    path = Path(pattern)
    if path.is_dir():
        found, skipped = _folder(path, recursive)
        if not found:
            raise UsageError(f"no images in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})",
                             hint="point --images at a folder of photos, or pass a glob such as 'photos/*.jpg'"
                             + ("" if recursive else "; --recursive also looks in its subfolders"))
    elif any(ch in pattern for ch in "*?["):
        matches = [Path(p) for p in glob.glob(pattern, recursive=recursive)]
        found = sorted(p for p in matches if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise UsageError(f"no images match {preview(pattern)!r}", hint="check the pattern; quote it so the shell leaves it alone")
        folders = sum(p.is_dir() for p in matches)
        others = len(matches) - len(found) - folders
        skipped = ([f"{folders} folder{'s' if folders > 1 else ''}"] if folders else []) + \
                  ([f"{others} file{'s' if others > 1 else ''} of another type"] if others else [])
    else:
        return [path]
    if skipped:
        say(f"note: {preview(pattern)}: {len(found)} image{'s' if len(found) > 1 else ''}; skipped {', '.join(skipped)}")
    return found


def _unique(images: Sequence[Path], say: Reporter) -> list[Path]:
    """``images`` without the files named twice (two globs, a file and its folder, a symlink to it): the same
    resolved file runs once, under the name given first."""
    first: dict[Path, Path] = {}
    repeats: list[str] = []
    for image in images:
        try:
            key = image.resolve()
        except (OSError, RuntimeError):  # a symlink loop: it fails later, as a run, with its own error
            key = image
        if key in first:
            repeats.append(f"{preview(str(image), 60)} " + (f"= {preview(str(first[key]), 60)}" if image != first[key]
                                                            else "(again)"))
            continue
        first[key] = image
    if repeats:
        shown = "; ".join(repeats[:3]) + ("; ..." if len(repeats) > 3 else "")
        say(f"note: {len(repeats)} image{'s' if len(repeats) > 1 else ''} named more than once, run once: {shown}")
    return list(first.values())


def _inside_root(out_root: Path, run_dir: Path, given: str) -> Path:
    """``run_dir`` if it stays inside ``out_root`` once resolved (``..`` and symlinks followed) and is not the
    root itself; the path is returned under ``out_root`` without ``..``. ValueError saying why otherwise."""
    root = Path(out_root).resolve()
    try:
        resolved = (root / run_dir).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise ValueError(f"'out' {given!r} cannot be resolved (a symlink loop?)") from None
    try:
        rel = resolved.relative_to(root)
    except ValueError:
        raise ValueError(f"'out' {given!r} leads outside the batch root {preview(str(out_root))} (.. or a symlink); "
                         "give a path inside it, e.g. 'kitchen/001'") from None
    if rel == Path("."):
        raise ValueError(f"'out' {given!r} is the batch root itself; give a folder inside it, e.g. 'kitchen/001'")
    return Path(out_root) / rel


def _line_run_dir(out_root: Path, out: Any) -> Path:
    """A line's ``out``: a relative path that stays inside the batch root (see :func:`_inside_root`)."""
    if not isinstance(out, str):
        raise ValueError(f"'out' must be a path (a string), not {type(out).__name__}")
    given = preview(out, 60)
    if Path(out).is_absolute() or out.startswith("~"):
        raise ValueError(f"'out' {given!r} is an absolute path; give a path relative to the batch root, e.g. 'kitchen/001'")
    if "\0" in out or len(out) > _MAX_PATH_CHARS:
        raise ValueError(f"'out' {given!r} is not a usable path (a NUL character, or over {_MAX_PATH_CHARS} characters)")
    if len(Path(out).parts) > MAX_DEPTH:  # thousands of nested folders are legal, and a burden to every tool after
        raise ValueError(f"'out' {given!r} has more than {MAX_DEPTH} folder levels; give a short path such as 'kitchen/001'")
    return _inside_root(out_root, Path(out), given)


def _run_dir(out_root: Path, image: Path, query: str | None, prompts: Sequence[str], overrides: Sequence[str]) -> Path:
    from pipeline.api import default_run_dir, run_key

    key = run_key(query, prompts) + "".join(f"\n{o}" for o in sorted(overrides))
    run_dir = default_run_dir(_with_root(out_root), image, key)
    return _inside_root(out_root, run_dir.relative_to(out_root), run_dir.name)  # a symlink put there may lead out


def _with_root(out_root: Path) -> PipelineConfig:
    return PipelineConfig.model_validate({"run": {"out_root": str(out_root)}})


def _overrides(row: dict[str, Any]) -> tuple[str, ...]:
    out = []
    for key, value in row.items():
        if key in _LINE_KEYS or value is None or value == "":
            continue
        dotted = SHORTCUTS.get(key, key)
        if "." not in dotted:
            raise ValueError(f"unknown option {preview(key)!r} (use a dotted config key or one of {', '.join(SHORTCUTS)})")
        out.append(f"{dotted}={json.dumps(value) if not isinstance(value, str) else value}")
    return tuple(out)


def _text(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) and not (key == "prompt" and isinstance(value, list)
                                           and all(isinstance(v, str) for v in value)):
        raise ValueError(f"'{key}' must be {'text or a list of phrases' if key == 'prompt' else 'text'}, "
                         f"not {type(value).__name__}")
    return value


def _item_from_row(row: dict[str, Any], source: str, base: Path, out_root: Path, query: str | None,
                   prompts: tuple[str, ...], limits: RequestLimits) -> BatchItem:
    image = _text(row, "image")
    if not image:
        raise ValueError("no 'image'")
    if "\0" in image or len(image) > _MAX_PATH_CHARS:
        raise ValueError(f"'image' {preview(image, 60)!r} is not a usable path (a NUL character, or over "
                         f"{_MAX_PATH_CHARS} characters)")
    image_path = Path(image).expanduser()
    if not image_path.is_absolute():
        image_path = base / image_path
    try:  # run.limits, as for --query/--prompt
        text = check_request_text(_text(row, "query"), _text(row, "prompt"), limits)
    except UsageError as exc:
        raise ValueError(exc.message) from None
    line_query, line_prompts, notes = text.query, text.prompts, text.notes
    if line_query is not None and line_prompts:
        raise ValueError("both 'query' and 'prompt'; give one")
    if line_query is None and not line_prompts:
        line_query, line_prompts = query, prompts
    if line_query is None and not line_prompts:
        raise ValueError("no 'query' or 'prompt' (and none given on the command line)")
    overrides = _overrides(row)
    out = row.get("out")
    run_dir = (_line_run_dir(out_root, out) if out not in (None, "")
               else _run_dir(out_root, image_path, line_query, line_prompts, overrides))
    return BatchItem(source, image_path, line_query, line_prompts, overrides, run_dir, notes=notes)


def _lines(list_file: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) per line, read as bytes: a line over :data:`MAX_LINE_BYTES` or one that is not
    UTF-8 comes as its error (the file's byte offset named), so one bad line never stops the others."""
    with open(list_file, "rb") as fh:
        n = 0
        while True:
            offset = fh.tell()
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (more := fh.readline(MAX_LINE_BYTES)) and not more.endswith(b"\n"):
                    pass  # the rest of the long line is skipped unread
                yield n, None, f"line is longer than {MAX_LINE_BYTES // 1024} KB (one JSON object or CSV row per line)"
                continue
            try:
                yield n, raw.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                yield n, None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {offset + exc.start} of the file)"


def _json_row(line: str) -> dict[str, Any] | str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return f"not usable JSON (nested deeper than {MAX_DEPTH} levels)"
    except ValueError as exc:  # e.g. an int of more than 4300 digits
        return f"not usable JSON ({preview(str(exc))})"
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    try:
        check_shape(row, "the line")
    except PipelineError as exc:
        return exc.message
    return row


def _csv_rows(list_file: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    errors: list[tuple[int, str]] = []

    def texts() -> Iterator[str]:
        for n, text, error in _lines(list_file):
            if error is not None:
                errors.append((n, error))
                yield "\n"  # an empty row: the reader skips it, the error is reported in its place
            else:
                yield text or ""

    reader = csv.reader(texts())
    header: list[str] | None = None
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append((reader.line_num, f"not valid CSV ({preview(str(exc))})"))
            continue
        yield from ((n, e) for n, e in errors)
        errors.clear()
        if not values:
            continue
        if header is None:
            header = [v.strip() for v in values]
            continue
        row = {k: v.strip() for k, v in zip(header, values) if k}
        yield reader.line_num, row
    yield from ((n, e) for n, e in errors)


def _rows(list_file: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) for each non-empty line; a row that cannot be parsed comes as its error text."""
    if list_file.suffix.lower() == ".csv":
        yield from _csv_rows(list_file)
        return
    for n, line, error in _lines(list_file):
        if error is not None:
            yield n, error
        elif line is not None and line.strip() and not line.lstrip().startswith("#"):
            yield n, _json_row(line)


def read_items(
    *,
    images: Sequence[str] = (),
    list_file: Path | None = None,
    query: str | None = None,
    prompts: Sequence[str] = (),
    out_root: Path,
    recursive: bool = False,
    limits: RequestLimits | None = None,
    say: Reporter = _say_stderr,
) -> list[BatchItem]:
    """The batch's items, in order. Usage errors (no images, unreadable list, a command-line query or prompt over
    ``limits``) raise; bad lines become items with an ``error``. ``say`` gets the notes (files skipped or named
    twice, repeated phrases dropped), one line each."""
    limits = limits or RequestLimits()
    if bool(images) == (list_file is not None):
        raise UsageError("give either --images DIR|GLOB ... or --list FILE", hint="e.g. --images photos/ --prompt horse")
    notes: tuple[str, ...] = ()
    if query is not None or prompts:
        text = check_request_text(query, prompts, limits)
        query, prompts, notes = text.query, text.prompts, text.notes
        for note in notes:
            say(f"note: {note}")
    else:
        prompts = ()
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
                item = _item_from_row(row, source, list_file.parent, out_root, query, tuple(prompts), limits)
            except ValueError as exc:
                items.append(BatchItem(source, None, None, (), (), out_root, error=str(exc)))
                continue
            items.append(item)
            for note in item.notes:
                say(f"{source}: note: {note}")
        if not items:
            raise UsageError(f"{list_file} has no lines", hint="one JSON object per line, e.g. {\"image\": \"a.jpg\", \"prompt\": \"horse\"}")
        return items
    if (query is None) == (not prompts):
        raise UsageError("give exactly one of --query TEXT or --prompt TEXT for the images",
                         hint="or use --list FILE whose lines carry their own query or prompt")
    found = [image for pattern in images for image in _expand(pattern, recursive=recursive, say=say)]
    for image in _unique(found, say):
        try:
            run_dir = _run_dir(out_root, image, query, prompts, ())
        except ValueError as exc:
            items.append(BatchItem(str(image), None, None, (), (), out_root, error=str(exc)))
            continue
        items.append(BatchItem(str(image), image, query, tuple(prompts), (), run_dir, notes=notes))
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
        status: ItemStatus = "busy" if isinstance(handle.error, RunLocked) else handle.state  # type: ignore[assignment]
        return ItemResult(item, status, 0, timings, decisions, error)
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
    started = summary_clock()
    # if this one cannot be written, the final one cannot either, and its line is printed with the summary
    write_summary(summary_path, [ItemResult(item, "pending").as_item() for item, _ in pairs], started=started)
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
    not_written = write_summary(summary_path, [r.as_item() for r in ordered], started=started, ended=summary_clock(),
                                stopped=stopped)
    view.print_summary(ordered, summary_path, not_written=not_written)
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
