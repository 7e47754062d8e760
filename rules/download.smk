# A checkpoint: prepare depends on the shard report (shard_report in common.smk), which holds
# a content digest per series, so prepare reruns exactly when a series' bytes change; the
# DICOM files are not inputs (removing or archiving them after prepare reruns nothing).
# After editing files under results/dicom/shard-K/, `snakemake --forcerun
# results/dicom/shard-K.json` re-verifies the shard (only changed files are read again).
# The shard report is the rule's output; the series folders beside it are not declared,
# so Snakemake never deletes them and an interrupted shard resumes where it stopped.
# When more than download.max_failed_fraction of a shard's series fail, the job exits
# non-zero without writing the output: the report is results/dicom/shard-{shard}.failed.json,
# the workflow stops, and a rerun fetches only the objects that have not landed yet.


checkpoint download:
    input:
        cohort=rules.cohort.output.cohort,
    output:
        report="results/dicom/shard-{shard}.json",
    params:
        settings=tracked("download"),
        # provider, workers, retries, timeouts, progress interval: rerun nothing
        runtime=untracked("download"),
        dicom_dir=lambda wildcards: f"results/dicom/shard-{wildcards.shard}",
    log:
        "logs/download/shard-{shard}.log",
    benchmark:
        "benchmarks/download/shard-{shard}.tsv"
    conda:
        "../envs/download.yaml"
    resources:
        downloads=1,
    shell:
        "python -m idc_diffusion download --settings {params.settings} --runtime {params.runtime}"
        " --cohort {input.cohort} --shard {wildcards.shard} --out-dir {params.dicom_dir}"
        " --report {output.report} > {log} 2>&1"
