"""Start a run from masks made elsewhere: a folder of mask PNGs + the image they belong to.

The masks are validated against the image (after EXIF orientation), converted to the contract's 0/255 PNGs
and listed in a ``masks/manifest.json`` with ``mode: import``, so the reconstruct stage treats them like
the segmentation stage's output. If the folder holds our own ``manifest.json``, labels and scores are kept.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.atomic import sha256_file
from pipeline.errors import InputError
from pipeline.driver.fingerprint import fingerprint
from pipeline.handoff import MANIFEST_NAME, InputManifest, MaskManifest, load_manifest
from pipeline.images import MASK_SUFFIXES, read_mask
from pipeline.stages.postprocess import Candidate, mask_bbox

__all__ = ["find_mask_files", "check_masks", "import_masks"]


def _natural_key(path: Path) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_mask_files(masks_dir: Path) -> list[Path]:
    """Mask PNGs directly inside ``masks_dir``, in natural order (2.png before 10.png)."""
    if not masks_dir.is_dir():
        raise InputError(f"masks folder not found: {masks_dir}", hint="pass a folder of mask PNGs or a run directory")
    files = sorted((p for p in masks_dir.iterdir() if p.suffix.lower() in MASK_SUFFIXES), key=_natural_key)
    if not files:
        raise InputError(f"no mask PNGs in {masks_dir}", hint="masks must be PNG files, one object per file")
    return files


def check_masks(masks_dir: Path, size: tuple[int, int]) -> None:
    """Validate a masks folder against an image size ((width, height)) without writing anything."""
    for path in find_mask_files(masks_dir):
        if not read_mask(path, size).any():
            raise InputError(f"mask {path} is empty", hint="remove it; every mask must mark one object")


def import_masks(run_dir: Path, masks_dir: Path, image: InputManifest) -> MaskManifest:
    """Write the masks of ``masks_dir`` per the handoff contract, for the run's stored input ``image``."""
    from pipeline.stages.segment import write_masks

    size = (image.width, image.height)
    files = find_mask_files(masks_dir)
    masks = [read_mask(p, size) for p in files]  # raises on a size mismatch before anything is written
    labels: dict[str, tuple[str, float]] = {}
    own = masks_dir / MANIFEST_NAME
    if own.exists():
        previous = load_manifest(own, MaskManifest)
        labels = {Path(o.file).name: (o.label, o.score) for o in previous.objects}
    candidates = []
    for path, mask in zip(files, masks):
        if not mask.any():
            raise InputError(f"mask {path} is empty", hint="remove it; every mask must mark one object")
        label, score = labels.get(path.name, (path.stem, 1.0))
        candidates.append(Candidate(mask, mask_bbox(mask), score, [label]))
    fp = fingerprint({"import": [sha256_file(p) for p in files], "image": image.identity})
    return write_masks(run_dir, candidates, fingerprint=fp, mode="import", backend="import", prompts=[])
