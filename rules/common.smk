# Shared helpers: config validation at start-up, shard list, the stage command line.
import json
import shlex
import sys
from pathlib import Path

SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))

from idc_diffusion.train.base_model import BASE_MODEL_DIR, ModelError, check_base_model  # noqa: E402
from idc_diffusion.core.config import ConfigError, validate_config  # noqa: E402
from idc_diffusion.core.rerun import rule_settings, tracked_config  # noqa: E402

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


# What reruns a job (src/idc_diffusion/core/rerun.py): a rule's tracked params carry only the
# settings that change its outputs (`tracked`); the ones that change only how a job runs
# (workers, retries, intervals, gates) reach its command as `--runtime`, in a params value
# Snakemake passes but never compares (`untracked`): changing one reruns nothing.


class Untracked:
    """A params value that reaches the job's command but never reruns it.

    Snakemake's params rerun trigger records only values of builtin types (str, int, dict,
    ...) and skips others, so this object, formatted as its text, is passed but not
    compared. tests/test_rerun_matrix.py checks that with the installed Snakemake.
    """

    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


def _quoted(value):
    """Shell-quoted sorted JSON: key order does not matter, so reformatting reruns nothing."""
    return shlex.quote(json.dumps(value, sort_keys=True))


def tracked(rule):
    """A params function giving `rule`'s tracked settings as one shell-quoted JSON argument.

    A function, because caption templates contain braces Snakemake would read as wildcards.
    """
    text = _quoted(rule_settings(rule, config)[0])
    return lambda wildcards: text


def untracked(rule):
    """`rule`'s runtime-only settings, as an untracked params value (quoted JSON)."""
    return Untracked(_quoted(rule_settings(rule, config)[1]))


def provenance_config():
    """A params function giving the config without its runtime-only settings (quoted JSON)."""
    text = _quoted(tracked_config(config))
    return lambda wildcards: text


def shard_report(wildcards):
    """The shard's download report, once its checkpoint has run: prepare's only DICOM input.

    The report holds a content digest per series (hashes of its files, taken by download while
    verifying), so prepare reruns when a series' bytes change and never because files were
    touched, removed or archived: the head node neither lists nor hashes DICOM files.
    """
    return checkpoints.download.get(shard=wildcards.shard).output.report
