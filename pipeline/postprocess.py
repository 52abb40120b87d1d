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
            if not float(score) >= threshold or int(mask.sum()) < max(min_area_px, 1):
                continue
            pool.append(Candidate(mask, tuple(float(v) for v in box), float(score), [det.phrase]))
    pool.sort(key=lambda c: c.score, reverse=True)
    kept: list[Candidate] = []
    for cand in pool:
        duplicate_of = next((k for k in kept if mask_iou(k.mask, cand.mask) >= dedup_iou), None)
        if duplicate_of is None:
            kept.append(cand)
        elif cand.label not in duplicate_of.phrases:
            duplicate_of.phrases.append(cand.label)
    return kept[:max_objects]
