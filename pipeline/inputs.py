"""A run's input photo: its identity, where the run keeps it, and reading it back (driver and workers alike).

The driver stores the photo's original bytes as ``<run>/input/source.<ext>`` and then, last,
``<run>/input/manifest.json`` (:class:`~pipeline.handoff.InputManifest`). A worker reads the bytes once per job,
checks them against the manifest's sha256 (so it never computes on a different version of the photo than the
one its fingerprint names) and decodes them once (:func:`read_input`). Run directories of schema 1 hold
``input/image.png`` instead; :func:`load_input` describes that file the same way, so old runs stay readable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from pipeline.errors import InputError, ManifestError
from pipeline.handoff import (
    INPUT_DIR,
    LEGACY_INPUT_IMAGE,
    MANIFEST_NAME,
    FileRecord,
    InputManifest,
    load_manifest,
)
from pipeline.images import NORMALISATION, decode_image, probe_image

__all__ = ["INPUT_MANIFEST", "SOURCE_STEM", "image_identity", "load_input", "read_input"]

INPUT_MANIFEST = f"{INPUT_DIR}/{MANIFEST_NAME}"
SOURCE_STEM = "source"  # input/source.<ext>


def image_identity(sha256: str) -> str:
    """What fingerprints call an image: the sha256 of its file's bytes and the normalisation rule."""
    return f"sha256:{sha256}+{NORMALISATION}"


def load_input(run_dir: Path) -> InputManifest:
    """The run's input manifest; for a schema-1 run (only ``input/image.png``) one built from that file.

    Raises InputError when the run holds no input at all, ManifestError when its manifest is unreadable.
    """
    run_dir = Path(run_dir)
    path = run_dir / INPUT_DIR / MANIFEST_NAME
    if path.exists():
        return load_manifest(path, InputManifest)
    legacy = run_dir / LEGACY_INPUT_IMAGE
    if legacy.exists():
        data = legacy.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        facts = probe_image(data, name=str(legacy), max_pixels=1 << 40)
        return InputManifest(
            file=FileRecord(path=LEGACY_INPUT_IMAGE, sha256=sha, size=len(data)), identity=image_identity(sha),
            normalisation=NORMALISATION, facts=facts.model_dump(), stored_as="legacy",
        )
    raise InputError(f"{run_dir} holds no input image ({INPUT_DIR}/{MANIFEST_NAME})",
                     hint="pass --image, or point --run at a directory made by `python -m pipeline segment` or `run`")


def _read_checked(run_dir: Path, manifest: InputManifest) -> bytes:
    """The stored photo's bytes, checked against the manifest's sha256 (InputError when they differ)."""
    path = Path(run_dir) / manifest.file.path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path} cannot be read ({exc.strerror})", hint="rerun with --force segment so the input is stored again") from None
    if hashlib.sha256(data).hexdigest() != manifest.file.sha256:
        raise InputError(f"{path} changed after the run was planned (its sha256 differs from {INPUT_DIR}/{MANIFEST_NAME})",
                         hint="do not edit a run's input; rerun the command so the photo is stored again")
    return data


def read_input(run_dir: Path, manifest: InputManifest | None = None) -> tuple[Image.Image, InputManifest]:
    """Decode the run's input once: its displayed image ((H, W) RGB, EXIF orientation applied) and manifest."""
    manifest = manifest or load_input(run_dir)
    data = _read_checked(run_dir, manifest)
    image = decode_image(data, name=manifest.file.path)
    if image.size != (manifest.width, manifest.height):
        raise ManifestError(Path(run_dir) / INPUT_MANIFEST,
                            f"says {manifest.width}×{manifest.height} but the photo decodes to {image.width}×{image.height}",
                            hint="rerun with --force segment")
    return image, manifest
