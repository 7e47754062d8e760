"""A real SLURM run: the demo workflow through sbatch on a one-node cluster on localhost.

`scripts/slurm_local.sh` starts munge, slurmctld and slurmd on free ports (root, Debian's
slurm-wlm, which `make test` installs). The workflow runs with the real `profiles/slurm`
(its resources, threads and retries; only the first status poll comes sooner), training
with DDP in 2 CPU processes (`train_cpu_processes: 2`, gloo). The first train job's time
limit is cut to 3 minutes while it waits, as a site's limit would cut it: the trainer reads
its end time from SLURM, checkpoints and exits 142 once the next step would not fit, the
profile's retry resumes, and the final weights equal those of an uninterrupted local run.
One workflow run serves every assertion here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, snakemake

pytestmark = [
    pytest.mark.workflow,
    pytest.mark.skipif(
        shutil.which("slurmctld") is None or os.geteuid() != 0,
        reason="needs root and Debian's slurm-wlm (scripts/slurm_local.sh install)",
    ),
]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
PROFILE = REPO / "profiles" / "slurm"
SHORT_LIMIT = 3  # minutes: the first train job's cut time limit
MAX_STEPS = 3
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run([str(SCRIPT), "start", str(state)], check=True, capture_output=True, text=True)
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    # jobs a failed or timed-out run left behind (every job of this private cluster is ours)
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    if queue.stdout.split():
        subprocess.run(["scancel", *queue.stdout.split()], check=False)
        time.sleep(5)
    subprocess.run([str(SCRIPT), "stop", str(state)], check=True)
    os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo with 2 CPU training processes, a few steps, and a stop margin as long as
    the cut time limit, so that the first train job always stops after its first step
    (however fast this machine is), and a later one, with the profile's 2880 minutes, never."""
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["train_cpu_processes"] = 2
    raw["train"].update(max_steps=MAX_STEPS, stop_margin_seconds=SHORT_LIMIT * 60)
    raw["train"]["tiny_vae"] = {"steps": 20}  # the base model's VAE fit (a localrule): quick
    raw["train"]["validation_steps"] = 0  # no prompt grid at the last step: held-out loss only
    path = tmp_path_factory.mktemp("slurm-config") / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cut_first_train_job(run: subprocess.Popen, minutes: int) -> str:
    """Wait for the first train job in the queue and cut its time limit (as root may)."""
    while run.poll() is None:
        queue = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True)
        for line in queue.stdout.splitlines():
            job_id, comment = line.split("|", 1)
            if comment == "rule_train":
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"],
                    check=True,
                )
                return job_id
        time.sleep(0.5)
    raise AssertionError("the workflow ended before a train job was queued")


@pytest.fixture(scope="module")
def slurm_run(cluster: Path, config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("slurm-demo")
    command = [
        str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--profile", str(PROFILE),
        "--workflow-profile", str(REPO / "tests" / "profiles" / "slurm-localhost"),
        "--configfile", str(config),
    ]  # fmt: skip
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir),
           "SLURM_CONF": os.environ["SLURM_CONF"]}  # fmt: skip
    log_path = workdir.parent / f"{workdir.name}.log"
    with log_path.open("w") as log:
        run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            first_train = cut_first_train_job(run, SHORT_LIMIT)
            run.wait(timeout=1500)
        finally:
            if run.poll() is None:
                run.kill()
    text = log_path.read_text()
    assert run.returncode == 0, text[-5000:]
    return {"workdir": workdir, "log": text, "first_train": first_train}


def completed_jobs(cluster: Path) -> dict[str, dict[str, str]]:
    """SLURM job id -> its fields in the controller's job completion log."""
    jobs = {}
    for line in (cluster / "log" / "jobcomp.log").read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        jobs[fields["JobId"]] = fields
    return jobs


def rule_of_jobs(log: str) -> dict[str, str]:
    """SLURM job id -> rule, from the plugin's submission lines in Snakemake's log (each
    names the job's SLURM log, .snakemake/slurm_logs/rule_X/...; kept only when it failed)."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", log)
    return dict(found)


def mem_mb(tres: str) -> float:
    value = dict(item.split("=") for item in tres.split(","))["mem"]
    return float(value[:-1]) * {"M": 1, "G": 1024}[value[-1]]


def digest(folder: Path, pattern: str) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob(pattern))
    }


def test_every_job_went_through_sbatch(cluster: Path, slurm_run: dict) -> None:
    workdir, log = slurm_run["workdir"], slurm_run["log"]
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    rules = rule_of_jobs(log)
    states = completed_jobs(cluster)
    ran = sorted(rules[slurm_id] for _, slurm_id in submitted)
    # cohort, 2 download, 2 prepare, dataset, train (twice: the time budget, then its retry),
    # sample, sample_manifest, sample_base, sample_base_manifest, evaluate; the target `all`
    # and base_model (a localrule: the login node has the internet) ran where snakemake runs
    assert ran == sorted(
        ["cohort", "download", "download", "prepare", "prepare", "dataset", "train", "train",
         "sample", "sample_manifest", "sample_base", "sample_base_manifest", "evaluate"]
    )  # fmt: skip
    assert re.search(r"^localrule base_model:", log, flags=re.M)
    for _, slurm_id in submitted:
        want = "FAILED" if slurm_id == slurm_run["first_train"] else "COMPLETED"
        assert states[slurm_id]["JobState"] == want, (rules[slurm_id], states[slurm_id])
    assert (workdir / "results" / "eval" / "report.html").is_file()


def test_the_profiles_resources_reached_slurm(cluster: Path, slurm_run: dict) -> None:
    """What SLURM allocated: the real profile's CPUs, memory and time limits, the config's
    processes (no GPU: gpu 0), never the test cluster's or a replaced set-resources."""
    states = completed_jobs(cluster)
    asked = {}
    for job_id, rule in rule_of_jobs(slurm_run["log"]).items():
        job = states[job_id]
        tres = dict(item.split("=") for item in job["Tres"].split(","))
        assert "gres/gpu" not in tres, rule
        asked.setdefault(rule, set()).add((int(job["ProcCnt"]), mem_mb(job["Tres"]),
                                           job["TimeLimit"]))  # fmt: skip
    assert asked["prepare"] == {(8, 16000, "120")}
    assert asked["download"] == {(4, 4000, "240")}
    assert asked["evaluate"] == {(4, 16000, "120")}
    assert asked["sample"] == {(1, 32000, "240")}
    assert asked["cohort"] == {(1, 4000, "60")}
    # 2 processes x (1 torch thread + 0 workers), 8000 MB per CPU; the cut limit, then 2880
    assert asked["train"] == {(2, 16000, str(SHORT_LIMIT)), (2, 16000, "2880")}


def test_train_stopped_at_its_time_budget_and_the_retry_resumed(slurm_run: dict) -> None:
    workdir = slurm_run["workdir"]
    # the failed job's SLURM log is kept: Snakemake inside it saw train fail
    first = next((workdir / ".snakemake" / "slurm_logs").rglob(f"{slurm_run['first_train']}.log"))
    assert "Error in rule train" in first.read_text()
    model = workdir / "results" / "model"
    # the checkpoint of step 1 (checkpointing_steps is 100) was the time budget's, then 142
    info = json.loads((model / "checkpoints" / "checkpoint-1" / "checkpoint.json").read_text())
    assert info["stop"] == {"reason": "time budget spent", "exit_code": 142}
    assert info["layout"] == {"processes": 2}
    train_log = (workdir / "logs" / "train" / "train.log").read_text()  # the retry's
    assert "resuming from checkpoint-1 (step 1)" in train_log
    ends = re.findall(r"SLURM job ends at (\S+ \S+)", train_log)  # each rank read its job's
    assert len(ends) == 2 and len(set(ends)) == 1  # end time (squeue: this is Slurm 22.05)
    steps = [json.loads(x)["step"] for x in (model / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1))
    summary = json.loads((model / "train_summary.json").read_text())
    assert summary["hardware"] == "2 x cpu" and summary["effective_batch_size"] == 2 * 16


def test_weights_equal_an_uninterrupted_local_run(
    slurm_run: dict, config: Path, tmp_path: Path
) -> None:
    """The same config trained locally without a time limit, on the SLURM run's data: the
    same launch (2 processes, 1 torch thread each), one job, no resume."""
    source = slurm_run["workdir"] / "results"
    for part in ("cohort", "dicom", "dataset", "base_model"):
        shutil.copytree(source / part, tmp_path / "results" / part)  # mtimes kept
    result = snakemake(
        tmp_path, "--profile", str(REPO / "profiles" / "local"), "--configfile", str(config),
        "-c2", "results/model/model_index.json",
    )  # fmt: skip
    ran = re.findall(r"^(?:local)?rule (\w+):", result.stdout + result.stderr, flags=re.M)
    assert ran == ["train"]  # nothing upstream: the copied results are up to date
    local, cluster = tmp_path / "results" / "model", source / "model"
    assert "resuming" not in (tmp_path / "logs" / "train" / "train.log").read_text()
    assert digest(local, str(UNET)) == digest(cluster, str(UNET))
    assert (local / "train_log.jsonl").read_text().count("\n") == MAX_STEPS
    losses = [
        [json.loads(x)["loss"] for x in (folder / "train_log.jsonl").read_text().splitlines()]
        for folder in (local, cluster)
    ]
    assert losses[0] == losses[1]


def test_data_outputs_equal_a_local_run(slurm_run: dict, demo_run: Path) -> None:
    slurm_results = slurm_run["workdir"] / "results"
    local_results = demo_run / "results"
    pd.testing.assert_frame_equal(
        pd.read_parquet(slurm_results / "cohort" / "cohort.parquet"),
        pd.read_parquet(local_results / "cohort" / "cohort.parquet"),
    )
    # the data half is bit-for-bit deterministic (the demo differs from this config in
    # training only; the weights are compared with a run of the same config above)
    for pattern in (
        "dicom/shard-*.json",
        "dataset/*/metadata.jsonl",
        "dataset/shard-*/images/*.png",
    ):
        assert digest(slurm_results, pattern) == digest(local_results, pattern), pattern
