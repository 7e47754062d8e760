"""Config schema: both shipped configs validate; bad keys fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from idc_diffusion.core.config import (
    SCHEMA_PATH,
    ConfigError,
    load_config,
    parse_yaml,
    validate_config,
)


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_configs_validate(repo: Path, name: str) -> None:
    config = load_config(repo / "config" / name)
    assert config["prepare"]["window_presets"]["lung"] == {"center": -600, "width": 1500}
    assert set(config["cohort"]["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(
    "name", ["config/config.yaml", "config/demo.yaml", "profiles/slurm/config.yaml"]
)
def test_fast_yaml_parser_reads_what_safe_load_reads(repo: Path, name: str) -> None:
    text = (repo / name).read_text()
    assert parse_yaml(text) == yaml.safe_load(text)
    schema = SCHEMA_PATH.read_text()
    assert parse_yaml(schema) == yaml.safe_load(schema)


def test_defaults_are_filled_in_nested_objects(demo_config: dict) -> None:
    assert demo_config["download"]["retries"] == 2
    assert demo_config["cohort"]["strata"][0]["collections"] == []
    assert demo_config["prepare"]["caption"]["separator"] == ", "
    assert demo_config["prepare"]["resolution"] == 64  # demo's own value wins


def _raw(repo: Path) -> dict:
    return yaml.safe_load((repo / "config" / "demo.yaml").read_text())


@pytest.mark.parametrize(
    ("path", "bad_key"),
    [
        ((), "n_shard"),
        (("prepare",), "slices_per_sries"),
        (("cohort", "strata", 0), "body_part"),
        (("download", "synthetic"), "matrx"),
    ],
)
def test_unknown_key_is_named(repo: Path, path: tuple, bad_key: str) -> None:
    config = _raw(repo)
    node = config
    for step in path:
        node = node.setdefault(step, {}) if isinstance(step, str) else node[step]
    node[bad_key] = 1
    with pytest.raises(ConfigError, match=rf"'{bad_key}' was unexpected"):
        validate_config(config)


def test_wrong_type_names_the_key_path(repo: Path) -> None:
    config = _raw(repo)
    config["prepare"]["resolution"] = "large"
    with pytest.raises(ConfigError, match=r"prepare\.resolution: 'large' is not of type 'integer'"):
        validate_config(config)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("cohort", "split", {"train": 0.5, "val": 0.1, "test": 0.1}, "sum to 1"),
        ("prepare", "slice_band", [0.9, 0.1], "slice_band"),
        ("prepare", "ct_windows", {"CHEST": ["lungs"], "default": ["abdomen"]}, "lungs"),
    ],
)
def test_cross_field_rules(repo: Path, section: str, key: str, value: object, message: str) -> None:
    config = _raw(repo)
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


@pytest.mark.parametrize(("gpu", "nodes"), [(3, 2), (1, 2), (0, 2)])
def test_train_nodes_must_divide_the_gpus(repo: Path, gpu: int, nodes: int) -> None:
    config = {**_raw(repo), "gpu": gpu, "train_nodes": nodes}
    with pytest.raises(ConfigError, match=rf"train_nodes: 2 nodes need gpu .*{gpu}.*multiple"):
        validate_config(config)
    validate_config({**_raw(repo), "gpu": 4, "train_nodes": 2, "train_cpu_processes": 3})


def test_load_config_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\ncohort: {strata: []}\n")
    with pytest.raises(
        ConfigError, match=r"(?s)bad\.yaml.*cohort\.strata: \[\] should be non-empty"
    ):
        load_config(bad)


def test_caption_template_with_identifying_field_is_rejected(repo: Path) -> None:
    config = _raw(repo)
    config["prepare"]["caption"] = {"parts": [["{modality}"], ["patient {PatientID}"]]}
    with pytest.raises(ConfigError, match=r"prepare\.caption\.parts: .*'PatientID'"):
        validate_config(config)
