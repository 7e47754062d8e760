"""The command that starts training, the CPUs it asks for, and the check that a GPU job got
a GPU.

Used by ``rules/train.smk`` with the config's ``gpu``, ``train_nodes`` and
``train_cpu_processes``, the cluster contract of docs/CLUSTER.md: ``gpu`` is the train job's
total (the SLURM plugin asks ``--gpus=G``), spread evenly over ``train_nodes``; one process
per GPU, or ``train_cpu_processes`` on the CPU when ``gpu`` is 0. The rule's threads are CPUs
per node: each local process's torch threads plus its data-loader workers, so they grow with
the GPUs. The profile sets neither them nor the GPUs, so these config keys never clobber it.
"""

from __future__ import annotations

from idc_diffusion.core.config import ConfigError

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


def processes_per_node(gpus: int, nodes: int = 1, cpu_processes: int = 1) -> int:
    """Training processes on each node: one per GPU, or `cpu_processes` on the CPU (gpus 0,
    one node only)."""
    if cpu_processes < 1:
        raise ValueError(f"train_cpu_processes ({cpu_processes}) must be >= 1")
    local = gpus_per_node(gpus, nodes)
    return local if gpus > 0 else cpu_processes


def train_cpus(
    gpus: int, nodes: int = 1, cpu_processes: int = 1, threads: int = 1, workers: int = 0
) -> int:
    """CPUs per node of the train job: each local process's `threads` (torch) and `workers`
    (data loader), so the job's CPUs, and the workers they feed, scale with the GPUs."""
    return processes_per_node(gpus, nodes, cpu_processes) * (max(1, threads) + max(0, workers))


def launch_command(
    gpus: int,
    nodes: int = 1,
    cpus: int = 1,
    port: int = PORT,
    cpu_processes: int = 1,
    threads: int = 1,
) -> str:
    """The shell prefix that runs ``-m idc_diffusion`` on `gpus` GPUs over `nodes` nodes.

    * one process (0 GPUs and ``cpu_processes`` 1, or 1 GPU): ``python -m idc_diffusion``.
    * several processes, 1 node: ``accelerate launch --multi_gpu --num_processes P`` on a
      free port (``--main_process_port 0``); on the CPU (``gpus`` 0, ``cpu_processes`` P)
      with ``ACCELERATE_USE_CPU=true``, which makes accelerate's multi-process launcher
      (torchrun) run DDP over gloo.
    * several nodes (inside the SLURM job): one ``accelerate launch`` per node through an
      inner ``srun --overlap`` (the executor plugin already runs the job as one
      ``srun -n1`` step holding the allocation; without ``--overlap`` the inner step would
      wait for it forever), with `cpus` CPUs and G / nodes GPUs per node; each node's rank
      is its ``SLURM_NODEID`` and the main process runs on the first host of the job.

    Several processes each get ``OMP_NUM_THREADS=threads`` (the config's torch threads per
    process; Snakemake would give each all of the job's CPUs). Only the multi-node command
    depends on `cpus`, so a local run's ``--cores`` never changes the command (a param).
    Mixed precision is not a launcher flag here: ``train.mixed_precision`` sets it.
    """
    local = processes_per_node(gpus, nodes, cpu_processes)
    if nodes == 1 and local == 1:
        return "python -m idc_diffusion"
    omp = f"OMP_NUM_THREADS={max(1, threads)}"
    if nodes == 1:
        cpu = "ACCELERATE_USE_CPU=true " if gpus == 0 else ""
        return (
            f"{cpu}{omp} {ACCELERATE} --multi_gpu --num_machines 1 --num_processes {local} "
            "--main_process_port 0 -m idc_diffusion"
        )
    per_node = (
        f"{ACCELERATE} --multi_gpu --num_machines {nodes} --num_processes {gpus} "
        f'--machine_rank "$SLURM_NODEID" --main_process_ip "$IDC_MAIN_HOST" '
        f'--main_process_port {port} -m idc_diffusion "$@"'
    )
    return (
        'IDC_MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
        f"{omp} srun --overlap --kill-on-bad-exit=1 --nodes={nodes} --ntasks={nodes} "
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
        "CUDA build of torch on the GPU nodes, or set the config's gpu to 0 to run on the CPU"
    )
