"""The command that starts training, and the check that a GPU job got a GPU.

Used by ``rules/train.smk`` with the rule's resources, the cluster contract of
docs/CLUSTER.md: ``gpu`` is the job's total (the SLURM plugin asks ``--gpus=G``), spread
evenly over ``nodes``; the rule's threads are CPUs per node, shared by that node's ranks.
So ``--set-resources train:gpu=4`` trains with DDP on four GPUs of one node, and
``train:gpu=8 train:nodes=2`` on four GPUs of each of two nodes.
"""

from __future__ import annotations

from idc_diffusion.config import ConfigError

PORT = 29500
ACCELERATE = "accelerate launch --dynamo_backend no --mixed_precision no"


def gpus_per_node(gpus: int, nodes: int) -> int:
    """The GPUs of each node: the job's `gpus` split evenly (ValueError when they cannot)."""
    if gpus < 0 or nodes < 1 or (nodes > 1 and (gpus < nodes or gpus % nodes)):
        raise ValueError(
            f"train rule resources: gpu ({gpus}, the job's total) must be >= 0, nodes "
            f"({nodes}) >= 1, and gpu a multiple of nodes on several nodes"
        )
    return gpus // nodes


def launch_command(gpus: int, nodes: int = 1, cpus: int = 1, port: int = PORT) -> str:
    """The shell prefix that runs ``-m idc_diffusion`` on `gpus` GPUs over `nodes` nodes.

    * 0 (the CPU) or 1 GPU, 1 node: ``python -m idc_diffusion``.
    * several GPUs, 1 node: ``accelerate launch --multi_gpu --num_processes G``.
    * several nodes (inside the SLURM job): one ``accelerate launch`` per node through an
      inner ``srun --overlap`` (the executor plugin already runs the job as one
      ``srun -n1`` step holding the allocation; without ``--overlap`` the inner step would
      wait for it forever), with `cpus` CPUs and G / nodes GPUs per node; each node's rank
      is its ``SLURM_NODEID`` and the main process runs on the first host of the job.

    Mixed precision is not a launcher flag here: ``train.mixed_precision`` sets it.
    """
    local = gpus_per_node(gpus, nodes)
    if gpus <= 1 and nodes == 1:
        return "python -m idc_diffusion"
    if nodes == 1:
        return f"{ACCELERATE} --multi_gpu --num_machines 1 --num_processes {gpus} -m idc_diffusion"
    per_node = (
        f"{ACCELERATE} --multi_gpu --num_machines {nodes} --num_processes {gpus} "
        f'--machine_rank "$SLURM_NODEID" --main_process_ip "$IDC_MAIN_HOST" '
        f'--main_process_port {port} -m idc_diffusion "$@"'
    )
    return (
        'IDC_MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
        f"srun --overlap --kill-on-bad-exit=1 --nodes={nodes} --ntasks={nodes} "
        f"--ntasks-per-node=1 --cpus-per-task={max(1, cpus)} --gpus-per-node={local} "
        f"bash -c 'exec {per_node}' idc-diffusion"
    )


def require_cuda(gpus: int) -> None:
    """Stop when the job was given `gpus` > 0 GPUs but torch sees no CUDA device.

    Without this a GPU job on a CPU-only torch build (or with no visible device) would
    run its 865M-parameter UNet on the CPU for days, silently.
    """
    import torch  # here: the Snakefile imports this module, and torch takes seconds

    if gpus <= 0 or torch.cuda.is_available():
        return
    build = (
        f"torch {torch.__version__} built with CUDA {torch.version.cuda}, which sees no device"
        if torch.version.cuda
        else f"torch {torch.__version__} is a CPU-only build"
    )
    raise ConfigError(
        f"this job asked for {gpus} GPU(s) (the rule's gpu resource) but {build}; install a "
        "CUDA build of torch on the GPU nodes, or set the config's gpu (or the profile's "
        "set-resources) to 0 to run on the CPU"
    )
