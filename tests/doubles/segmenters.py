"""A segmentation backend double: the demo colour-blob segmenter plus a counter for the tests.

"red square" → every 4-connected blob of pure-ish red pixels is one detection (see
:mod:`pipeline.backends.demo`). ``encodings`` counts ``set_image`` calls so tests can check that an image is
encoded once.
"""

from __future__ import annotations

from PIL import Image

from pipeline.backends.demo import COLORS, DemoBlobSegmenter

__all__ = ["ColorBlobSegmenterDouble", "COLORS"]


class ColorBlobSegmenterDouble(DemoBlobSegmenter):
    """Counts ``set_image`` calls in ``self.encodings``."""

    def __init__(self, config) -> None:  # noqa: ANN001 - SegmentConfig
        super().__init__(config)
        self.encodings = 0

    def set_image(self, image: Image.Image) -> None:
        super().set_image(image)
        self.encodings += 1
