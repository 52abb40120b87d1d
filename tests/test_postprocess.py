"""select_objects / mask_iou / mask_bbox on synthetic masks (pure NumPy, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.backends.base import Detections
from pipeline.stages.postprocess import Candidate, mask_bbox, mask_iou, select_objects

H, W = 40, 60


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """(H, W) bool mask with the half-open pixel rectangle [x0, x1) × [y0, y1) set."""
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def dets(phrase: str, *items: tuple[np.ndarray, float]) -> Detections:
    """Detections of one phrase from (mask, score) pairs; boxes are the masks' tight boxes."""
    if not items:
        return Detections(phrase, np.zeros((0, H, W), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    masks = np.stack([m for m, _ in items])
    boxes = np.array([mask_bbox(m) for m, _ in items], np.float32)
    scores = np.array([s for _, s in items], np.float32)
    return Detections(phrase, masks, boxes, scores)


def select(detections, *, threshold=0.5, min_area_px=1, dedup_iou=0.7, max_objects=20) -> list[Candidate]:
    return select_objects(
        detections, threshold=threshold, min_area_px=min_area_px, dedup_iou=dedup_iou, max_objects=max_objects
    )


# ------------------------------------------------------------------------------------------ helpers


def test_mask_iou_of_known_rectangles():
    a = rect(0, 0, 10, 10)  # 100 px
    b = rect(5, 0, 15, 10)  # 100 px, 50 shared
    assert mask_iou(a, b) == pytest.approx(50 / 150)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, rect(20, 20, 30, 30)) == 0.0


def test_mask_iou_of_two_empty_masks_is_zero():
    empty = np.zeros((H, W), bool)
    assert mask_iou(empty, empty) == 0.0


def test_mask_bbox_is_xyxy_with_exclusive_max():
    assert mask_bbox(rect(3, 7, 12, 9)) == (3.0, 7.0, 12.0, 9.0)
    single = np.zeros((H, W), bool)
    single[5, 4] = True
    assert mask_bbox(single) == (4.0, 5.0, 5.0, 6.0)
    assert mask_bbox(np.zeros((H, W), bool)) == (0.0, 0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------ filters


def test_empty_input_gives_no_objects():
    assert select([]) == []
    assert select([dets("cat")]) == []


def test_score_threshold_is_inclusive():
    out = select([dets("cat", (rect(0, 0, 10, 10), 0.5), (rect(20, 0, 30, 10), 0.49))], threshold=0.5)
    assert [c.score for c in out] == [pytest.approx(0.5)]


def test_nan_scores_never_pass_the_threshold():
    # Random or broken weights can give NaN scores; NaN < threshold is False, so a naive test keeps them.
    out = select([dets("cat", (rect(0, 0, 10, 10), float("nan")), (rect(20, 0, 30, 10), 0.9))], threshold=0.0)
    assert len(out) == 1 and out[0].score == pytest.approx(0.9)


def test_min_area_drops_small_masks_and_is_inclusive():
    small = rect(0, 0, 3, 3)  # 9 px
    exact = rect(10, 10, 14, 14)  # 16 px
    out = select([dets("dot", (small, 0.9), (exact, 0.8))], min_area_px=16)
    assert [c.area for c in out] == [16]


def test_empty_masks_are_dropped_even_with_min_area_zero():
    out = select([dets("ghost", (np.zeros((H, W), bool), 0.99), (rect(0, 0, 2, 2), 0.6))], min_area_px=0)
    assert [c.area for c in out] == [4]


def test_non_bool_masks_are_read_as_nonzero():
    m = rect(0, 0, 10, 10).astype(np.uint8) * 255
    det = Detections("cat", m[None], np.array([[0, 0, 10, 10]], np.float32), np.array([0.9], np.float32))
    (cand,) = select([det])
    assert cand.mask.dtype == bool and cand.area == 100


# ------------------------------------------------------------------------------------------ ordering


def test_result_is_sorted_by_descending_score_across_phrases():
    out = select(
        [
            dets("cat", (rect(0, 0, 10, 10), 0.6), (rect(20, 0, 30, 10), 0.95)),
            dets("dog", (rect(0, 20, 10, 30), 0.8)),
        ]
    )
    assert [c.score for c in out] == pytest.approx([0.95, 0.8, 0.6])
    assert [c.label for c in out] == ["cat", "dog", "cat"]


def test_candidate_keeps_box_score_and_phrase():
    (cand,) = select([dets("cup", (rect(4, 5, 14, 25), 0.77))])
    assert cand.box_xyxy == (4.0, 5.0, 14.0, 25.0)
    assert cand.phrases == ["cup"] and cand.label == "cup"
    assert cand.mask.shape == (H, W)
    assert cand.decision is None


# ------------------------------------------------------------------------------------------ de-duplication


def test_cross_phrase_duplicate_keeps_higher_score_and_records_both_phrases():
    obj = rect(0, 0, 20, 20)
    almost = rect(0, 0, 20, 19)  # IoU 0.95 with obj
    out = select([dets("cat", (almost, 0.7)), dets("kitten", (obj, 0.9))])
    assert len(out) == 1
    assert out[0].score == pytest.approx(0.9)
    assert out[0].phrases == ["kitten", "cat"]
    assert out[0].label == "kitten"
    assert out[0].area == 400  # the winner's mask, not a union


def test_overlap_below_dedup_iou_keeps_both():
    a = rect(0, 0, 10, 10)
    b = rect(5, 0, 15, 10)  # IoU 1/3
    out = select([dets("left", (a, 0.9)), dets("right", (b, 0.8))], dedup_iou=0.5)
    assert [c.label for c in out] == ["left", "right"]
    assert all(len(c.phrases) == 1 for c in out)


def test_dedup_threshold_is_inclusive():
    a = rect(0, 0, 10, 10)
    b = rect(5, 0, 15, 10)  # IoU exactly 1/3
    out = select([dets("left", (a, 0.9)), dets("right", (b, 0.8))], dedup_iou=1 / 3)
    assert len(out) == 1 and out[0].phrases == ["left", "right"]


def test_same_phrase_recorded_once_when_it_duplicates_itself():
    obj = rect(0, 0, 20, 20)
    out = select([dets("cat", (obj, 0.9), (obj.copy(), 0.8))])
    assert len(out) == 1 and out[0].phrases == ["cat"]


def test_three_phrases_on_one_object_are_all_recorded_in_score_order():
    obj = rect(10, 10, 30, 30)
    out = select([dets("pet", (obj, 0.6)), dets("cat", (obj, 0.9)), dets("animal", (obj, 0.7))])
    assert len(out) == 1
    assert out[0].phrases == ["cat", "animal", "pet"]


def test_dedup_compares_with_kept_objects_only():
    # b overlaps a (dropped into a) and c; c does not overlap a. c must survive: b was never kept.
    a = rect(0, 0, 20, 10)
    b = rect(2, 0, 22, 10)  # IoU(a, b) = 18/22 ≈ 0.82
    c = rect(6, 0, 26, 10)  # IoU(a, c) = 14/26 ≈ 0.54, IoU(b, c) = 16/24 ≈ 0.67
    out = select([dets("x", (a, 0.9)), dets("y", (b, 0.8)), dets("z", (c, 0.7))], dedup_iou=0.6)
    assert [c.label for c in out] == ["x", "z"]
    assert out[0].phrases == ["x", "y"]


def test_nested_small_object_is_not_a_duplicate_of_the_big_one():
    big = rect(0, 0, 40, 40)
    small = rect(5, 5, 10, 10)
    out = select([dets("table", (big, 0.9)), dets("cup", (small, 0.8))])
    assert [c.label for c in out] == ["table", "cup"]


# ------------------------------------------------------------------------------------------ truncation


def test_max_objects_keeps_the_best_after_dedup():
    # 5 distinct objects plus a high-scoring duplicate of the best: the duplicate must not use up a slot.
    objs = [rect(10 * i, 0, 10 * i + 8, 8) for i in range(5)]
    scores = [0.9, 0.8, 0.7, 0.6, 0.55]
    out = select(
        [dets("box", *zip(objs, scores)), dets("crate", (objs[0].copy(), 0.85))],
        max_objects=3,
    )
    assert [c.score for c in out] == pytest.approx([0.9, 0.8, 0.7])
    assert out[0].phrases == ["box", "crate"]


def test_max_objects_one():
    out = select([dets("a", (rect(0, 0, 5, 5), 0.6)), dets("b", (rect(10, 10, 15, 15), 0.7))], max_objects=1)
    assert [c.label for c in out] == ["b"]


def test_many_candidates_stay_fast_and_correct():
    rng = np.random.default_rng(0)
    items = []
    for i in range(120):
        x, y = int(rng.integers(0, W - 6)), int(rng.integers(0, H - 6))
        items.append((rect(x, y, x + 6, y + 6), float(rng.uniform(0.5, 1.0))))
    out = select([dets("thing", *items[:60]), dets("object", *items[60:])], dedup_iou=0.7, max_objects=200)
    # brute-force reference: greedy NMS by score over all candidates
    ref: list[tuple[np.ndarray, float]] = []
    for m, s in sorted(items, key=lambda t: t[1], reverse=True):
        if all(mask_iou(k, m) < 0.7 for k, _ in ref):
            ref.append((m, s))
    assert [c.score for c in out] == pytest.approx([s for _, s in ref])
    for cand in out:
        assert all(mask_iou(cand.mask, other.mask) < 0.7 for other in out if other is not cand)
