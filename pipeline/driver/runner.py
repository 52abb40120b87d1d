"""One run's bookkeeping: checks a request, plans each stage, locks the run directory, records ``run.json``.

Stage order is fixed: ``segment`` (image + phrases or query → masks) then ``reconstruct`` (masks → 3D). Each
stage is planned just before it runs (see :mod:`pipeline.driver.plan`) from the outputs that exist then;
:meth:`Runner.plan` predicts every decision without touching anything (``--dry-run``). The workers are not
started here: :mod:`pipeline.driver.engine` owns them and drives an :class:`ActiveRun` through its stages.
"""

from __future__ import annotations

import errno
import platform
import shutil
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.atomic import write_json_atomic
from pipeline.config import STAGE_NAMES, PipelineConfig, RequestLimits, preview
from pipeline.driver.envs import resolve_env
from pipeline.errors import InputError, ManifestError, OutputError, UsageError, output_error
from pipeline.driver.fingerprint import code_version, fingerprint, section_params
from pipeline.handoff import (
    LOGS_DIR,
    MANIFEST_NAME,
    MASKS_DIR,
    OBJECTS_DIR,
    RUN_RECORD,
    SCHEMA_VERSION,
    FileRecord,
    MaskManifest,
    ObjectsManifest,
    RunRecord,
    StageRecord,
    load_manifest,
    now_iso,
)
from pipeline.inputs import load_input
from pipeline.driver.lock import run_lock
from pipeline.driver.sources import SourceIndex, SourcePhoto, store_input
from pipeline.driver.plan import Decision, RecordedOutputs, decide, stages_from
from pipeline.driver.preflight import check_backend, check_vlm
from pipeline.stages.protocol import Job

__all__ = ["RunRequest", "StageOutcome", "RunOutcome", "Runner", "ActiveRun", "CONFIG_NAME", "validate_request",
           "PhotoSource", "split_phrases", "RequestText", "check_request_text", "check_backend"]

CONFIG_NAME = "config.json"
Reporter = Callable[[str], None]
#: How a runner learns a request's photo: path → checked, content-named photo (the engine's prefetching pool).
PhotoSource = Callable[[Path], SourcePhoto]


@dataclass(frozen=True)
class RunRequest:
    """What to run. ``image`` None means: use the input already in ``run_dir``."""

    run_dir: Path
    stages: tuple[str, ...] = STAGE_NAMES
    image: Path | None = None
    query: str | None = None
    prompts: tuple[str, ...] = ()
    force: frozenset[str] = frozenset()
    from_stage: str | None = None
    dry_run: bool = False
    masks_dir: Path | None = None  # import these masks instead of running the segment stage
    config: PipelineConfig | None = None  # this request's resolved config; None: the engine's or runner's
    notes: tuple[str, ...] = ()  # what check_request_text changed (repeated phrases dropped); said when it opens

    @property
    def mode(self) -> str:
        """``query`` (VLM agent) or ``prompt`` (phrases straight to the segmenter)."""
        return "query" if self.query is not None else "prompt"


@dataclass
class StageOutcome:
    """How one stage went: its decision and, when it ran, the worker's result."""

    decision: Decision
    result: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None  # seconds from begin to the end; None for a stage that never began


@dataclass
class RunOutcome:
    """Every stage's outcome, in order."""

    run_dir: Path
    stages: list[StageOutcome]


def split_phrases(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Prompt phrases as every entry point reads them (``--prompt``, ``--list`` lines, the Python API, the web
    form): each string split on commas, whitespace trimmed, empty pieces dropped. ``"horse, rider"`` → 2 phrases."""
    values = [value] if isinstance(value, str) else list(value or ())
    return tuple(p.strip() for v in values for p in str(v).split(",") if p.strip())


@dataclass(frozen=True)
class RequestText:
    """A request's query or phrases after :func:`check_request_text`, and a note for each thing it changed."""

    query: str | None
    prompts: tuple[str, ...]
    notes: tuple[str, ...] = ()


def _phrase_key(phrase: str) -> str:
    return " ".join(phrase.split()).casefold()


def check_request_text(query: str | None, prompt: str | Sequence[str] | None, limits: RequestLimits) -> RequestText:
    """The one place the request limits (``run.limits``) are applied, for the CLI, ``--list`` lines, the Python API
    and the web: phrases split as :func:`split_phrases`, repeats dropped (case and spacing ignored; a note says
    which), then the query length, the phrase count and each phrase's length checked.

    Raises:
        UsageError: a query or phrase too long, or too many phrases (one line, the limit's key in the hint).
    """
    phrases: list[str] = []
    repeated: list[str] = []
    seen: set[str] = set()
    for phrase in split_phrases(prompt):
        key = _phrase_key(phrase)
        (repeated if key in seen else phrases).append(phrase)
        seen.add(key)
    if query is not None and len(query.strip()) > limits.max_query_chars:
        raise UsageError(f"the query is {len(query.strip())} characters long; at most {limits.max_query_chars} are allowed",
                         hint="shorten it to a sentence, or raise run.limits.max_query_chars")
    if len(phrases) > limits.max_phrases:
        raise UsageError(f"{len(phrases)} phrases given; at most {limits.max_phrases} are allowed",
                         hint="keep the phrases that matter (commas split phrases), or raise run.limits.max_phrases")
    for phrase in phrases:
        if len(phrase) > limits.max_phrase_chars:
            raise UsageError(f"the phrase {preview(phrase, 40)!r} is {len(phrase)} characters long; at most "
                             f"{limits.max_phrase_chars} are allowed",
                             hint="a phrase names one kind of object ('red mug'), or raise run.limits.max_phrase_chars")
    notes = ()
    if repeated:
        shown = ", ".join(repr(preview(p, 40)) for p in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        notes = (f"dropped {len(repeated)} repeated phrase{'s' if len(repeated) > 1 else ''}: {shown}",)
    return RequestText(query, tuple(phrases), notes)


def validate_request(req: RunRequest, limits: RequestLimits | None = None) -> None:
    """Reject contradictory or empty requests, and those over ``limits`` (default: the request's config's
    ``run.limits``, when it has a config), with a usage error."""
    if "segment" in req.stages and req.image is not None:
        if (req.query is None) == (not req.prompts):
            raise UsageError("give exactly one of --query TEXT or --prompt TEXT", hint="--prompt horse, or --query 'the two horses on the left'")
        if req.query is not None and not req.query.strip():
            raise UsageError("--query is empty", hint="describe the objects to find, e.g. --query 'the red car'")
        if req.prompts and not all(p.strip() for p in req.prompts):
            raise UsageError("--prompt has an empty phrase", hint="pass short noun phrases such as --prompt horse")
        limits = limits or (req.config.run.limits if req.config is not None else None)
        if limits is not None:
            check_request_text(req.query, req.prompts, limits)


class Runner:
    """Runs the stages of one run directory with one resolved config.

    ``photos`` names a request's photo by content (default: a :class:`SourceIndex` in the engine's state dir,
    checked against ``run.max_pixels``); the engine passes one that was started ahead, while earlier images run.
    """

    def __init__(self, config: PipelineConfig, *, say: Reporter = print, photos: PhotoSource | None = None) -> None:
        self.config = config
        self.say = say
        self._photos = photos

    def _photo(self, path: Path) -> SourcePhoto:
        if self._photos is None:
            index = SourceIndex(self.config.engine.resolved_state_dir())
            self._photos = lambda p: index.identify(p, max_pixels=self.config.run.max_pixels)
        return self._photos(path)

    # ------------------------------------------------------------------ fingerprints and recorded state

    def _segment_fingerprint(self, req: RunRequest, image_id: str) -> str:
        cfg = self.config
        components: dict[str, Any] = {
            "stage": "segment",
            "inputs": {"image": image_id},
            "request": {"mode": req.mode, "query": req.query, "prompts": list(req.prompts)},
            "params": section_params(cfg.segment.model_dump(mode="json")),
            "env": cfg.env_for(cfg.segment.env).model_dump(mode="json", exclude={"variables"}),
            "code": code_version("segment", cfg.segment.backend),
        }
        if req.mode == "query":
            components["vlm"] = cfg.vlm.model_dump(
                mode="json", include={"url", "model", "served_name", "image_max_side", "max_tokens", "temperature", "top_p"}
            )
            components["agent"] = cfg.agent.model_dump(mode="json")
        return fingerprint(components)

    def _reconstruct_fingerprint(self, image_id: str, masks: MaskManifest) -> str:
        cfg = self.config
        return fingerprint(
            {
                "stage": "reconstruct",
                "inputs": {"image": image_id, "masks": [o.model_dump(mode="json", exclude={"decision"}) for o in masks.objects]},
                "params": section_params(cfg.reconstruct.model_dump(mode="json")),
                "env": cfg.env_for(cfg.reconstruct.env).model_dump(mode="json", exclude={"variables"}),
                "code": code_version("reconstruct", cfg.reconstruct.backend),
            }
        )

    @staticmethod
    def _recorded(run_dir: Path, stage: str) -> RecordedOutputs | ManifestError | None:
        if stage == "segment":
            path = run_dir / MASKS_DIR / MANIFEST_NAME
            if not path.exists():
                return None
            try:
                m = load_manifest(path, MaskManifest)
            except ManifestError as exc:
                return exc
            files = tuple(FileRecord(path=o.file, sha256=o.sha256, size=-1) for o in m.objects)
            return RecordedOutputs(m.fingerprint, files)
        path = run_dir / OBJECTS_DIR / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            o = load_manifest(path, ObjectsManifest)
        except ManifestError as exc:
            return exc
        return RecordedOutputs(o.fingerprint, tuple(f for rec in o.objects for f in rec.files) + tuple(o.scene))

    def _stage_fingerprint(self, stage: str, req: RunRequest, image_id: str) -> str | None:
        if stage == "segment":
            return self._segment_fingerprint(req, image_id)
        masks_path = req.run_dir / MASKS_DIR / MANIFEST_NAME
        try:
            masks = load_manifest(masks_path, MaskManifest)
        except ManifestError:
            return None
        return self._reconstruct_fingerprint(image_id, masks)

    def _decide(self, stage: str, req: RunRequest, image_id: str, upstream_runs: str | None = None) -> Decision:
        forced = stage in req.force or stage in stages_from(req.from_stage)
        fp = None if upstream_runs else self._stage_fingerprint(stage, req, image_id)
        return decide(
            stage,
            run_dir=req.run_dir,
            fingerprint=fp,
            recorded=self._recorded(req.run_dir, stage),
            forced=forced,
            upstream_runs=upstream_runs,
        )

    # ------------------------------------------------------------------ planning

    def _image(self, req: RunRequest) -> tuple[str, SourcePhoto | None]:
        """The image identity of the request (its photo's, or the run's stored input's) and the checked photo."""
        if req.image is not None:
            photo = self._photo(Path(req.image))
            return photo.identity, photo
        return load_input(req.run_dir).identity, None

    def plan(self, req: RunRequest) -> list[Decision]:
        """Predict every stage's decision without touching anything (``--dry-run``)."""
        validate_request(req)
        return self._plan(req, self._image(req)[0])

    def _plan(self, req: RunRequest, image_id: str) -> list[Decision]:
        decisions: list[Decision] = []
        upstream: str | None = None
        for stage in req.stages:
            d = self._decide(stage, req, image_id, upstream)
            decisions.append(d)
            if d.runs:
                upstream = stage
        return decisions

    def _preflight(self, req: RunRequest, image_id: str, photo: SourcePhoto | None) -> None:
        """Fail before anything is written if an input is bad or a stage that will run has no env."""
        if req.masks_dir is not None:
            from pipeline.driver.importing import check_masks

            if photo is None:
                raise UsageError("--masks needs --image (the image the masks were made from)")
            check_masks(req.masks_dir, (photo.facts.width, photo.facts.height))
        for d in self._plan(req, image_id):
            if not d.runs:
                continue
            section = self.config.stage(d.stage)
            check_backend(self.config, d.stage, resolve_env(self.config, section.env))
            if d.stage == "segment" and req.mode == "query" and self.config.vlm.url is None:
                check_vlm(self.config)
            if d.stage == "reconstruct" and "segment" not in req.stages and req.masks_dir is None:
                if not (req.run_dir / MASKS_DIR / MANIFEST_NAME).exists():
                    raise InputError(
                        f"{req.run_dir} has no {MASKS_DIR}/{MANIFEST_NAME}",
                        hint="run the segment stage first, or pass --masks DIR --image IMG",
                    )

    # ------------------------------------------------------------------ records

    def _open_record(self, req: RunRequest, photo: SourcePhoto | None) -> RunRecord:
        run_dir = req.run_dir
        path = run_dir / RUN_RECORD
        record: RunRecord | None = None
        if path.exists():
            try:
                record = load_manifest(path, RunRecord)
            except ManifestError:
                record = None
        if record is None:
            record = RunRecord(run_id=run_dir.name)
        updates: dict[str, Any] = {
            "config": self.config.model_dump(mode="json"),
            "versions": {"python": platform.python_version(), "driver_python": sys.executable, "schema": str(SCHEMA_VERSION)},
        }
        if photo is not None:
            stored = store_input(run_dir, photo, mode=self.config.run.store_input)
            updates.update(image=stored.file, source_image=str(photo.path), input=stored)
        if "segment" in req.stages and req.image is not None:
            updates.update(query=req.query, prompts=list(req.prompts))
        record = record.model_copy(update=updates)
        self._save_record(run_dir, record)
        return record

    def _import(self, req: RunRequest, record: RunRecord) -> None:
        from pipeline.driver.importing import import_masks

        assert req.masks_dir is not None
        manifest = import_masks(req.run_dir, req.masks_dir, load_input(req.run_dir))
        record.stages["segment"] = StageRecord(
            status="succeeded", fingerprint=manifest.fingerprint, reason=f"imported from {req.masks_dir}",
            started=now_iso(), ended=now_iso(), duration_s=0.0,
        )
        self._save_record(req.run_dir, record)
        self.say(f"segment: imported {len(manifest.objects)} mask(s) from {req.masks_dir}")

    @staticmethod
    def _save_record(run_dir: Path, record: RunRecord) -> None:
        record.updated = now_iso()
        write_json_atomic(run_dir / RUN_RECORD, record.model_dump(mode="json"))

    def job_params(self, stage: str, req: RunRequest) -> dict[str, Any]:
        if stage != "segment":
            return {}
        if req.mode == "query":
            return {"mode": "query", "query": req.query}
        return {"mode": "prompt", "prompts": list(req.prompts)}

    # ------------------------------------------------------------------ opening a run

    def open(self, req: RunRequest) -> "ActiveRun":
        """Check the request, lock its run directory and record it; the caller runs the stages and closes it.

        Everything that can be refused (bad image, missing env, masks of the wrong size, a locked directory) is
        refused here, before anything is written.
        """
        if req.dry_run:
            raise UsageError("a dry run plans only: use Runner.plan()")
        validate_request(req, self.config.run.limits)
        image_id, photo = self._image(req)
        self._preflight(req, image_id, photo)
        created = _topmost_missing(req.run_dir)
        stack = ExitStack()
        try:
            stack.enter_context(run_lock(req.run_dir))
        except OSError as exc:
            return self._open_read_only(req, image_id, exc)
        try:
            record = self._open_record(req, photo)
            if req.masks_dir is not None and photo is not None:
                self._import(req, record)
            write_json_atomic(req.run_dir / CONFIG_NAME, self.config.model_dump(mode="json"))
        except BaseException:
            stack.close()
            if created is not None:  # folders this run made hold only what it wrote; existing ones are left alone
                shutil.rmtree(created, ignore_errors=True)
            raise
        for note in req.notes:
            self.say(f"note: {note}")
        return ActiveRun(self, req, record, image_id, stack)

    def _open_read_only(self, req: RunRequest, image_id: str, exc: OSError) -> "ActiveRun":
        """A run directory that cannot be written (a read-only mount): when every stage is up to date, a run
        that only confirms so and writes nothing; otherwise the write error, naming the stage that would run."""
        error = output_error(exc, req.run_dir)
        if error is None or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise error or exc
        stale = [d.stage for d in self._plan(req, image_id) if d.runs]
        if stale or req.masks_dir is not None:
            raise OutputError(f"{req.run_dir} cannot be written ({exc.strerror}) and its "
                              f"{stale[0] if stale else 'segment'} stage is not up to date", hint=error.hint)
        try:
            record = load_manifest(req.run_dir / RUN_RECORD, RunRecord)
        except ManifestError:
            record = RunRecord(run_id=req.run_dir.name)
        self.say(f"note: {req.run_dir} is read-only and up to date: nothing is written")
        return ActiveRun(self, req, record, image_id, ExitStack(), read_only=True)


class ActiveRun:
    """One open run: its lock is held and its ``run.json`` record kept current, stage by stage.

    The engine drives it: :meth:`decide` each stage, then :meth:`skip` it, or :meth:`begin` it (which gives the
    worker :class:`~pipeline.stages.protocol.Job`), then :meth:`succeed` or :meth:`fail`; finally :meth:`close`.
    """

    def __init__(self, runner: Runner, req: RunRequest, record: RunRecord, image_id: str, lock: ExitStack,
                 *, read_only: bool = False) -> None:
        self.runner = runner
        self.read_only = read_only  # an up-to-date run on a read-only mount: run.json is not rewritten
        self.req = req
        self.record = record
        self.image_id = image_id
        self._lock = lock
        self.outcomes: list[StageOutcome] = []
        self._t0: dict[str, float] = {}

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return self.req.run_dir

    def decide(self, stage: str) -> StageOutcome:
        """Plan ``stage`` now, from the outputs that exist now; the outcome is kept in :attr:`outcomes` (a stage
        decided again — its run requeued before its worker took it — replaces its earlier outcome)."""
        outcome = StageOutcome(self.runner._decide(stage, self.req, self.image_id))
        self.outcomes = [o for o in self.outcomes if o.decision.stage != stage] + [outcome]
        return outcome

    def skip(self, outcome: StageOutcome) -> None:
        """Record a stage that is up to date. For the 3D stage, first write the formats of
        ``reconstruct.exports`` that its manifest lacks (from the finished objects: no 3D work)."""
        stage = outcome.decision.stage
        config = self.req.config or self.runner.config
        if stage == "reconstruct" and config.reconstruct.exports and not self.req.dry_run:
            from pipeline.driver.exporting import add_missing_exports

            add_missing_exports(self.run_dir, config, say=self.runner.say)
        self.record.stages[stage] = self.record.stages.get(stage, StageRecord()).model_copy(
            update={"status": "skipped", "reason": outcome.decision.reason}
        )
        self._save()

    def begin(self, stage: str, params: dict[str, Any] | None = None) -> Job:
        """Record the stage as running, start its log and return the job for its worker."""
        fp = self.runner._stage_fingerprint(stage, self.req, self.image_id)
        assert fp is not None, "the upstream manifest exists once its stage has run"
        log_rel = f"{LOGS_DIR}/{stage}.log"
        log_path = self.run_dir / log_rel
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.record.stages[stage] = StageRecord(status="running", fingerprint=fp, started=now_iso(), log=log_rel)
        self._save()
        self._t0[stage] = time.perf_counter()
        return Job(
            id=f"{self.run_dir.name}:{stage}:{uuid.uuid4().hex[:8]}",
            run_dir=str(self.run_dir.resolve()),
            fingerprint=fp,
            params={**self.runner.job_params(stage, self.req), **(params or {})},
            config=str((self.run_dir / CONFIG_NAME).resolve()),
            log=str(log_path.resolve()),
        )

    def succeed(self, outcome: StageOutcome, result: dict[str, Any]) -> None:
        """Record the worker's result for a stage that ran."""
        stage = outcome.decision.stage
        outcome.result = result
        outcome.duration_s = time.perf_counter() - self._t0.get(stage, time.perf_counter())
        timings = {k: float(v) for k, v in result.get("timings", {}).items() if isinstance(v, (int, float))}
        self.record.stages[stage] = self.record.stages[stage].model_copy(
            update={
                "status": "succeeded",
                "reason": outcome.decision.reason,
                "ended": now_iso(),
                "duration_s": round(outcome.duration_s, 3),
                "timings": timings,
            }
        )
        self._save()

    def fail(self, outcome: StageOutcome, reason: str) -> None:
        """Record a failed (or interrupted) stage and delete the staging directories its worker left."""
        stage = outcome.decision.stage
        began = self._t0.get(stage)
        outcome.duration_s = time.perf_counter() - began if began is not None else None
        _remove_partials(self.run_dir)
        current = self.record.stages.get(stage, StageRecord())
        duration = round(outcome.duration_s, 3) if outcome.duration_s is not None else None
        self.record.stages[stage] = current.model_copy(
            update={"status": "failed", "reason": reason, "ended": now_iso(), "duration_s": duration}
        )
        self._save()

    def drop_planned(self, reason: str) -> None:
        """Record the stages that were planned to run but never began (their run was cancelled while it
        waited, opened ahead) as failed with ``reason``, and those begun but handed back before a worker took
        them (a group whose worker was stopped) as failed ``interrupted``, so ``run.json`` ends in a final
        state; their partial folders go."""
        for outcome in self.outcomes:
            stage = outcome.decision.stage
            current = self.record.stages.get(stage, StageRecord())
            if outcome.decision.runs and stage not in self._t0:
                self.record.stages[stage] = current.model_copy(
                    update={"status": "failed", "reason": reason, "ended": now_iso(), "duration_s": None})
            elif current.status == "running":
                self.fail(outcome, "interrupted")
        self._save()

    def result(self) -> RunOutcome:
        """Every stage's outcome so far."""
        return RunOutcome(self.run_dir, list(self.outcomes))

    def close(self) -> None:
        """Release the run directory's lock."""
        self._lock.close()

    def _save(self) -> None:
        if not self.read_only:
            self.runner._save_record(self.run_dir, self.record)


def _topmost_missing(path: Path) -> Path | None:
    """The highest of ``path`` and its parents that does not exist yet (what ``mkdir(parents=True)`` creates)."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _remove_partials(run_dir: Path) -> None:
    """Delete the staging directories (``*.partial``) a failed or killed worker left behind."""
    for path in run_dir.glob("*.partial"):
        shutil.rmtree(path, ignore_errors=True)


def read_stage_records(run_dir: Path) -> dict[str, StageRecord]:
    """The per-stage records of ``run.json`` (empty if there is none yet)."""
    try:
        return load_manifest(run_dir / RUN_RECORD, RunRecord).stages
    except ManifestError:
        return {}


def stage_names(names: Sequence[str]) -> tuple[str, ...]:
    """Stage names in pipeline order."""
    return tuple(s for s in STAGE_NAMES if s in names)
