# Shared helpers: config validation at start-up, shard list, the stage command line.
import json
import shlex
import sys
from pathlib import Path

SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))

from idc_diffusion.base_model import (  # noqa: E402
    BASE_MODEL_DIR,
    ModelError,
    base_settings,
    check_base_model,
)
from idc_diffusion.config import ConfigError, validate_config  # noqa: E402

try:
    validate_config(config)
except ConfigError as exc:
    raise WorkflowError(f"config rejected before any job ran: {exc}") from None

# The base model must be usable before hours of download and prepare are spent: free for
# `tiny` and for a snapshot already in results/base_model (offline too), one metadata request
# for a hub id. Jobs re-reading this file (cluster nodes may have no internet) skip it.
BASE_MODEL = str(BASE_MODEL_DIR)
if workflow.is_main_process:
    try:
        check_base_model(config["train"], BASE_MODEL_DIR)
    except ModelError as exc:
        raise WorkflowError(f"base model rejected before any job ran: {exc}") from None

# Stages that need the internet run where snakemake runs when compute nodes have none.
workflow.localrules(*config["local_rules"])

SHARDS = list(range(config["n_shards"]))

# Every rule runs one subcommand of the package's CLI (`python -m idc_diffusion STAGE`); the
# code reaches jobs through the workflow's source folder, in the main env and in per-rule
# conda envs alike (the prefix is part of every job script, local or on a cluster).
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(str(SRC))}; ")


wildcard_constraints:
    shard=r"\d+",
    sample_shard=r"\d+",


def section(name):
    """A params function giving a config section as one shell-quoted JSON argument.

    Key order does not matter (sorted), so reformatting a config reruns nothing; a function,
    because caption templates contain braces that Snakemake would read as wildcards.
    """
    text = shlex.quote(json.dumps(config[name], sort_keys=True))
    return lambda wildcards: text


def base_settings_arg():
    """A params function giving the train keys that decide the base model, as quoted JSON."""
    text = shlex.quote(json.dumps(base_settings(config["train"]), sort_keys=True))
    return lambda wildcards: text


def whole_config():
    """A params function giving the whole validated config as shell-quoted sorted JSON."""
    text = shlex.quote(json.dumps(config, sort_keys=True))
    return lambda wildcards: text


def shard_report(wildcards):
    """The shard's download report, once its checkpoint has run: prepare's only DICOM input.

    The report holds a content digest per series (hashes of its files, taken by download while
    verifying), so prepare reruns when a series' bytes change and never because files were
    touched, removed or archived: the head node neither lists nor hashes DICOM files.
    """
    return checkpoints.download.get(shard=wildcards.shard).output.report
