"""Python API.

One run::

    Pipeline.from_config().run("photo.jpg", query="the red mug")            # → RunResult

Many runs with the models kept loaded (the workers and the vLLM server stay up until the block ends)::

    with Pipeline.from_config(overrides=["segment.threshold=0.4"]) as p:
        a = p.run("a.jpg", prompt="horse")
        results = p.batch(["b.jpg", "c.jpg"], prompt="horse")                # list[RunResult | PipelineError]

Outside a ``with`` block each ``run`` starts and stops its own workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import STAGE_NAMES, PipelineConfig, load_config
from pipeline.driver.engine import Engine
from pipeline.driver.runner import RunOutcome, RunRequest, check_request_text, validate_request
from pipeline.errors import PipelineError
from pipeline.handoff import MANIFEST_NAME, MASKS_DIR, OBJECTS_DIR, SCENE_DIR, MaskManifest, ObjectsManifest, load_manifest

__all__ = ["Pipeline", "RunResult", "ObjectFiles", "default_run_dir", "collect_result", "run_key"]


@dataclass(frozen=True)
class ObjectFiles:
    """One reconstructed object's files (absolute paths) and its label."""

    id: int
    label: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class RunResult:
    """What a run produced: absolute paths of masks, objects and scene files, plus per-stage seconds."""

    run_dir: Path
    masks: tuple[Path, ...]
    objects: tuple[ObjectFiles, ...]
    scene: tuple[Path, ...]
    timings: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)


class Pipeline:
    """A resolved config plus the means to run it. Build with :meth:`from_config`; use ``with`` to keep it warm."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self._engine: Engine | None = None

    @classmethod
    def from_config(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> "Pipeline":
        """Defaults, then the YAML file ``path`` (optional), then ``overrides`` (``"section.key=value"``)."""
        return cls(load_config(Path(path) if path else None, overrides))

    def __enter__(self) -> "Pipeline":
        self._engine = Engine(self.config)
        self._engine.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker and server this pipeline started."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def request(
        self,
        image: str | Path,
        *,
        query: str | None = None,
        prompt: str | Sequence[str] | None = None,
        out: str | Path | None = None,
        stages: Sequence[str] = STAGE_NAMES,
        force: Sequence[str] = (),
    ) -> RunRequest:
        """The run request for one image. Raises UsageError on a contradictory or empty query/prompt, or one over
        ``run.limits``; repeated phrases are dropped, and the request's ``notes`` say which."""
        text = check_request_text(query, prompt, self.config.run.limits)
        run_dir = Path(out) if out else default_run_dir(self.config, Path(image), run_key(text.query, text.prompts))
        req = RunRequest(run_dir=run_dir, stages=tuple(stages), image=Path(image), query=text.query,
                         prompts=text.prompts, force=frozenset(force), notes=text.notes)
        validate_request(req, self.config.run.limits)
        return req

    def run(self, image: str | Path, **kwargs: Any) -> RunResult:
        """Run the stages on one image (keywords as :meth:`request`); raises a PipelineError on bad input or a
        failed stage."""
        req = self.request(image, **kwargs)
        if self._engine is not None:
            return _result(self._engine.run(req))
        with Engine(self.config, single_run=True) as engine:
            return _result(engine.run(req))

    def batch(self, images: Sequence[str | Path], **kwargs: Any) -> list[RunResult | PipelineError]:
        """Run many images with the same query or prompt, overlapping the stages; one result or error each, in
        the order given. A failed image does not stop the others."""
        requests = [self.request(image, **kwargs) for image in images]
        engine = self._engine or Engine(self.config)
        try:
            handles = [engine.submit(r) for r in requests]
            out: list[RunResult | PipelineError] = []
            for h in handles:
                try:
                    out.append(_result(h.wait()))
                except PipelineError as exc:
                    out.append(exc)
            return out
        finally:
            if self._engine is None:
                engine.close()


def run_key(query: str | None, prompts: Sequence[str]) -> str:
    """The request part of a default run directory's hash."""
    return f"query:{query}" if query is not None else "prompt:" + "\n".join(prompts)


def default_run_dir(config: PipelineConfig, image: Path, key: str) -> Path:
    """``<out_root>/<image stem>-<8 hex>``: the same image and request always map to the same run dir."""
    digest = hashlib.sha256(f"{Path(image).resolve()}\n{key}".encode()).hexdigest()[:8]
    return Path(config.run.out_root) / f"{Path(image).stem}-{digest}"


def _result(outcome: RunOutcome) -> RunResult:
    timings = {s.decision.stage: round(s.duration_s, 3) for s in outcome.stages if s.duration_s is not None}
    decisions = {s.decision.stage: f"{s.decision.action} ({s.decision.reason})" for s in outcome.stages}
    return collect_result(outcome.run_dir, timings, decisions)


def collect_result(run_dir: Path, timings: dict[str, float], decisions: dict[str, str]) -> RunResult:
    """Read a run directory's manifests into a RunResult (stages that did not run contribute nothing)."""
    run_dir = Path(run_dir).resolve()
    masks: tuple[Path, ...] = ()
    objects: tuple[ObjectFiles, ...] = ()
    scene: tuple[Path, ...] = ()
    if (run_dir / MASKS_DIR / MANIFEST_NAME).exists():
        m = load_manifest(run_dir / MASKS_DIR / MANIFEST_NAME, MaskManifest)
        masks = tuple(run_dir / o.file for o in m.objects)
    if (run_dir / OBJECTS_DIR / MANIFEST_NAME).exists():
        o = load_manifest(run_dir / OBJECTS_DIR / MANIFEST_NAME, ObjectsManifest)
        objects = tuple(ObjectFiles(r.id, r.label, tuple(run_dir / f.path for f in r.files)) for r in o.objects)
        scene = tuple(run_dir / f.path for f in o.scene if f.path.startswith(SCENE_DIR))
    return RunResult(run_dir, masks, objects, scene, timings, decisions)
