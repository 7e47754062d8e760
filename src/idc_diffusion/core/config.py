"""Load and validate workflow configs against `config/schema.yaml`, filling defaults."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

from idc_diffusion.core.captions import validate_parts

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "config" / "schema.yaml"


class ConfigError(ValueError):
    """A config that does not satisfy the schema or a cross-field rule."""


def _with_defaults(base: type) -> type:
    """A validator class that writes each missing property's `default` into the instance."""
    check_properties = base.VALIDATORS["properties"]

    def properties(validator: Any, props: Mapping, instance: Any, schema: Mapping) -> Iterator:
        if isinstance(instance, dict):
            for name, sub in props.items():
                if "default" in sub and name not in instance:
                    instance[name] = _copy(sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return validators.extend(base, {"properties": properties})


def _copy(value: Any) -> Any:
    """Deep copy of plain YAML data, so defaults are never shared between configs."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


_DefaultingValidator = _with_defaults(Draft202012Validator)


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, with libyaml's parser where PyYAML has it."""
    return yaml.load(text, Loader=YAML_LOADER)


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    """The workflow's JSON schema."""
    return parse_yaml(path.read_text())


def _key_path(error: Any) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate `config` in place (filling defaults); raise ConfigError naming every bad key."""
    validator = _DefaultingValidator(schema or load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  - {_key_path(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid config (fix these keys):\n" + "\n".join(lines))
    _check_cross_fields(config)
    return config


def _check_cross_fields(config: dict) -> None:
    """Rules JSON-Schema cannot express: fraction sums, references between sections."""
    split = config["cohort"]["split"]
    if not math.isclose(sum(split.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(f"cohort.split: fractions must sum to 1, got {split}")
    names = [s["name"] for s in config["cohort"]["strata"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"cohort.strata: stratum names must be unique, got {names}")
    for s in config["cohort"]["strata"]:
        hi = s["max_instances"]
        if hi is not None and hi < s["min_instances"]:
            raise ConfigError(f"cohort.strata[{s['name']}]: max_instances < min_instances")
    gpu, nodes = config["gpu"], config["train_nodes"]
    if nodes > 1 and (gpu < nodes or gpu % nodes):
        raise ConfigError(
            f"train_nodes: {nodes} nodes need gpu (the train job's total, {gpu}) to be a "
            "multiple of train_nodes: each node gets gpu / train_nodes GPUs"
        )
    prepare = config["prepare"]
    lo, hi = prepare["slice_band"]
    if lo >= hi:
        raise ConfigError(f"prepare.slice_band: start must be below end, got {[lo, hi]}")
    for part, windows in prepare["ct_windows"].items():
        unknown = sorted(set(windows) - set(prepare["window_presets"]))
        if unknown:
            raise ConfigError(
                f"prepare.ct_windows.{part}: unknown window preset(s) {unknown}; "
                f"define them under prepare.window_presets"
            )
    if "default" not in prepare["ct_windows"]:
        raise ConfigError("prepare.ct_windows: needs a 'default' entry for other body parts")
    try:
        validate_parts(prepare["caption"]["parts"])
    except ValueError as exc:
        raise ConfigError(f"prepare.caption.parts: {exc}") from exc


def load_config(path: Path | str) -> dict:
    """Read a YAML config file and validate it."""
    path = Path(path)
    try:
        config = parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    try:
        return validate_config(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
