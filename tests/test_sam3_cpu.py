"""The real SAM3 backend on CPU with random weights (slow: ~2-3 min, ~5 GB RAM on 2 cores).

Runs only with ``SAM3_CPU_TEST=1`` in an interpreter that has torch, torchvision, sam3 0.1.4 and open_clip_torch
(e.g. a venv built from envs/sam3.yml's pip list with a CPU torch). Random weights: this checks shapes, the
CPU patches, the batched-phrase path and the text cache, not segmentation quality.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

pytestmark = [
    pytest.mark.skipif(os.environ.get("SAM3_CPU_TEST") != "1", reason="set SAM3_CPU_TEST=1 to run the real SAM3 on CPU"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("torch", "sam3", "open_clip")),
        reason="needs torch, sam3 and open_clip_torch in this interpreter",
    ),
    pytest.mark.filterwarnings("ignore"),  # sam3 warns about CUDA autocast decorators on CPU at import
]


@pytest.fixture(scope="module")
def segmenter():
    import torch

    from pipeline.backends.sam3 import Sam3Segmenter
    from pipeline.config import Sam3Config, SegmentConfig

    torch.manual_seed(0)
    return Sam3Segmenter(SegmentConfig(device="cpu", threshold=0.0, sam3=Sam3Config(random_weights=True)))


def test_cpu_backend_batched_phrases_match_single_phrase_passes(segmenter):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    segmenter.set_image(image)
    both = segmenter.predict(["red car", "dog", "red car"])
    assert [d.phrase for d in both] == ["red car", "dog", "red car"]
    for det in both:
        n = len(det.scores)
        assert n == 200  # threshold 0: every query comes back
        assert det.masks.shape == (n, 96, 128) and det.masks.dtype == bool
        assert det.boxes.shape == (n, 4) and np.isfinite(det.boxes).all()
        assert np.all((det.scores >= 0) & (det.scores <= 1)) and not np.isnan(det.scores).any()
        assert np.all(np.diff(det.scores) <= 0)  # sorted by descending score
    single = segmenter.predict(["dog"])[0]  # text from the cache, own pass
    np.testing.assert_allclose(single.scores, both[1].scores, atol=1e-5)
    assert (single.masks == both[1].masks).mean() > 0.999


def test_cpu_prefetched_images_match_the_one_image_path(segmenter):
    """Three images through ``prefetch`` with batches of 2 (a pair and a single): each image's detections equal
    those of its own ``set_image`` (fp32 on CPU: only GEMM blocking may round differently)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (72 + 8 * i, 96, 3), dtype=np.uint8)) for i in range(3)]
    phrases = ["red car", "dog"]
    alone = []
    for image in images:
        segmenter.set_image(image)
        alone.append(segmenter.predict(phrases))
    config = segmenter.config
    segmenter.config = config.model_copy(update={"sam3": config.sam3.model_copy(update={"prefetch_batch": 2})})
    try:
        segmenter.prefetch(images)
        assert len(segmenter._prefetched) == 3
        for image, expected in zip(reversed(images), reversed(alone)):  # taken in any order, by pixels
            segmenter.set_image(image)
            for got, want in zip(segmenter.predict(phrases), expected):
                np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
                assert got.masks.shape == want.masks.shape
                assert (got.masks == want.masks).mean() > 0.999
    finally:
        segmenter.config = config
    assert not segmenter._prefetched, "every prefetched image was taken by set_image"
