"""The command that starts training: plain python on one GPU, accelerate for several.

Used by ``rules/train.smk`` with the rule's resources (``gpu`` per node, ``nodes``), so
``--set-resources train:gpu=4`` is all it takes to train with DDP on four GPUs.
"""

from __future__ import annotations

from idc_diffusion.config import ConfigError

PORT = 29500
ACCELERATE = "accelerate launch --dynamo_backend no --mixed_precision no"


def launch_command(gpus: int, nodes: int = 1, port: int = PORT) -> str:
    """The shell prefix that runs ``-m idc_diffusion`` on `gpus` GPUs x `nodes` nodes.

    * 0 (the CPU) or 1 GPU, 1 node: ``python -m idc_diffusion``.
    * several GPUs, 1 node: ``accelerate launch --multi_gpu --num_processes G``.
    * several nodes (inside a SLURM allocation): one ``accelerate launch`` per node via
      ``srun``, ranks assigned by torch's c10d rendezvous on the allocation's first host.

    Mixed precision is not a launcher flag here: ``train.mixed_precision`` sets it.
    """
    if gpus < 0 or nodes < 1 or (gpus == 0 and nodes > 1):
        raise ValueError(
            f"train rule resources: gpu ({gpus}) must be >= 0 and nodes ({nodes}) >= 1, "
            "with gpu >= 1 on several nodes"
        )
    if gpus <= 1 and nodes == 1:
        return "python -m idc_diffusion"
    total = gpus * nodes
    if nodes == 1:
        return f"{ACCELERATE} --multi_gpu --num_machines 1 --num_processes {total} -m idc_diffusion"
    head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    return (
        f"srun --nodes {nodes} --ntasks-per-node 1 {ACCELERATE} --multi_gpu "
        f"--num_machines {nodes} --num_processes {total} --rdzv_backend c10d "
        f"--main_process_ip {head} --main_process_port {port} -m idc_diffusion"
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
