# Checkpoints under results/model/checkpoints/ are not declared as outputs, so Snakemake
# keeps them when a training job is interrupted and `train.resume: auto` continues there.


rule train:
    input:
        train=rules.dataset.output.train,
        heldout=rules.dataset.output.val,
        summary=rules.cohort.output.summary,
        citations=rules.cohort.output.citations,
    output:
        model_index="results/model/model_index.json",
        card=report("results/model/model_card.md", category="Model"),
        log="results/model/train_log.jsonl",
        summary="results/model/train_summary.json",
    params:
        settings=section("train"),
        run_name=config["run_name"],
    log:
        "logs/train/train.log",
    benchmark:
        "benchmarks/train/train.tsv"
    conda:
        "../envs/train.yaml"
    threads: 4
    resources:
        gpu=1,
    shell:
        "python -m idc_diffusion train --settings {params.settings} --run-name {params.run_name}"
        " --dataset-dir $(dirname {input.train}) --cohort-dir $(dirname {input.summary})"
        " --out-dir $(dirname {output.model_index}) > {log} 2>&1"
