"""Config loading: defaults in sync, layering, and one clear error per bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import DEFAULT_CONFIG, PipelineConfig, load_config, parse_set_flags
from pipeline.errors import ConfigError


def test_default_yaml_equals_the_model_defaults() -> None:
    assert load_config() == PipelineConfig()


def test_layers_merge_key_by_key(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("segment:\n  threshold: 0.3\n  sam3:\n    checkpoint: /ckpt/sam3.pt\nvlm:\n  port: 9000\n")
    cfg = load_config(user, ["segment.threshold=0.25", "vlm.extra_args=[--enforce-eager]"])
    assert cfg.segment.threshold == 0.25  # --set wins over the file
    assert cfg.segment.sam3.checkpoint == "/ckpt/sam3.pt"
    assert cfg.segment.sam3.dtype == "bfloat16"  # untouched siblings keep their defaults
    assert cfg.vlm.port == 9000 and cfg.vlm.extra_args == ["--enforce-eager"]


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("segment:\n  treshold: 0.3\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'segment.treshold' in {user}"):
        load_config(user)


def test_wrong_type_names_key_origin_and_value() -> None:
    with pytest.raises(ConfigError, match=r"config key 'vlm.port' in --set: .*got 'eighty'"):
        load_config(None, ["vlm.port=eighty"])


@pytest.mark.parametrize("flag", ["novalue", "=1", "a..b=1"])
def test_malformed_set_flags_are_rejected(flag: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set_flags([flag])


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_default_file_is_the_documented_one() -> None:
    assert DEFAULT_CONFIG.name == "default.yaml" and DEFAULT_CONFIG.exists()


def test_a_mistyped_key_gets_the_nearest_known_one_and_a_huge_value_is_not_echoed() -> None:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    for given, suggested in (("segment.threshhold=0.3", "segment.threshold"), ("envs.sam3.kidn=venv", "envs.sam3.kind"),
                             ("segment.sam3.cuda_graph=false", "segment.sam3.cuda_graphs"), ("sgement.threshold=1", "segment")):
        with pytest.raises(ConfigError) as err:
            load_config(None, [given])
        assert err.value.hint == f"did you mean '{suggested}'?", given
    with pytest.raises(ConfigError) as err:
        load_config(None, ["segment.threshold=" + "x" * 100_000])
    assert len(err.value.message) < 300
