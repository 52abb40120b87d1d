"""A segmentation backend double: finds solid-colour blobs named by the colour words in a phrase.

"red square" → every 4-connected blob of pure-ish red pixels is one detection. Scores descend from 0.95 by
0.05 per blob (largest first). Phrases without a known colour word match nothing. Used by the CPU tests
to drive the real stage workers without SAM3.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.backends.base import Detections, Segmenter

__all__ = ["ColorBlobSegmenterDouble", "COLORS"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of an (H, W) bool mask, largest first."""
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
    """Counts ``set_image`` calls in ``self.encodings`` so tests can check that an image is encoded once."""

    def __init__(self, config) -> None:  # noqa: ANN001 - SegmentConfig
        super().__init__(config)
        self.image: np.ndarray | None = None
        self.encodings = 0

    def set_image(self, image: Image.Image) -> None:
        self.image = np.asarray(image.convert("RGB")).astype(np.int16)
        self.encodings += 1

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        if self.image is None:
            raise RuntimeError("call set_image() before predict()")
        return [self._detect(p) for p in phrases]

    def _detect(self, phrase: str) -> Detections:
        h, w = self.image.shape[:2]
        words = phrase.lower().split()
        color = next((COLORS[word] for word in words if word in COLORS), None)
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
