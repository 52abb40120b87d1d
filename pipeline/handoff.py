"""The run-directory contract: pydantic models of every manifest, with a schema version.

Layout of one run directory (see docs/handoff.md)::

    <run>/run.json              RunRecord: config snapshot, inputs, versions, per-stage status, fingerprints, timings
    <run>/input/source.<ext>    the input photo's original bytes (PNG only for formats the stages cannot read)
    <run>/input/manifest.json   InputManifest: where the photo came from, its sha256 and how it is normalised
    <run>/agent/                transcript.json and overlay PNGs (only when the VLM is used)
    <run>/masks/NNN.png         one 8-bit mask per object, 0/255, same H×W as the displayed input image
    <run>/masks/manifest.json   MaskManifest (written last)
    <run>/objects/NNN/          gaussians.ply, mesh.glb, pose.json
    <run>/objects/manifest.json ObjectsManifest (written last)
    <run>/scene/                scene.ply, scene.glb (+ preview when a renderer is available)
    <run>/logs/<stage>.log      full output of each stage worker

All paths inside manifests are relative to the run directory and use ``/``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.atomic import sha256_file, write_json_atomic
from pipeline.errors import ManifestError

__all__ = [
    "SCHEMA_VERSION",
    "RUN_RECORD",
    "INPUT_DIR",
    "LEGACY_INPUT_IMAGE",
    "READ_SCHEMA_VERSIONS",
    "InputManifest",
    "MASKS_DIR",
    "OBJECTS_DIR",
    "SCENE_DIR",
    "AGENT_DIR",
    "LOGS_DIR",
    "MANIFEST_NAME",
    "FileRecord",
    "MaskObject",
    "MaskManifest",
    "Pose",
    "ObjectRecord",
    "ObjectsManifest",
    "StageRecord",
    "RunRecord",
    "file_record",
    "load_manifest",
    "write_manifest",
    "now_iso",
]

SCHEMA_VERSION = 2  # 2: the input is kept as its original bytes + input/manifest.json (1: input/image.png)
READ_SCHEMA_VERSIONS = frozenset({1, 2})  # version 1 manifests have the same fields and are read as they are
RUN_RECORD = "run.json"
INPUT_DIR = "input"
LEGACY_INPUT_IMAGE = "input/image.png"  # schema 1: the input re-encoded as PNG (read, never written)
MASKS_DIR = "masks"
OBJECTS_DIR = "objects"
SCENE_DIR = "scene"
AGENT_DIR = "agent"
LOGS_DIR = "logs"
MANIFEST_NAME = "manifest.json"


def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRecord(_Model):
    """A file of the run: path relative to the run directory, sha256 of its content, size in bytes."""

    path: str
    sha256: str
    size: int


def file_record(run_dir: Path, path: Path) -> FileRecord:
    """Hash ``path`` (inside ``run_dir``) into a FileRecord."""
    path = Path(path)
    return FileRecord(
        path=path.relative_to(run_dir).as_posix(), sha256=sha256_file(path), size=path.stat().st_size
    )


class InputManifest(_Model):
    """``input/manifest.json``: the run's input photo, written by the driver after the photo's bytes are in place.

    ``file``: the stored original (``input/source.<ext>``), its sha256 and size; ``identity``: what every stage
    fingerprint names the image by (the sha256 of the source bytes plus the normalisation rule); ``facts``: the
    header facts (:class:`pipeline.images.ImageFacts`: format, orientation, stored and displayed size, mode);
    ``source``: the absolute path it was copied from (None for legacy or imported runs); ``stored_as``: ``copy``,
    ``hardlink``, ``reflink`` or ``png`` (re-encoded because the format is not one every stage reads).
    """

    schema_version: int = SCHEMA_VERSION
    stage: Literal["input"] = "input"
    file: FileRecord
    identity: str
    normalisation: str
    facts: dict[str, Any]
    source: str | None = None
    stored_as: Literal["copy", "hardlink", "reflink", "png", "legacy"] = "copy"
    created: str = Field(default_factory=now_iso)

    @property
    def width(self) -> int:
        """Displayed width in pixels (after the EXIF orientation)."""
        return int(self.facts["width"])

    @property
    def height(self) -> int:
        """Displayed height in pixels."""
        return int(self.facts["height"])


class MaskObject(_Model):
    """One segmented object.

    ``bbox_xyxy`` is in input-image pixels (x right, y down, exclusive max); ``area`` in pixels;
    ``phrases`` lists every noun phrase that produced this mask (after cross-phrase de-duplication),
    the first being the one whose score was kept; ``decision`` is the VLM's reason when the agent kept it.
    """

    id: int
    label: str
    phrases: list[str]
    score: float
    bbox_xyxy: tuple[float, float, float, float]
    area: int
    file: str
    sha256: str
    decision: str | None = None


class MaskManifest(_Model):
    """``masks/manifest.json``: the segmentation stage's result. An empty ``objects`` list is a valid result
    and then ``reason`` says why (e.g. "no object matches")."""

    schema_version: int = SCHEMA_VERSION
    stage: Literal["segment"] = "segment"
    fingerprint: str
    image: FileRecord
    width: int
    height: int
    mode: Literal["prompt", "query", "import"]
    query: str | None = None
    prompts: list[str] = Field(default_factory=list)
    backend: str
    objects: list[MaskObject]
    reason: str | None = None
    preview: str | None = None  # masks/preview.jpg: the displayed input image, ≤ 1600 px (schema 2)
    created: str = Field(default_factory=now_iso)


class Pose(_Model):
    """Object pose: ``p_frame = scale · R(quat_wxyz)ᵀ · p_local + translation`` (column vectors).

    ``p_local`` is in the canonical object frame (z-up, inside [-0.5, 0.5]³). ``frame`` names the frame of the
    result (``pytorch3d_camera``: x left, y up, z forward, camera at the origin); ``units`` are the pointmap's
    (metric only when the depth was).
    """

    quat_wxyz: tuple[float, float, float, float]
    translation: tuple[float, float, float]
    scale: tuple[float, float, float]
    frame: str = "pytorch3d_camera"
    units: str = "pointmap"


class ObjectRecord(_Model):
    """One reconstructed object: its mask id, the seed used, its files and its pose."""

    id: int
    mask_id: int
    label: str
    seed: int
    pose: Pose
    files: list[FileRecord]


class ExportRecord(_Model):
    """One extra file format written for one object (``target`` = its id) or for the scene (``target`` =
    ``"scene"``): the files, or the one-line reason it failed (the other objects and formats are unaffected)."""

    format: str
    target: int | Literal["scene"]
    files: list[FileRecord] = Field(default_factory=list)
    error: str | None = None


class ObjectsManifest(_Model):
    """``objects/manifest.json``: the reconstruction stage's result, including the composed scene files."""

    schema_version: int = SCHEMA_VERSION
    stage: Literal["reconstruct"] = "reconstruct"
    fingerprint: str
    masks_manifest_sha256: str
    backend: str
    frame: str
    objects: list[ObjectRecord]
    scene: list[FileRecord]
    exports: list[ExportRecord] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    created: str = Field(default_factory=now_iso)


StageStatus = Literal["pending", "running", "succeeded", "skipped", "failed"]


class StageRecord(_Model):
    """Per-stage status inside ``run.json``."""

    status: StageStatus = "pending"
    fingerprint: str | None = None
    reason: str | None = None
    started: str | None = None
    ended: str | None = None
    duration_s: float | None = None
    log: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)


class RunRecord(_Model):
    """``run.json``: what was asked, with which config and software, and how each stage went."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    created: str = Field(default_factory=now_iso)
    updated: str = Field(default_factory=now_iso)
    image: FileRecord | None = None  # the stored input photo (input/source.<ext>; input/image.png in schema 1)
    source_image: str | None = None
    input: InputManifest | None = None  # a copy of input/manifest.json (schema 2)
    query: str | None = None
    prompts: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    stages: dict[str, StageRecord] = Field(default_factory=dict)


M = TypeVar("M", bound=BaseModel)


def load_manifest(path: Path, model: type[M]) -> M:
    """Read and validate a manifest; unknown schema versions and corrupt files raise ManifestError."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(path, "does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(path, f"unreadable ({exc})", hint="delete it and rerun the stage") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in READ_SCHEMA_VERSIONS:
        raise ManifestError(
            path,
            f"schema_version {version!r} is not supported (this tool reads {', '.join(map(str, sorted(READ_SCHEMA_VERSIONS)))})",
            hint="rerun the stage with this version of the tool (--force STAGE)",
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(path, f"invalid at '{where}': {first['msg']}", hint="rerun the stage") from None


def write_manifest(path: Path, manifest: BaseModel) -> Path:
    """Validate and write a manifest atomically. Call this only after every listed file is in place."""
    return write_json_atomic(path, manifest.model_dump(mode="json"))
