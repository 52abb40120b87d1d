"""Batching logic of the SAM 3D backend (torch-free): grouping, per-object seeds, splitting back, OOM halving."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.backends.sam3d_batching import plan_groups, run_in_groups
from pipeline.backends.sam3d_presets import PRESETS, resolve_settings
from pipeline.config import Sam3dConfig, load_config
from tests.doubles.batch_models import BatchedFlowDouble, FakeOutOfMemory, is_fake_oom

SEEDS = [42, 43, 44, 45, 46, 47, 48]
VOXELS = [5, 9, 3, 7, 11, 2, 6]


def _run(max_batch: int, capacity: int = 1_000, **kw):
    model = BatchedFlowDouble(seeds=SEEDS, voxels=VOXELS, capacity=capacity)
    return model, run_in_groups(len(SEEDS), model.run_group, max_batch, is_oom=is_fake_oom, **kw)


def test_plan_groups_keeps_order_and_bounds_size() -> None:
    assert plan_groups(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_groups(2, 8) == [[0, 1]]
    assert plan_groups(0, 4) == []
    with pytest.raises(ValueError, match="max_batch"):
        plan_groups(3, 0)


@pytest.mark.parametrize("max_batch", [2, 3, 4, 8])
def test_results_do_not_depend_on_batch_composition(max_batch: int) -> None:
    _, alone = _run(1)
    model, batched = _run(max_batch)
    assert model.calls == plan_groups(len(SEEDS), max_batch)
    assert len(batched.results) == len(SEEDS)
    for i, (a, b) in enumerate(zip(alone.results, batched.results)):
        assert a.shape == (VOXELS[i], 4), f"object {i} got another object's voxels"
        np.testing.assert_array_equal(a, b, err_msg=f"object {i} changed with max_batch={max_batch}")


def test_objects_with_different_seeds_differ() -> None:
    _, run = _run(4)
    assert not np.allclose(run.results[0][:2], run.results[1][:2])


def test_oom_halves_the_batch_and_keeps_the_smaller_size() -> None:
    freed = []
    model, run = _run(8, capacity=2, on_oom=lambda: freed.append(1))
    # 8 → the group of 7 fails, 7 // 2 = 3 fails, 3 // 2 = 1 fits and sticks
    assert model.calls == [list(range(7)), [0, 1, 2]] + [[i] for i in range(7)]
    assert run.batch_sizes == [1] * 7
    assert len(freed) == 2 and len(run.notes) == 2
    assert "retrying with batches of 3" in run.notes[0] and "max_batch_objects" in run.notes[0]
    _, alone = _run(1)
    for a, b in zip(alone.results, run.results):
        np.testing.assert_array_equal(a, b)


def test_oom_halving_stops_at_the_first_size_that_fits() -> None:
    model, run = _run(4, capacity=2)
    assert model.calls == [[0, 1, 2, 3], [0, 1], [2, 3], [4, 5], [6]]
    assert run.batch_sizes == [2, 2, 2, 1]
    assert run.notes == [
        "CUDA out of memory with 4 objects in one batch: retrying with batches of 2 "
        "(lower reconstruct.sam3d.max_batch_objects to skip this)"
    ]


def test_oom_of_a_single_object_is_raised() -> None:
    with pytest.raises(FakeOutOfMemory):
        _run(4, capacity=0)


def test_other_errors_are_not_retried() -> None:
    calls = []

    def broken(indices: list[int]) -> list[int]:
        calls.append(indices)
        raise ValueError("bad mask")

    with pytest.raises(ValueError, match="bad mask"):
        run_in_groups(4, broken, 4, is_oom=is_fake_oom)
    assert calls == [[0, 1, 2, 3]]


def test_a_wrong_number_of_results_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="returned 1 results for 2 objects"):
        run_in_groups(2, lambda idx: [0], 2, is_oom=is_fake_oom)


def test_on_done_sees_every_object_once_in_order() -> None:
    seen: list[int] = []
    _run(3, on_done=lambda idx, res: seen.extend(idx))
    assert seen == list(range(len(SEEDS)))


def test_quality_preset_is_the_unchanged_default() -> None:
    cfg = load_config().reconstruct.sam3d
    assert cfg.preset == "quality"
    s = resolve_settings(cfg)
    assert (s.stage1_steps, s.stage2_steps, s.decode_formats) == (25, 25, ("gaussian", "mesh"))
    assert not s.stage1_distillation and not s.stage2_distillation
    assert cfg.max_batch_objects >= 1


def test_explicit_knobs_override_the_preset() -> None:
    s = resolve_settings(Sam3dConfig(preset="preview", stage2_steps=3, decode_formats=["gaussian", "mesh"]))
    assert s.stage1_steps == PRESETS["preview"].stage1_steps and s.stage2_steps == 3
    assert s.decode_formats == ("gaussian", "mesh") and s.stage1_distillation
    fast = resolve_settings(Sam3dConfig(preset="fast"))
    assert fast == PRESETS["fast"] and fast.stage1_steps < 25 and fast.stage2_steps < 25
    assert resolve_settings(Sam3dConfig(preset="preview")).decode_formats == ("gaussian",)
