"""Checking an uploaded image before anything else sees it: size in bytes, type by content, size in pixels.

Order matters: the byte limit is enforced while the body streams in (:class:`BodyLimit`, see security.py),
then :func:`inspect_upload` reads only the image **header** and structure (:func:`pipeline.images.probe_image`)
to learn the format, the orientation and the pixel count, rejects an image over the pixel limit before any pixel
is decoded (a decompression bomb is a few KB of PNG that decodes to gigabytes) and a truncated one, and hashes
the bytes. Nothing is decoded here: the stage workers decode the photo once each.
The client's file name is never used: the upload is stored as ``upload/image.<ext of the detected format>``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.images import STORED_FORMATS, ImageFacts, ImageRejected, probe_image

__all__ = ["ALLOWED_FORMATS", "UploadRejected", "ImageInfo", "inspect_upload"]

#: Pillow format name → file extension used for the stored upload: the formats every stage reads as they are.
ALLOWED_FORMATS: dict[str, str] = STORED_FORMATS
_STATUS = {"empty": 422, "not_image": 415, "too_large": 413, "corrupt": 422}
_HINTS = {"empty": "choose a JPEG, PNG, WebP, BMP or TIFF file", "not_image": "upload a JPEG, PNG, WebP, BMP or TIFF image",
          "too_large": "downscale the image and upload it again",
          "corrupt": "the file may be truncated or corrupt; export it again"}
_MESSAGES = {"empty": "the uploaded image is empty", "not_image": "the upload is not an image this server reads",
             "corrupt": "the image is truncated or corrupt"}


class UploadRejected(Exception):
    """An upload the server refuses; ``status`` is the HTTP status, ``message`` and ``hint`` one line each."""

    def __init__(self, status: int, message: str, hint: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class ImageInfo:
    """What the header said: Pillow ``format``, stored ``ext``, size after EXIF orientation (pixels), the
    upload's ``bytes`` and ``sha256``, and the full header ``facts``."""

    format: str
    ext: str
    width: int
    height: int
    bytes: int
    sha256: str
    facts: ImageFacts


def inspect_upload(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Validate an uploaded image's content; raise :class:`UploadRejected` (415, 413 or 422) if it is refused."""
    try:
        facts = probe_image(data, name="the upload", max_pixels=max_pixels)
    except ImageRejected as exc:
        if exc.reason == "too_large":
            raise UploadRejected(413, exc.message.replace("the upload", "the image"), _HINTS["too_large"]) from None
        raise UploadRejected(_STATUS[exc.reason], _MESSAGES[exc.reason], _HINTS[exc.reason]) from None
    if facts.format not in ALLOWED_FORMATS:
        raise UploadRejected(415, f"images of type {facts.format} are not accepted", _HINTS["not_image"])
    return ImageInfo(format=facts.format, ext=ALLOWED_FORMATS[facts.format], width=facts.width, height=facts.height,
                     bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), facts=facts)
