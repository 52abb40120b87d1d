"""Input images and masks: checking a photo from its header, decoding it once, reading and writing masks.

A run keeps its input photo **as the user gave it** (the original bytes, ``<run>/input/source.<ext>``) plus the
facts needed to reproduce the image every stage sees (:class:`ImageFacts`): the EXIF orientation, the stored
and displayed sizes and the pixel mode. The **displayed image** is the photo after :func:`normalise_image`:
EXIF orientation applied (``ImageOps.exif_transpose`` semantics), then 8-bit RGB, (H, W, 3) ``uint8`` with
H×W the displayed size. Masks are 8-bit single-channel PNGs with values 0 and 255 at the displayed size.

Checking a photo (:func:`probe_image`) reads its header and its structure, never its pixels: the format, the
size (refused above ``max_pixels`` before anything is decoded), the orientation, and whether the file is whole
(a JPEG's scan data must end with its end-of-image marker, a PNG's chunks must all be present with valid
CRCs; other formats are decoded once, since they have no cheap check). Decoding (:func:`decode_image`) happens
in the stage workers, once per job.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from pipeline.atomic import write_with
from pipeline.errors import InputError

__all__ = [
    "ImageFacts",
    "ImageRejected",
    "NORMALISATION",
    "STORED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "probe_image",
    "decode_image",
    "normalise_image",
    "write_mask",
    "read_mask",
    "MASK_SUFFIXES",
]

MASK_SUFFIXES = (".png",)
#: Names the rule that turns a file's pixels into the displayed image; part of every image identity, so a change
#: of the rule (e.g. how 16-bit images are scaled) reruns the stages of images it affects.
NORMALISATION = "exif-transpose+rgb8:v2"
#: Pillow format → extension of the stored original. Every stage env reads these with Pillow, so they are kept
#: byte for byte; other formats Pillow opens are re-encoded once as PNG (compression level 1).
STORED_FORMATS: dict[str, str] = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
DEFAULT_MAX_PIXELS = 40_000_000
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING = frozenset({5, 6, 7, 8})  # orientations that swap width and height
_EOI = b"\xff\xd9"


class ImageRejected(InputError):
    """A photo refused from its header or structure; ``reason`` is ``empty``, ``not_image``, ``too_large`` or
    ``corrupt`` (the web server answers each with its own HTTP status)."""

    def __init__(self, reason: str, message: str, *, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class ImageFacts(BaseModel):
    """What a photo's header says, enough to reproduce its displayed image without decoding it first.

    ``stored_width``/``stored_height``: pixels as encoded; ``width``/``height``: displayed (after the EXIF
    orientation, 1–8, 1 = as stored); ``mode``: Pillow's mode of the stored pixels (``RGB``, ``L``, ``I;16``, ``P``,
    ``RGBA``, …); ``ext``: extension the run stores the original under (``png`` when it is re-encoded).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    ext: str
    mode: str
    stored_width: int
    stored_height: int
    orientation: int = 1
    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Displayed pixel count (the same as stored)."""
        return self.width * self.height

    @property
    def kept_as_is(self) -> bool:
        """True when the run stores the original bytes (False: re-encoded as PNG)."""
        return self.format in STORED_FORMATS


def probe_image(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFacts:
    """Check a photo's bytes from its header and structure (no pixel decode for JPEG and PNG).

    Raises a one-line :class:`InputError` naming ``name`` for an empty file, a file that is not an image, one
    over ``max_pixels`` pixels (checked before any decoding: a few KB of PNG can claim gigapixels) and a
    truncated or corrupt file.
    """
    if not data:
        raise ImageRejected("empty", f"{name} is empty (0 bytes)", hint="pass a JPEG, PNG or other photo")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected("too_large", f"{name} declares more pixels than Pillow allows",
                                hint=_pixels_hint(max_pixels)) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected("not_image", f"{name} is not a readable image ({type(exc).__name__})",
                                hint="pass a JPEG, PNG, WebP, BMP or TIFF photo") from None
    width, height = image.size
    frames = int(getattr(image, "n_frames", 1) or 1)
    if width * height > max_pixels or width * height * frames > 4 * max_pixels:
        raise ImageRejected("too_large", f"{name} is {width}×{height} = {width * height:,} pixels, more than the "
                            f"limit of {max_pixels:,}", hint=_pixels_hint(max_pixels))
    _check_whole(image, data, name)
    orientation = _orientation(image)
    swap = orientation in _TRANSPOSING
    fmt = image.format or "?"
    return ImageFacts(
        format=fmt, ext=STORED_FORMATS.get(fmt, "png"), mode=image.mode,
        stored_width=width, stored_height=height, orientation=orientation,
        width=height if swap else width, height=width if swap else height,
    )


def _pixels_hint(max_pixels: int) -> str:
    return f"downscale the photo, or raise the limit with --set run.max_pixels=N (now {max_pixels:,})"


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - an unreadable EXIF block means "as stored", as exif_transpose treats it
        return 1
    return value if 1 <= value <= 8 else 1


def _check_whole(image: Image.Image, data: bytes, name: str) -> None:
    """Refuse a truncated or corrupt file without decoding its pixels where the format allows it."""
    fmt = image.format
    truncated = ImageRejected("corrupt", f"{name} is truncated or corrupt ({fmt})",
                              hint="the file may be incomplete; copy or export it again")
    if fmt in ("JPEG", "MPO"):
        scan = image.tile[0][2] if image.tile else 0  # where the first scan's entropy-coded data starts
        # Entropy-coded data never holds FF D9 (an FF byte there is always stuffed or a restart marker), so the
        # primary image is whole iff an end-of-image marker follows the start of its scan.
        if data.find(_EOI, scan) < 0:
            raise truncated
        return
    try:
        if fmt == "PNG":
            Image.open(io.BytesIO(data)).verify()  # walks every chunk and checks its CRC; decodes nothing
        else:
            Image.open(io.BytesIO(data)).load()  # no cheap structural check for these: decode once
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise truncated from None


def decode_image(data: bytes, *, name: str = "image") -> Image.Image:
    """Decode a stored photo to its displayed image: (H, W) RGB ``uint8``, EXIF orientation applied.

    Raises InputError when the pixels cannot be decoded (corrupt data that the header check let through).
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{name} cannot be decoded ({type(exc).__name__}: {exc})",
                         hint="the file may be corrupt; export the photo again") from None
    return normalise_image(image)


def normalise_image(image: Image.Image) -> Image.Image:
    """The displayed image: EXIF orientation applied, then 8-bit RGB (see :data:`NORMALISATION`).

    16-bit and 32-bit integer pixels (``I;16*``, ``I``) are scaled from 0–65535 to 0–255 (``round(v / 257)``,
    clipped), float pixels (``F``) are clipped to 0–255; palette, grey, CMYK and alpha images go through Pillow's
    RGB conversion (alpha is dropped: masks carry the object selection).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


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
