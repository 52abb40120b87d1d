"""A segmentation backend double: colour blobs named by colour words, plus a counter for the tests.

A phrase naming a colour word ("red", "green", "blue", "yellow", "white") matches every 4-connected blob of
that pure-ish colour; each blob is one detection, largest first. Scores are made up: 0.95 for the largest blob,
then 0.05 less per blob. Phrases without a colour word match nothing. ``encodings`` counts ``set_image`` calls
so tests can check that an image is encoded once. Only numpy and PIL: it runs in the light test venvs.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.backends.base import Detections, Segmenter

__all__ = ["ColorBlobSegmenterDouble", "COLORS"]

#: Colour words the double understands, with the RGB value a blob must be near (L1 distance < 60).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of an (H, W) bool mask, as (H, W) bool masks, largest first."""
    seen = np.zeros_like(mask)
    comps: list[np.ndarray] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    comps.sort(key=lambda c: int(c.sum()), reverse=True)
    return comps


class ColorBlobSegmenterDouble(Segmenter):
    """Colour blobs named by colour words (see the module docstring); counts ``set_image`` calls in
    ``self.encodings``."""

    def __init__(self, config: Any) -> None:  # SegmentConfig
        super().__init__(config)
        self.image: np.ndarray | None = None
        self.encodings = 0

    def set_image(self, image: Image.Image) -> None:
        """Keep the (H, W, 3) RGB pixels as int16 for colour distances."""
        self.image = np.asarray(image.convert("RGB")).astype(np.int16)
        self.encodings += 1

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        """One Detections per phrase: the blobs of the phrase's first colour word, largest first."""
        if self.image is None:
            raise RuntimeError("call set_image() before predict()")
        return [self._detect(p) for p in phrases]

    def _detect(self, phrase: str) -> Detections:
        assert self.image is not None
        h, w = self.image.shape[:2]
        color = next((COLORS[word] for word in phrase.lower().replace(",", " ").split() if word in COLORS), None)
        if color is None:
            return Detections(phrase, np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        near = np.abs(self.image - np.array(color)).sum(axis=2) < 60
        comps = _components(near)
        boxes = []
        for comp in comps:
            ys, xs = np.nonzero(comp)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        scores = np.array([max(0.95 - 0.05 * i, 0.05) for i in range(len(comps))], np.float32)
        masks = np.stack(comps) if comps else np.zeros((0, h, w), bool)
        return Detections(phrase, masks, np.asarray(boxes, np.float32).reshape(-1, 4), scores)
