"""The train rule's launcher: python on one GPU, accelerate for several, srun across nodes."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from idc_diffusion.cli import main
from idc_diffusion.core.config import ConfigError
from idc_diffusion.train.launch import launch_command, require_cuda, train_cpus


def test_one_gpu_runs_plain_python() -> None:
    assert launch_command(1) == "python -m idc_diffusion"


def test_several_gpus_use_accelerate_on_a_free_port() -> None:
    command = launch_command(4, threads=3)
    assert command.startswith("OMP_NUM_THREADS=3 accelerate launch ")  # torch threads each
    assert "--multi_gpu" in command and "--num_processes 4" in command
    assert "--main_process_port 0 " in command  # accelerate picks a free port
    assert command.endswith("-m idc_diffusion") and "srun" not in command
    assert "ACCELERATE_USE_CPU" not in command


def test_cpu_processes_run_ddp_on_the_cpu() -> None:
    command = launch_command(0, cpu_processes=2)
    # accelerate's multi-process launcher (torchrun); ACCELERATE_USE_CPU makes it gloo on CPU
    assert command.startswith("ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch ")
    assert "--num_processes 2 --main_process_port 0 -m idc_diffusion" in command
    assert launch_command(1, cpu_processes=2) == "python -m idc_diffusion"  # GPUs decide
    with pytest.raises(ValueError, match="train_cpu_processes"):
        launch_command(0, cpu_processes=0)


def test_the_job_asks_each_process_its_threads_and_workers_per_node() -> None:
    assert train_cpus(1, threads=4, workers=4) == 8
    assert train_cpus(4, threads=4, workers=4) == 32  # the workers scale with the GPUs
    assert train_cpus(8, nodes=2, threads=4, workers=4) == 32  # per node: 4 GPUs there
    assert train_cpus(0, cpu_processes=2, threads=1, workers=0) == 2
    assert train_cpus(0, threads=1, workers=0) == 1


def test_several_nodes_use_an_overlapping_srun_with_the_jobs_resources() -> None:
    command = launch_command(8, nodes=2, cpus=16, port=29600)
    assert "srun --overlap " in command  # the plugin's srun -n1 step holds the allocation
    for flag in ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=16",
                 "--gpus-per-node=4"):  # fmt: skip
        assert f" {flag} " in command
    assert "--num_machines 2 --num_processes 8" in command  # 8 = the job's total
    assert '--machine_rank "$SLURM_NODEID"' in command
    assert "--main_process_port 29600" in command and "SLURM_JOB_NODELIST" in command


class Job:
    """What the SLURM jobstep plugin reads of a Snakemake job: resources and threads."""

    def __init__(self, threads: int, **resources: int) -> None:
        self.threads, self.resources = threads, SimpleNamespace(**resources)
        self.resources.get = resources.get


@pytest.mark.parametrize(("gpus", "nodes", "threads"), [(4, 1, 8), (8, 2, 16), (2, 2, 4)])
def test_the_inner_srun_asks_what_the_plugins_step_holds(
    gpus: int, nodes: int, threads: int
) -> None:
    jobstep = pytest.importorskip("snakemake_executor_plugin_slurm_jobstep")
    job = Job(threads, gpu=gpus, nodes=nodes)
    outer = {  # the flags of the plugin's `srun -n1 ...` around the job
        flag.split("=")[0]: int(flag.split("=")[1])
        for flag in (
            jobstep.get_gpu_setting(job),
            jobstep.get_node_setting(job),
            jobstep.get_cpu_setting(job, True),
        )
    }
    assert outer == {"--gpus": gpus, "--nodes": nodes, "--cpus-per-task": threads}
    command = launch_command(gpus, nodes, threads)
    if nodes == 1:
        assert f"--num_processes {gpus}" in command and "srun" not in command
        return
    inner = dict(re.findall(r" (--[a-z-]+)=(\d+)", command))
    assert int(inner["--nodes"]) == nodes
    assert int(inner["--gpus-per-node"]) * nodes == gpus  # the job's total, not per node
    assert int(inner["--cpus-per-task"]) == threads  # CPUs per node, the outer task's


def test_the_multi_node_command_gives_each_node_its_rank(tmp_path: Path) -> None:
    """Runs the command with stand-ins for srun (two nodes), scontrol and accelerate."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
        'for node in 0 1; do SLURM_NODEID=$node "$@"; done',
        "scontrol": "printf 'gpu-a\\ngpu-b\\n'",
        "accelerate": "python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    line = launch_command(4, nodes=2, cpus=8) + ' train --settings \'{"a": "b c"}\''
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "gpu-[a-b]"}  # fmt: skip
    done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for rank, out in enumerate(done.stdout.splitlines()):
        argv = json.loads(out)
        assert argv[argv.index("--machine_rank") + 1] == str(rank)
        assert argv[argv.index("--main_process_ip") + 1] == "gpu-a"
        assert argv[-3:] == ["train", "--settings", '{"a": "b c"}']


def test_bad_resources_are_rejected() -> None:
    with pytest.raises(ValueError, match="gpu"):
        launch_command(-1)
    with pytest.raises(ValueError, match="multiple of nodes"):
        launch_command(3, nodes=2)


def test_the_cpu_runs_plain_python() -> None:
    assert launch_command(0) == "python -m idc_diffusion"
    with pytest.raises(ValueError, match="several nodes"):
        launch_command(0, nodes=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA")
def test_a_gpu_job_without_cuda_stops_naming_the_torch_build(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_cuda(0)  # the CPU was asked for: fine
    with pytest.raises(ConfigError, match=rf"2 GPU\(s\).*torch {re.escape(torch.__version__)}"):
        require_cuda(2)
    # the stage stops before reading anything: its inputs need not exist
    assert main(["train", "--gpus", "1", "--settings", "{}", "--dataset-dir", "/nonexistent"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and torch.__version__ in error and "gpu" in error
