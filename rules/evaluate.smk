rule evaluate:
    input:
        manifest=rules.sample_manifest.output.manifest,
        base_manifest=rules.sample_base_manifest.output.manifest,
        train=rules.dataset.output.train,
        test=rules.dataset.output.test,
        rejected=rules.dataset.output.rejected,
        model_summary=rules.train.output.summary,
        train_log=rules.train.output.log,
        cohort_summary=rules.cohort.output.summary,
        citations=rules.cohort.output.citations,
    output:
        metrics=report(
            "results/eval/metrics.json",
            category="Evaluation",
            labels={"output": "metrics.json"},
        ),
        report=report(
            "results/eval/report.html",
            category="Evaluation",
            labels={"output": "report.html"},
        ),
        figures=report(
            directory("results/eval/figures"),
            patterns=["{name}.png"],
            category="Evaluation",
            subcategory="Figures",
            labels={"figure": "{name}"},
        ),
    params:
        settings=tracked("evaluate"),
        # the report's provenance: the config without its runtime-only settings (those
        # change no result, so they rerun nothing here either); evaluate is downstream of
        # every other stage, so the rest reruns nothing a section change would not
        config=provenance_config(),
    log:
        "logs/evaluate/evaluate.log",
    benchmark:
        "benchmarks/evaluate/evaluate.tsv"
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python -m idc_diffusion evaluate --settings {params.settings}"
        " --run-config {params.config} --samples-dir $(dirname {input.manifest})"
        " --base-samples-dir $(dirname {input.base_manifest})"
        " --dataset-dir $(dirname {input.train}) --model-dir $(dirname {input.model_summary})"
        " --cohort-dir $(dirname {input.cohort_summary})"
        " --out-dir $(dirname {output.metrics}) > {log} 2>&1"
