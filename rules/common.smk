# Shared helpers: config validation at start-up, shard list, the stage command line.
import json
import shlex
import sys
from pathlib import Path

SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))

from idc_diffusion.config import ConfigError, validate_config  # noqa: E402

try:
    validate_config(config)
except ConfigError as exc:
    raise WorkflowError(f"config rejected before any job ran: {exc}") from None

SHARDS = list(range(config["n_shards"]))

# The base pipeline's folder, written by base_model (train.smk); latents, train and sample read
# only this. BASE_KEYS: the train keys that decide it (no other train setting rebuilds it).
BASE_MODEL = "results/base_model"
BASE_KEYS = ("base_model", "revision", "tiny_seed", "tiny_vae")

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
    text = shlex.quote(json.dumps({k: config["train"][k] for k in BASE_KEYS}, sort_keys=True))
    return lambda wildcards: text


def whole_config():
    """A params function giving the whole validated config as shell-quoted sorted JSON."""
    text = shlex.quote(json.dumps(config, sort_keys=True))
    return lambda wildcards: text



def shard_dicom_files(wildcards):
    """The verified DICOM files of a shard, listed once its download checkpoint has run.

    As prepare inputs they make a changed file rerun that shard's prepare, and only that
    shard's (Snakemake compares checksums, so a mere `touch` changes nothing). Listed from
    the shard report's `ok` series: one directory listing per series.
    """
    shard_report = Path(checkpoints.download.get(shard=wildcards.shard).output.report)
    folder = shard_report.with_suffix("")
    files = []
    for series in json.loads(shard_report.read_text())["series"]:
        if series["status"] == "ok":
            series_dir = folder / series["SeriesInstanceUID"]
            files += sorted(str(p) for p in series_dir.iterdir()) if series_dir.is_dir() else []
    return files
