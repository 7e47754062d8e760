SAMPLE_SHARDS = list(range(config["sample"]["n_shards"]))


rule sample:
    input:
        model=rules.train.output.model_index,
        test=rules.dataset.output.test,
    output:
        directory("results/samples/shard-{sample_shard}"),
    params:
        settings=section("sample"),
    log:
        "logs/sample/shard-{sample_shard}.log",
    benchmark:
        "benchmarks/sample/shard-{sample_shard}.tsv"
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    shell:
        "python -m idc_diffusion sample --settings {params.settings}"
        " --shard {wildcards.sample_shard} --model-dir $(dirname {input.model})"
        " --dataset-dir $(dirname {input.test}) --out-dir {output} > {log} 2>&1"


rule sample_manifest:
    input:
        expand(rules.sample.output, sample_shard=SAMPLE_SHARDS),
    output:
        "results/samples/manifest.parquet",
    log:
        "logs/sample_manifest/sample_manifest.log",
    benchmark:
        "benchmarks/sample_manifest/sample_manifest.tsv"
    conda:
        "../envs/train.yaml"
    shell:
        "python -m idc_diffusion sample-manifest --shards {input} --out {output} > {log} 2>&1"
