import idc_index_data


rule cohort:
    output:
        cohort="results/cohort/cohort.parquet",
        citations=report("results/cohort/CITATIONS.md", category="Cohort"),
        summary="results/cohort/summary.json",
        # bytes and files per shard; the rule fails here if over cohort.disk_budget_GB
        plan="results/cohort/download_plan.json",
    params:
        settings=tracked("cohort"),
        runtime=untracked("cohort"),  # billing project, disk budget: rerun nothing
        seed=config["seed"],
        n_shards=config["n_shards"],
        # a new IDC index release reruns the cohort; reinstalling the same one does not
        index_version=idc_index_data.__version__,
    log:
        "logs/cohort/cohort.log",
    benchmark:
        "benchmarks/cohort/cohort.tsv"
    conda:
        "../envs/cohort.yaml"
    shell:
        "python -m idc_diffusion cohort --settings {params.settings} --runtime {params.runtime}"
        " --seed {params.seed}"
        " --n-shards {params.n_shards} --out-dir $(dirname {output.cohort}) > {log} 2>&1"
