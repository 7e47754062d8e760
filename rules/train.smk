# Checkpoints under results/model/checkpoints/ are not declared as outputs, so Snakemake
# keeps them when a training job is interrupted and `train.resume: auto` continues there.
# GPUs, nodes and CPUs come from the config, never from a profile (docs/CLUSTER.md): `gpu: 4`
# trains with DDP on 4 GPUs (accelerate launch); gpu is the job's total, so `gpu: 8` with
# `train_nodes: 2` runs 4 per node on two nodes of a SLURM allocation; `gpu: 0` with
# `train_cpu_processes: 2` runs DDP on the CPU. Threads are CPUs per node: each process's
# torch threads and data-loader workers, so they scale with the GPUs.
from idc_diffusion.train.launch import launch_command, train_cpus  # src/ is on sys.path (common.smk)

TRAIN_GPUS, TRAIN_NODES = config["gpu"], config["train_nodes"]
TRAIN_CPU_PROCESSES = config["train_cpu_processes"]
TRAIN_CPUS = train_cpus(  # per node
    TRAIN_GPUS,
    TRAIN_NODES,
    TRAIN_CPU_PROCESSES,
    config["train"]["threads"],
    config["train"]["dataloader_workers"],
)

# The base pipeline, fetched once where the network is: on SLURM a localrule runs on the
# login node (compute nodes often have no internet). latents and train read only this
# folder, never the hub; manifest.json records source, resolved commit, license, digests.
# For `tiny` it is the seeded tiny SD-2 pipeline whose VAE is first fitted on the train split
# and frozen: the demo's stand-in for SD 2.1's pretrained VAE (src/idc_diffusion/train/tiny_base.py).
localrules:
    base_model,
    model_card,


TINY_BASE = config["train"]["base_model"] == "tiny"


rule base_model:
    input:
        train=rules.dataset.output.train if TINY_BASE else [],
    output:
        model_index=f"{BASE_MODEL}/model_index.json",
        manifest=f"{BASE_MODEL}/manifest.json",
    params:
        settings=tracked("base_model"),
        runtime=untracked("base_model"),  # the hub cache folder
        resolution=config["prepare"]["resolution"],
        dataset=lambda wildcards, input: (
            f"--dataset-dir {Path(input.train).parent}" if TINY_BASE else ""
        ),
    log:
        "logs/base_model/base_model.log",
    benchmark:
        "benchmarks/base_model/base_model.tsv"
    conda:
        "../envs/base_model.yaml"
    shell:
        "python -m idc_diffusion base-model --settings {params.settings} --runtime {params.runtime}"
        " {params.dataset}"
        " --resolution {params.resolution} --out-dir $(dirname {output.manifest}) > {log} 2>&1"


rule train:
    input:
        train=rules.dataset.output.train,
        heldout=rules.dataset.output.val,
        base=rules.base_model.output.manifest,
        # the shared latent cache, when prepare.latent_cache builds one
        latents=rules.latents.output.index if config["prepare"]["latent_cache"] else [],
    output:
        model_index="results/model/model_index.json",
        log="results/model/train_log.jsonl",
        summary="results/model/train_summary.json",
    params:
        settings=tracked("train"),
        # resume, workers, checkpoint interval and limit, stop margin, threads: rerun nothing
        runtime=untracked("train"),
        # the number of training processes changes the batch, data order and LR position;
        # how they are placed (nodes, threads) changes nothing, so the command is untracked
        processes=TRAIN_GPUS or TRAIN_CPU_PROCESSES,
        launch=lambda wildcards, resources, threads: Untracked(
            launch_command(
                int(resources.gpu),
                int(getattr(resources, "nodes", 1)),
                cpus=threads,  # read by the multi-node command only (srun --cpus-per-task)
                cpu_processes=TRAIN_CPU_PROCESSES,
                threads=config["train"]["threads"],
            )
        ),
    log:
        "logs/train/train.log",
    benchmark:
        "benchmarks/train/train.tsv"
    conda:
        "../envs/train.yaml"
    threads: TRAIN_CPUS
    resources:
        gpu=TRAIN_GPUS,
        nodes=TRAIN_NODES,
    shell:
        "{params.launch} train --gpus {resources.gpu} --settings {params.settings}"
        " --runtime {params.runtime}"
        " --dataset-dir $(dirname {input.train})"
        " --latent-dir results/latents --base-dir $(dirname {input.base})"
        " --out-dir $(dirname {output.model_index}) > {log} 2>&1"


# The model card names the run and describes the model: a cheap rule of its own (a localrule),
# so a new run_name rewrites the card and never retrains.
rule model_card:
    input:
        summary=rules.train.output.summary,
        cohort=rules.cohort.output.cohort,
        cohort_summary=rules.cohort.output.summary,
        base=rules.base_model.output.manifest,
    output:
        card=report("results/model/model_card.md", category="Model"),
    params:
        settings=tracked("model_card"),  # the hyperparameter table: train's tracked settings
        run_name=shlex.quote(config["run_name"]),
    log:
        "logs/model_card/model_card.log",
    benchmark:
        "benchmarks/model_card/model_card.tsv"
    conda:
        "../envs/model_card.yaml"
    shell:
        "python -m idc_diffusion model-card --settings {params.settings}"
        " --run-name {params.run_name} --model-dir $(dirname {input.summary})"
        " --cohort-dir $(dirname {input.cohort}) --base-dir $(dirname {input.base})"
        " --out {output.card} > {log} 2>&1"
