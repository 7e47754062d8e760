"""What the SLURM profile submits: sbatch arguments built by the installed executor plugin.

The workflow's DAG is built in-process from the real `profiles/slurm` (parsed by Snakemake's
own command line, as `snakemake --profile profiles/slurm` does) and the plugin's own
functions turn each job into its sbatch arguments (`get_submit_command` + `set_gres_string`,
what `Executor.run_job` calls) and into the `srun` step around it (the jobstep plugin). GPUs,
nodes and CPUs come from config keys, so setting them keeps the profile's memory, runtime
and partitions; `--set-resources` on the command line would replace all of them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

slurm = pytest.importorskip("snakemake_executor_plugin_slurm")
jobstep = pytest.importorskip("snakemake_executor_plugin_slurm_jobstep")

from snakemake.api import SnakemakeApi  # noqa: E402
from snakemake.cli import parse_args, parse_config  # noqa: E402
from snakemake.settings.types import (  # noqa: E402
    ConfigSettings,
    DAGSettings,
    OutputSettings,
    ResourceSettings,
    StorageSettings,
)
from snakemake_executor_plugin_slurm.submit_string import get_submit_command  # noqa: E402
from snakemake_executor_plugin_slurm.utils import set_gres_string  # noqa: E402
from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry  # noqa: E402

# Snakemake leaves the input-size coroutine of disk_mb unawaited while it builds the DAG
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
PROFILE = REPO / "profiles" / "slurm"
GPU_RULES = {"latents", "train", "sample", "sample_base"}


@pytest.fixture(scope="module")
def real_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config/config.yaml with the tiny base model (the hub's needs the network to check),
    and the latent cache on, so the latents rule is in the DAG too."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["train"]["base_model"] = "tiny"
    config["prepare"]["latent_cache"] = True
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sbatch(workdir: Path, *argv: str, profile: Path = PROFILE) -> dict[str, dict]:
    """Rule name -> the sbatch arguments (a token list), the jobstep's srun settings and the
    params of its first job in the DAG, as `snakemake --profile PROFILE *argv` submits it."""
    _, args = parse_args(["--profile", str(profile), *argv])
    settings = ExecutorPluginRegistry().get_plugin(args.executor).get_settings(args)
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(
                cores=args.cores,
                nodes=args.jobs,
                max_threads=args.max_threads,
                resources=args.resources,
                overwrite_threads=args.set_threads,
                overwrite_resources=args.set_resources,
                default_resources=args.default_resources,
            ),
            config_settings=ConfigSettings(
                config=parse_config(args.config), configfiles=args.configfile
            ),
            storage_settings=StorageSettings(),
            snakefile=REPO / "Snakefile",
            workdir=workdir,
        )
        workflow_api.dag(DAGSettings(targets={"all"}))
        # the DAG as the scheduler gets it (no public accessor): jobs with their resources
        workflow = workflow_api._workflow
        workflow._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        found = {}
        for job in workflow.dag.jobs:
            if job.name in found or job.rule.norun:
                continue
            params = {
                "run_uuid": "RUN",
                "slurm_logfile": "LOG",
                "comment_str": f"rule_{job.name}",
                "account": "",  # the profile sets none (site lines are commented out)
                "partition": "",
                "workdir": str(workdir),
            }
            call = get_submit_command(job, params, settings=settings) + set_gres_string(job)
            gpu_job = bool(job.resources.get("gpu"))
            found[job.name] = {
                "sbatch": shlex.split(call),
                "srun": [
                    jobstep.get_cpu_setting(job, gpu_job),
                    jobstep.get_gpu_setting(job),
                    jobstep.get_node_setting(job),
                ],
                # as the shell sees them (train's launch line is an Untracked value)
                "params": {k: str(v) for k, v in job.params.items()},
            }
    return found


def flags(tokens: list[str]) -> dict[str, str]:
    """`--x=v`, `--x v` and `-t v` tokens as a dict (flags without a value map to '')."""
    out, key = {}, None
    for token in tokens[1:]:
        if token.startswith("-"):
            key, _, value = token.partition("=")
            out[key] = value
            key = None if value else key
        elif key is not None:
            out[key], key = token, None
    return out


def test_the_profile_sets_no_gpus_nodes_or_train_threads() -> None:
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    for rule, resources in profile["set-resources"].items():
        assert not {"gpu", "nodes", "gres"} & set(resources), rule  # the config's keys
    assert "train" not in profile["set-threads"]  # CPUs follow the GPUs (train_cpus)


def test_one_gpu_keeps_every_profile_resource(tmp_path: Path, real_config: Path) -> None:
    jobs = sbatch(tmp_path, "--configfile", str(real_config))
    train = flags(jobs["train"]["sbatch"])
    # 1 process x (4 torch threads + 4 data-loader workers); memory per CPU from the profile
    assert train["--gpus"] == "1" and train["--nodes"] == "1"
    assert train["--cpus-per-task"] == "8" and train["--mem-per-cpu"] == "8000"
    assert train["-t"] == "2880" and "--mem" not in train
    for rule in ("latents", "sample", "sample_base"):
        assert flags(jobs[rule]["sbatch"])["--gpus"] == "1", rule
    sample = flags(jobs["sample"]["sbatch"])
    assert (sample["--mem"], sample["-t"]) == ("32000", "240")
    prepare = flags(jobs["prepare"]["sbatch"])
    assert (prepare["--cpus-per-task"], prepare["--mem"], prepare["-t"]) == ("8", "16000", "120")
    assert flags(jobs["download"]["sbatch"])["-t"] == "240"
    for rule, job in jobs.items():
        if rule not in GPU_RULES:
            assert "--gpus" not in flags(job["sbatch"]), rule
    assert jobs["train"]["params"]["launch"] == "python -m idc_diffusion"


def test_gpu_from_the_config_scales_train_and_keeps_the_profile(
    tmp_path: Path, real_config: Path
) -> None:
    jobs = sbatch(tmp_path, "--configfile", str(real_config), "--config", "gpu=4")
    train = flags(jobs["train"]["sbatch"])
    assert train["--gpus"] == "4" and train["--nodes"] == "1"
    assert train["--cpus-per-task"] == "32"  # 4 processes x (4 + 4): workers scale with GPUs
    assert train["--mem-per-cpu"] == "8000" and train["-t"] == "2880"  # the profile's
    assert jobs["train"]["srun"] == ["--cpus-per-task=32", "--gpus=4", "--nodes=1"]
    launch = jobs["train"]["params"]["launch"]
    assert "--multi_gpu --num_machines 1 --num_processes 4 --main_process_port 0" in launch
    assert launch.startswith("OMP_NUM_THREADS=4 accelerate launch")  # torch threads each
    for rule in ("latents", "sample", "sample_base"):  # one device each: never 4
        assert flags(jobs[rule]["sbatch"])["--gpus"] == "1", rule
    assert flags(jobs["sample"]["sbatch"])["--mem"] == "32000"


def test_gpus_over_nodes_ask_what_the_launch_spreads(tmp_path: Path, real_config: Path) -> None:
    jobs = sbatch(tmp_path, "--configfile", str(real_config), "--config", "gpu=8", "train_nodes=2")
    train = flags(jobs["train"]["sbatch"])
    assert (train["--gpus"], train["--nodes"], train["--cpus-per-task"]) == ("8", "2", "32")
    assert train["-t"] == "2880" and train["--mem-per-cpu"] == "8000"
    assert jobs["train"]["srun"] == ["--cpus-per-task=32", "--gpus=8", "--nodes=2"]
    inner = flags(["srun", *shlex.split(jobs["train"]["params"]["launch"].split(" srun ")[1])])
    assert inner["--nodes"] == "2" and inner["--gpus-per-node"] == "4"
    assert inner["--cpus-per-task"] == "32"  # the node's CPUs, as sbatch asked them


def test_a_gpu_model_in_a_site_profile_joins_the_configs_count(
    tmp_path: Path, real_config: Path
) -> None:
    site = yaml.safe_load((PROFILE / "config.yaml").read_text())
    site["set-resources"]["train"]["gpu_model"] = "a100"
    site["set-resources"]["train"]["slurm_partition"] = "gpu"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "config.yaml").write_text(yaml.safe_dump(site))
    work = tmp_path / "work"
    work.mkdir()
    jobs = sbatch(
        work, "--configfile", str(real_config), "--config", "gpu=2", profile=tmp_path / "site"
    )
    train = flags(jobs["train"]["sbatch"])
    assert train["--gpus"] == "a100:2" and train["--cpus-per-task"] == "16"
    assert train["-t"] == "2880"


def test_cpu_processes_ask_cpus_not_gpus(tmp_path: Path) -> None:
    demo = str(REPO / "config" / "demo.yaml")
    jobs = sbatch(tmp_path, "--configfile", demo, "--config", "train_cpu_processes=2")
    train = flags(jobs["train"]["sbatch"])
    assert "--gpus" not in train and train["--ntasks"] == "1"
    assert train["--cpus-per-task"] == "2"  # 2 processes x (1 thread + 0 workers): the demo's
    launch = jobs["train"]["params"]["launch"]
    assert launch.startswith("ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch")
    assert "--num_processes 2 --main_process_port 0" in launch


def test_set_resources_on_the_command_line_would_replace_the_profiles(
    tmp_path: Path, real_config: Path
) -> None:
    """Why GPUs are config keys: Snakemake replaces the profile's whole set-resources."""
    jobs = sbatch(tmp_path, "--configfile", str(real_config), "--set-resources", "train:gpu=4")
    train = flags(jobs["train"]["sbatch"])
    assert train["--gpus"] == "4"
    assert (train["--mem"], train["-t"]) == ("4000", "60")  # the defaults, not 8000/CPU, 2880
    assert flags(jobs["prepare"]["sbatch"])["--mem"] == "4000"  # prepare's 16000 is gone too
