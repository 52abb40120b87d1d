"""Python API: ``Pipeline.from_config(...).run(image, query=... | prompt=...)`` → :class:`RunResult`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.config import STAGE_NAMES, PipelineConfig, load_config
from pipeline.handoff import MANIFEST_NAME, MASKS_DIR, OBJECTS_DIR, SCENE_DIR, MaskManifest, ObjectsManifest, load_manifest
from pipeline.driver.runner import RunRequest, Runner, validate_request

__all__ = ["Pipeline", "RunResult", "ObjectFiles", "default_run_dir", "collect_result"]


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
    """A resolved config plus the means to run it. Build with :meth:`from_config`."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> "Pipeline":
        """Defaults, then the YAML file ``path`` (optional), then ``overrides`` (``"section.key=value"``)."""
        return cls(load_config(Path(path) if path else None, overrides))

    def run(
        self,
        image: str | Path,
        *,
        query: str | None = None,
        prompt: str | Sequence[str] | None = None,
        out: str | Path | None = None,
        stages: Sequence[str] = STAGE_NAMES,
        force: Sequence[str] = (),
    ) -> RunResult:
        """Run the stages on one image; raises a PipelineError subclass on bad input or a failed stage."""
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt or ())
        key = f"query:{query}" if query is not None else "prompt:" + "\n".join(prompts)
        run_dir = Path(out) if out else default_run_dir(self.config, Path(image), key)
        req = RunRequest(run_dir=run_dir, stages=tuple(stages), image=Path(image), query=query,
                         prompts=prompts, force=frozenset(force))
        validate_request(req)
        outcome = Runner(self.config, say=lambda _msg: None).execute(req)
        timings = {s.decision.stage: round(s.duration_s, 3) for s in outcome.stages}
        decisions = {s.decision.stage: f"{s.decision.action} ({s.decision.reason})" for s in outcome.stages}
        return collect_result(run_dir, timings, decisions)



def default_run_dir(config: PipelineConfig, image: Path, key: str) -> Path:
    """``<out_root>/<image stem>-<8 hex>``: the same image and request always map to the same run dir."""
    digest = hashlib.sha256(f"{Path(image).resolve()}\n{key}".encode()).hexdigest()[:8]
    return Path(config.run.out_root) / f"{Path(image).stem}-{digest}"


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
