"""Checking an uploaded image before anything else sees it: size in bytes, type by content, size in pixels.

Order matters: the byte limit is enforced while the body streams in (:class:`BodyLimit`, see security.py),
then :func:`inspect_upload` reads only the image **header** (Pillow's lazy open) to learn the format and the
pixel count, and rejects an image over the pixel limit before any pixel is decoded (a decompression bomb is a
few KB of PNG that decodes to gigabytes). Only then is the image decoded once, to prove it is readable.
The client's file name is never used: the upload is stored as ``upload/image.<ext of the detected format>``.
EXIF orientation is applied by the runner when it writes ``input/image.png`` (see pipeline.images).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ALLOWED_FORMATS", "UploadRejected", "ImageInfo", "inspect_upload"]

#: Pillow format name → file extension used for the stored upload.
ALLOWED_FORMATS: dict[str, str] = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


class UploadRejected(Exception):
    """An upload the server refuses; ``status`` is the HTTP status, ``message`` and ``hint`` one line each."""

    def __init__(self, status: int, message: str, hint: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class ImageInfo:
    """What the header said: Pillow ``format``, stored ``ext``, size after EXIF orientation (pixels)."""

    format: str
    ext: str
    width: int
    height: int
    bytes: int


def inspect_upload(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Validate an uploaded image's content; raise :class:`UploadRejected` (415, 413 or 422) if it is refused."""
    if not data:
        raise UploadRejected(422, "the uploaded image is empty", "choose a JPEG, PNG, WebP, BMP or TIFF file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadRejected(413, f"the image header declares more than {max_pixels:,} pixels",
                                 "downscale the image and upload it again") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise UploadRejected(415, "the upload is not an image this server reads",
                                 "upload a JPEG, PNG, WebP, BMP or TIFF image") from None
    fmt = image.format or "?"
    if fmt not in ALLOWED_FORMATS:
        raise UploadRejected(415, f"images of type {fmt} are not accepted",
                             "upload a JPEG, PNG, WebP, BMP or TIFF image")
    width, height = image.size
    frames = int(getattr(image, "n_frames", 1) or 1)
    if width * height > max_pixels or width * height * frames > 4 * max_pixels:
        raise UploadRejected(413, f"the image is {width}×{height} = {width * height:,} pixels; this server accepts "
                                  f"at most {max_pixels:,}", "downscale the image and upload it again")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise UploadRejected(422, f"the image cannot be decoded ({type(exc).__name__})",
                             "the file may be truncated or corrupt; export it again") from None
    oriented = ImageOps.exif_transpose(image)
    return ImageInfo(format=fmt, ext=ALLOWED_FORMATS[fmt], width=oriented.width, height=oriented.height, bytes=len(data))
