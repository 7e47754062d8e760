"""What a config change reruns: each rule's tracked settings, and the ones it gets at run time.

Snakemake reruns a job when one of its tracked parameters changes (rerun trigger
``params``), and with it every job downstream. So a rule's parameters carry only the settings
that change its outputs (:func:`rule_settings`, the first part), and the command gets the
others in a second argument that Snakemake passes but never compares (``untracked`` in
rules/common.smk):

* ``--settings``: what decides the stage's outputs; a change reruns the stage and what
  depends on it;
* ``--runtime``: what decides only how the job runs (:data:`RUNTIME_ONLY`: workers,
  retries, timeouts, log and checkpoint intervals, gates checked while it runs); a change
  reruns nothing and applies to the next job that runs.

The command merges both back into one section (:func:`merge`), so a stage sees the same
settings as before, and a training checkpoint keeps the same fingerprint. Settings that
only name things (``run_name``, the card's text) are read by cheap rules of their own
(``model_card``, the sample manifests that write the DICOM export), never by ``train``,
``sample`` or ``prepare``.

tests/test_rerun_matrix.py changes every config key on a finished demo and checks the set
of rules that reruns against the expectation declared there for that key.

Imports only the standard library and stdlib-only modules: the Snakefile imports it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# The train section's keys that decide the base model (the base_model rule's; base_model.py).
BASE_KEYS = (
    "base_model",
    "revision",
    "tiny_seed",
    "tiny_vae",
    "base_model_sha256",
    "base_model_license",
    "hub_cache",
)

# Train settings that change how a training job runs, never what it writes: neither in the
# train rule's tracked parameters nor in the checkpoint fingerprint (train/checkpoints.py), so
# a change reruns nothing and takes effect in the next job.
TRAIN_JOB_ONLY = frozenset(
    {
        "resume",
        "dataloader_workers",
        "checkpoints_total_limit",
        "checkpointing_steps",
        "stop_margin_seconds",
    }
)

# Per config section, the settings that change no output of any rule (dotted paths for
# nested keys). Gates (disk_budget_GB, max_failed_fraction) are checked when the job runs:
# tightening one does not re-check finished jobs (`snakemake --forcerun RULE` does).
RUNTIME_ONLY: dict[str, tuple[str, ...]] = {
    "cohort": (
        "bigquery.project",  # the Google Cloud project billed for the query
        "disk_budget_GB",  # a gate: the stage stops before writing when over it
    ),
    "download": (
        "provider",  # where the same verified bytes come from (aws, gcs, a mirror)
        "endpoint_url",
        "s5cmd_workers",
        "s5cmd_retry_count",
        "retries",
        "retry_backoff_s",
        "stall_timeout_s",
        "max_failed_fraction",  # a gate: the job fails instead of writing its report
        "progress_interval_s",
    ),
    "train": (
        # what the checkpoint fingerprint leaves out too, validation aside
        *sorted(TRAIN_JOB_ONLY),
        # the rule's thread request (Snakemake caps it at --cores; the job's OMP threads)
        "threads",
        # where the hub snapshot is cached; results/base_model is what jobs read
        "hub_cache",
    ),
}
# Top-level keys that no rule reads as a setting: where rules run, the GPU resources and the
# train job's nodes (train tracks only its number of processes: gpu, or train_cpu_processes
# when gpu is 0).
TOP_LEVEL_RUNTIME = ("local_rules", "gpu", "train_nodes")

# Which section each rule reads, and which of its keys (None: all of them, runtime aside).
# prepare.latent_cache decides whether the latents rule runs, not what prepare writes;
# sample.dicom_export is read by the sample manifest rules (with run_name), which write the
# DICOM files, not by the sample jobs.
# the train keys the latents command reads (the base model itself comes as the rule's input)
LATENT_KEYS = (
    "heldout_split", "heldout_max_images", "mixed_precision", "base_model", "revision", "tiny_seed",
)  # fmt: skip
RULES: dict[str, tuple[str, tuple[str, ...] | None, tuple[str, ...]]] = {
    # rule: (section, only these keys, all but these keys)
    "cohort": ("cohort", None, ()),
    "download": ("download", None, ()),
    "prepare": ("prepare", None, ("latent_cache",)),
    "base_model": ("train", BASE_KEYS, ()),
    "latents": ("train", LATENT_KEYS, ()),
    "train": ("train", None, ()),
    "model_card": ("train", None, ()),
    "sample": ("sample", None, ("dicom_export",)),
    "evaluate": ("evaluate", None, ()),
}


def _pop(tree: dict, dotted: str) -> tuple[bool, Any]:
    """Remove a dotted key from nested dicts: (found, value)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node.get(name)
        if not isinstance(node, dict):
            return False, None
    if leaf not in node:
        return False, None
    return True, node.pop(leaf)


def _put(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value


def split(section: str, settings: Mapping[str, Any]) -> tuple[dict, dict]:
    """(tracked, runtime): a config section without and with only its runtime-only keys."""
    tracked: dict = copy.deepcopy(dict(settings))
    runtime: dict = {}
    for dotted in RUNTIME_ONLY.get(section, ()):
        found, value = _pop(tracked, dotted)
        if found:
            _put(runtime, dotted, value)
    return tracked, runtime


def merge(tracked: Mapping[str, Any], runtime: Mapping[str, Any]) -> dict:
    """The whole section again: `runtime` merged (nested dicts too) into `tracked`."""
    merged = copy.deepcopy(dict(tracked))
    for key, value in runtime.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def rule_settings(rule: str, config: Mapping[str, Any]) -> tuple[dict, dict]:
    """(tracked, runtime) settings of `rule`'s section from a validated config."""
    section, only, without = RULES[rule]
    tracked, runtime = split(section, config[section])
    if only is not None:
        tracked = {key: tracked.get(key) for key in only if key not in runtime}
        runtime = {key: value for key, value in runtime.items() if key in only}
    for key in without:
        tracked.pop(key, None)
    return tracked, runtime


def tracked_config(config: Mapping[str, Any]) -> dict:
    """The whole config without the settings that change no output (evaluate's provenance)."""
    result = {k: copy.deepcopy(v) for k, v in config.items() if k not in TOP_LEVEL_RUNTIME}
    for section in RUNTIME_ONLY:
        if isinstance(result.get(section), Mapping):
            result[section] = split(section, result[section])[0]
    return result
