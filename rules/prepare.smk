rule prepare:
    input:
        cohort=rules.cohort.output.cohort,
        report=shard_report,
    output:
        images=directory("results/dataset/shard-{shard}/images"),
        records="results/dataset/shard-{shard}/records.parquet",
        rejected="results/dataset/shard-{shard}/rejected.parquet",
    params:
        settings=tracked("prepare"),
        dicom_dir=lambda wildcards: f"results/dicom/shard-{wildcards.shard}",
    threads: 8  # series in parallel; Snakemake lowers it to the cores it has
    log:
        "logs/prepare/shard-{shard}.log",
    benchmark:
        "benchmarks/prepare/shard-{shard}.tsv"
    conda:
        "../envs/prepare.yaml"
    shell:
        "python -m idc_diffusion prepare --settings {params.settings} --cohort {input.cohort}"
        " --shard {wildcards.shard} --dicom-dir {params.dicom_dir} --report {input.report}"
        " --out-dir $(dirname {output.records}) --workers {threads} > {log} 2>&1"


rule dataset:
    input:
        records=expand(rules.prepare.output.records, shard=SHARDS),
        reports=expand(rules.download.output.report, shard=SHARDS),
    output:
        train=directory("results/dataset/train"),
        val=directory("results/dataset/val"),
        test=directory("results/dataset/test"),
        rejected=report("results/dataset/rejected.parquet", category="Data"),
        summary="results/dataset/summary.json",
    params:
        shards=lambda wildcards, input: [str(Path(p).parent) for p in input.records],
    log:
        "logs/dataset/dataset.log",
    benchmark:
        "benchmarks/dataset/dataset.tsv"
    conda:
        "../envs/prepare.yaml"
    shell:
        "python -m idc_diffusion dataset --shards {params.shards} --reports {input.reports}"
        " --out-dir $(dirname {output.rejected}) > {log} 2>&1"


rule latents:
    input:
        # every split train reads: the train images and the held-out ones
        train=rules.dataset.output.train,
        heldout=getattr(rules.dataset.output, config["train"]["heldout_split"]),
        base=f"{BASE_MODEL}/manifest.json",  # the base_model rule's folder (train.smk)
    output:
        index="results/latents/index.parquet",
    params:
        # the held-out split and the precision; the base model comes as an input
        settings=tracked("latents"),
    log:
        "logs/latents/latents.log",
    benchmark:
        "benchmarks/latents/latents.tsv"
    conda:
        "../envs/latents.yaml"
    resources:
        gpu=min(config["gpu"], 1),  # one device: more GPUs would sit idle
    shell:
        "python -m idc_diffusion latents --gpus {resources.gpu} --settings {params.settings}"
        " --dataset-dir $(dirname {input.train}) --base-dir $(dirname {input.base})"
        " --out-dir $(dirname {output.index}) > {log} 2>&1"
