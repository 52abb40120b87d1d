"""Mask PNGs of the segment stage: threaded writing gives the same files as one-by-one, and a failure leaves no
manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.driver.sources import store_photo
from pipeline.handoff import MANIFEST_NAME, MASKS_DIR
from pipeline.images import read_mask, write_mask
from pipeline.stages.postprocess import Candidate, mask_bbox
from pipeline.stages.segment import write_masks

H, W = 90, 120


def _run_dir(tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    run.mkdir()
    Image.new("RGB", (W, H), (40, 80, 120)).save(tmp_path / f"{name}.png")
    store_photo(run, tmp_path / f"{name}.png")
    return run


def _candidates(count: int, seed: int = 0) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        mask = rng.random((H, W)) < 0.3  # noisy masks: each PNG differs and takes real compression work
        out.append(Candidate(mask=mask, box_xyxy=mask_bbox(mask), score=0.9 - i / 100, phrases=[f"thing {i}"]))
    return out


def test_threaded_and_serial_writing_give_the_same_files_and_digests(tmp_path: Path) -> None:
    cands = _candidates(7)
    manifests = {}
    for workers in (1, 4):
        run = _run_dir(tmp_path, f"w{workers}")
        manifests[workers] = write_masks(run, cands, fingerprint="f", mode="prompt", backend="test", workers=workers)
        for obj, cand in zip(manifests[workers].objects, cands):
            data = (run / obj.file).read_bytes()
            assert obj.sha256 == hashlib.sha256(data).hexdigest()
            assert np.array_equal(read_mask(run / obj.file, (W, H)), cand.mask)
        assert (run / MASKS_DIR / MANIFEST_NAME).is_file()
        assert not (run / f"{MASKS_DIR}.partial").exists()
    assert [o.sha256 for o in manifests[1].objects] == [o.sha256 for o in manifests[4].objects]
    assert [o.file for o in manifests[4].objects] == [f"{MASKS_DIR}/{i:03d}.png" for i in range(7)]


def test_a_mask_that_cannot_be_written_leaves_no_masks_dir_and_no_manifest(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "bad")
    cands = _candidates(5)
    cands[3] = Candidate(mask=np.zeros((H, W, 3), bool), box_xyxy=(0, 0, 0, 0), score=0.5, phrases=["broken"])
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        write_masks(run, cands, fingerprint="f", mode="prompt", backend="test", workers=4)
    assert not (run / MASKS_DIR).exists()


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.float32])
def test_write_mask_stores_0_and_255_for_any_truthy_dtype(tmp_path: Path, dtype: type) -> None:
    mask = np.zeros((H, W), dtype)
    mask[10:20, 30:50] = 1
    write_mask(tmp_path / "m.png", mask[:, ::-1])  # a non-contiguous view too
    stored = np.asarray(Image.open(tmp_path / "m.png"))
    assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 255}
    assert np.array_equal(stored == 255, mask[:, ::-1].astype(bool))
