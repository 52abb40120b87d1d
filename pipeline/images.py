"""Reading input images and reading/writing masks.

Images are RGB, H×W, ``uint8``. EXIF orientation is applied once, when the driver copies the input into
``<run>/input/image.png``; everything downstream reads that file. Masks are 8-bit single-channel PNGs
with values 0 and 255, the same H×W as the input image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.atomic import write_with
from pipeline.errors import InputError

__all__ = ["open_image", "normalise_image", "write_mask", "read_mask", "MASK_SUFFIXES"]

MASK_SUFFIXES = (".png",)


def open_image(path: Path) -> Image.Image:
    """Open an image file fully (so errors surface here), or raise a one-line InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}", hint="check the --image path")
    if not path.is_file():
        raise InputError(f"image path is not a file: {path}", hint="pass an image file, e.g. photo.jpg")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror}", hint="check the file's permissions") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(
            f"{path} is not a readable image ({type(exc).__name__})",
            hint="pass a JPEG, PNG or other image that Pillow can read",
        ) from None
    return image


def normalise_image(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert to RGB (alpha is dropped: masks carry the object selection)."""
    return ImageOps.exif_transpose(image).convert("RGB")


def write_mask(path: Path, mask: np.ndarray) -> Path:
    """Write an (H, W) bool mask as an 8-bit PNG with 0/255, atomically."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    img = Image.fromarray(np.asarray(mask, dtype=bool).view(np.uint8) * np.uint8(255), mode="L")
    return write_with(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def read_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask PNG as (H, W) bool (> 127 is inside). ``size`` = (width, height) it must have."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"mask {path} is not a readable image ({type(exc).__name__})") from None
    if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
        raise InputError(
            f"mask {path} is {arr.shape[1]}×{arr.shape[0]} but the image is {size[0]}×{size[1]}",
            hint="masks must have exactly the input image's size; pass the image they were made from",
        )
    return arr > 127
