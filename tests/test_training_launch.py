"""The train rule's launcher: python on one GPU, accelerate for several, srun across nodes."""

from __future__ import annotations

import re

import pytest
import torch

from idc_diffusion.cli import main
from idc_diffusion.config import ConfigError
from idc_diffusion.launch import launch_command, require_cuda


def test_one_gpu_runs_plain_python() -> None:
    assert launch_command(1) == "python -m idc_diffusion"


def test_several_gpus_use_accelerate() -> None:
    command = launch_command(4)
    assert command.startswith("accelerate launch ")
    assert "--multi_gpu" in command and "--num_processes 4" in command
    assert command.endswith("-m idc_diffusion") and "srun" not in command


def test_several_nodes_use_srun_and_rendezvous() -> None:
    command = launch_command(8, nodes=2, port=29600)
    assert command.startswith("srun --nodes 2 --ntasks-per-node 1 accelerate launch")
    assert "--num_machines 2" in command and "--num_processes 16" in command
    assert "--rdzv_backend c10d" in command and "--main_process_port 29600" in command
    assert "SLURM_JOB_NODELIST" in command


def test_bad_resources_are_rejected() -> None:
    with pytest.raises(ValueError, match="gpu"):
        launch_command(-1)


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
