"""A real SLURM run: the demo workflow through sbatch on a one-node cluster on localhost.

`scripts/slurm_local.sh` starts munge, slurmctld and slurmd (root, Debian's slurm-wlm, which
`make test` installs); every job must pass through sbatch, and the deterministic outputs
must equal those of a local run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, snakemake

pytestmark = [
    pytest.mark.workflow,
    pytest.mark.skipif(
        shutil.which("slurmctld") is None or os.geteuid() != 0,
        reason="needs root and Debian's slurm-wlm (scripts/slurm_local.sh install)",
    ),
]
SCRIPT = REPO / "scripts" / "slurm_local.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run([str(SCRIPT), "start", str(state)], check=True, capture_output=True, text=True)
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run([str(SCRIPT), "stop", str(state)], check=True)
    os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="module")
def slurm_run(cluster: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("slurm-demo")
    result = snakemake(
        workdir,
        "--profile",
        str(REPO / "profiles" / "slurm"),
        "--workflow-profile",
        str(REPO / "tests" / "profiles" / "slurm-localhost"),
        "--configfile",
        str(REPO / "config" / "demo.yaml"),
        env={"SLURM_CONF": os.environ["SLURM_CONF"]},
    )
    return workdir, result.stdout + result.stderr


def completed_jobs(cluster: Path) -> dict[str, str]:
    """SLURM job id -> final state, from the controller's job completion log."""
    text = (cluster / "log" / "jobcomp.log").read_text()
    return dict(re.findall(r"JobId=(\d+) .*?JobState=(\w+)", text))


def digest(folder: Path, pattern: str) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob(pattern))
    }


def test_every_job_went_through_sbatch(cluster: Path, slurm_run: tuple[Path, str]) -> None:
    workdir, log = slurm_run
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    rules = re.findall(r"^(?:rule|checkpoint) (\w+):", log, flags=re.M)
    # cohort, 2 download, 2 prepare, dataset, train, sample, sample_manifest, sample_base,
    # sample_base_manifest, evaluate: every job but the local ones was submitted; the target
    # rule `all` and base_model (a localrule: on a cluster the login node has the internet)
    # ran where snakemake runs
    assert len(submitted) == len([r for r in rules if r != "all"]) == 12
    assert re.search(r"^localrule base_model:", log, flags=re.M)
    states = completed_jobs(cluster)
    assert {slurm_id for _, slurm_id in submitted} <= set(states)
    assert all(states[slurm_id] == "COMPLETED" for _, slurm_id in submitted)
    assert (workdir / "results" / "eval" / "report.html").is_file()


def test_outputs_equal_a_local_run(slurm_run: tuple[Path, str], demo_run: Path) -> None:
    slurm_results = slurm_run[0] / "results"
    local_results = demo_run / "results"
    pd.testing.assert_frame_equal(
        pd.read_parquet(slurm_results / "cohort" / "cohort.parquet"),
        pd.read_parquet(local_results / "cohort" / "cohort.parquet"),
    )
    # the data half is bit-for-bit deterministic; CPU training is not across thread counts
    # (SLURM jobs get one core here, the local run two), so the model is compared by its log
    for pattern in (
        "dicom/shard-*.json",
        "dataset/*/metadata.jsonl",
        "dataset/shard-*/images/*.png",
    ):
        assert digest(slurm_results, pattern) == digest(local_results, pattern), pattern
    slurm_log = (slurm_results / "model" / "train_log.jsonl").read_text().splitlines()
    local_log = (local_results / "model" / "train_log.jsonl").read_text().splitlines()
    assert len(slurm_log) == len(local_log) > 0
