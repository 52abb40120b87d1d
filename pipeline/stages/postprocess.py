"""From raw per-phrase detections to the final object list (pure NumPy).

Order of operations: score threshold → minimum area → sort by score → greedy de-duplication across
phrases by mask IoU (the higher score wins and the loser's phrase is recorded on the winner) →
keep at most ``max_objects``. Masks stay at input resolution, (H, W) bool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline.backends.base import Detections

__all__ = ["Candidate", "select_objects", "mask_iou", "mask_bbox"]


@dataclass
class Candidate:
    """One object after post-processing: (H, W) bool mask, XYXY pixel box, score, and its phrases."""

    mask: np.ndarray
    box_xyxy: tuple[float, float, float, float]
    score: float
    phrases: list[str] = field(default_factory=list)
    decision: str | None = None

    @property
    def label(self) -> str:
        """The phrase whose detection was kept."""
        return self.phrases[0]

    @property
    def area(self) -> int:
        """Mask area in pixels."""
        return int(self.mask.sum())


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (H, W) bool masks; 0 when both are empty."""
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return float(inter) / float(union) if union else 0.0


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight XYXY box of a mask in pixels, max exclusive; (0, 0, 0, 0) for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def select_objects(
    detections: Sequence[Detections],
    *,
    threshold: float,
    min_area_px: int,
    dedup_iou: float,
    max_objects: int,
) -> list[Candidate]:
    """Filter, de-duplicate across phrases and truncate; the result is sorted by descending score."""
    pool: list[Candidate] = []
    for det in detections:
        for mask, box, score in zip(det.masks, det.boxes, det.scores):
            mask = np.asarray(mask, dtype=bool)
            # `not >=` rather than `<`: a NaN score (broken or random weights) must fail the threshold too
            if not float(score) >= threshold or int(np.count_nonzero(mask)) < max(min_area_px, 1):
                continue
            pool.append(Candidate(mask, tuple(float(v) for v in box), float(score), [det.phrase]))
    pool.sort(key=lambda c: c.score, reverse=True)
    extents = [_extent(c.mask) for c in pool]  # tight box + area once per candidate: cheap exact IoU below
    kept: list[tuple[Candidate, tuple[int, int, int, int, int]]] = []
    for cand, extent in zip(pool, extents):
        duplicate_of = next((k for k, k_ext in kept if _iou_fast(k.mask, cand.mask, k_ext, extent) >= dedup_iou), None)
        if duplicate_of is None:
            kept.append((cand, extent))
        elif cand.label not in duplicate_of.phrases:
            duplicate_of.phrases.append(cand.label)
    return [k for k, _ in kept[:max_objects]]


def _extent(mask: np.ndarray) -> tuple[int, int, int, int, int]:
    """(x0, y0, x1, y1, area) of a non-empty (H, W) bool mask, max exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return x0, y0, x1, y1, int(np.count_nonzero(mask[y0:y1, x0:x1]))


def _iou_fast(a: np.ndarray, b: np.ndarray, ea: tuple[int, ...], eb: tuple[int, ...]) -> float:
    """Same value as :func:`mask_iou`, counting the intersection only inside the overlap of the tight boxes
    (full-resolution masks of many candidates made the all-pixels version the bottleneck)."""
    x0, y0, x1, y1 = max(ea[0], eb[0]), max(ea[1], eb[1]), min(ea[2], eb[2]), min(ea[3], eb[3])
    if x0 >= x1 or y0 >= y1:
        return 0.0
    inter = int(np.count_nonzero(a[y0:y1, x0:x1] & b[y0:y1, x0:x1]))
    union = ea[4] + eb[4] - inter
    return inter / union if union else 0.0
