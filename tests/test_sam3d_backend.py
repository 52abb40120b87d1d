"""SAM 3D backend glue that runs without torch: checkpoint checks and error texts."""

from __future__ import annotations

import pytest

from pipeline.backends import sam3d
from pipeline.errors import BackendError

PIPELINE_YAML = """\
_target_: sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap
ss_generator_config_path: ss_generator.yaml
ss_generator_ckpt_path: ss_generator.ckpt
slat_decoder_gs_config_path: slat_decoder_gs.yaml
slat_decoder_gs_ckpt_path: slat_decoder_gs.ckpt
slat_decoder_gs_4_config_path: null
dtype: float16
"""


def _ckpt_dir(tmp_path, *files):
    (tmp_path / "pipeline.yaml").write_text(PIPELINE_YAML)
    for name in files:
        (tmp_path / name).write_text("x")
    return tmp_path


def test_required_files_follow_pipeline_yaml(tmp_path):
    _ckpt_dir(tmp_path)
    yaml_path = tmp_path / "pipeline.yaml"
    assert sam3d.required_checkpoint_files(yaml_path, random_weights=False) == [
        "ss_generator.yaml", "ss_generator.ckpt", "slat_decoder_gs.yaml", "slat_decoder_gs.ckpt",
    ]  # fmt: skip
    assert sam3d.required_checkpoint_files(yaml_path, random_weights=True) == ["ss_generator.yaml", "slat_decoder_gs.yaml"]


def test_missing_checkpoints_are_listed_by_name_and_place(tmp_path):
    _ckpt_dir(tmp_path, "ss_generator.yaml", "slat_decoder_gs.yaml", "ss_generator.ckpt")
    with pytest.raises(BackendError) as err:
        sam3d.check_checkpoint_dir(tmp_path, random_weights=False)
    assert "slat_decoder_gs.ckpt" in err.value.message and str(tmp_path.resolve()) in err.value.message
    assert "ss_generator.ckpt" not in err.value.message
    assert "facebook/sam-3d-objects" in err.value.hint and "checkpoint_dir" in err.value.hint
    # random weights need only the configs
    assert sam3d.check_checkpoint_dir(tmp_path, random_weights=True) == tmp_path.resolve() / "pipeline.yaml"


def test_missing_pipeline_yaml(tmp_path):
    with pytest.raises(BackendError, match="pipeline.yaml is expected in"):
        sam3d.check_checkpoint_dir(tmp_path / "nowhere", random_weights=False)


def test_oom_hint_names_every_knob():
    for knob in ("max_objects", "max_batch_objects: 1", "preset: preview", "reconstruct.device"):
        assert knob in sam3d.OOM_HINT
