SAMPLE_SHARDS = list(range(config["sample"]["n_shards"]))


# prepare.caption as a JSON argument, passed only when prompts come from a field grid.
SAMPLE_CAPTION = (
    shlex.quote(json.dumps(config["prepare"]["caption"], sort_keys=True))
    if config["sample"]["prompts"] == "grid"
    else "''"
)
# sample_base samples the base model itself: no other model, no LoRA on top.
BASE_SAMPLE_SETTINGS = shlex.quote(
    json.dumps(
        {**rule_settings("sample", config)[0], "model": None, "lora_weights": None},
        sort_keys=True,
    )
)


rule sample:
    input:
        # the trained pipeline, unless sample.model names another one (folder or hub id)
        model=lambda wildcards: [] if config["sample"]["model"] else rules.train.output.model_index,
        lora=config["sample"]["lora_weights"] or [],
        test=rules.dataset.output.test,
    output:
        directory("results/samples/shard-{sample_shard}"),
    params:
        # everything but dicom_export; the run name and the DICOM files: sample_manifest
        settings=tracked("sample"),
        caption=lambda wildcards: SAMPLE_CAPTION,
        model_dir="results/model",
    log:
        "logs/sample/shard-{sample_shard}.log",
    benchmark:
        "benchmarks/sample/shard-{sample_shard}.tsv"
    conda:
        "../envs/sample.yaml"
    resources:
        gpu=min(config["gpu"], 1),  # one device: more GPUs would sit idle
    shell:
        "python -m idc_diffusion sample --gpus {resources.gpu} --settings {params.settings}"
        " --shard {wildcards.sample_shard} --model-dir {params.model_dir}"
        " --dataset-dir $(dirname {input.test}) --out-dir {output}"
        " --caption {params.caption} > {log} 2>&1"


# The same prompts and seeds from the base model: what fine-tuning changed (evaluate compares
# real, base and fine-tuned images on every metric).
use rule sample as sample_base with:
    input:
        model=rules.base_model.output.model_index,
        lora=[],
        test=rules.dataset.output.test,
    output:
        directory("results/samples_base/shard-{sample_shard}"),
    params:
        settings=lambda wildcards: BASE_SAMPLE_SETTINGS,
        caption=lambda wildcards: SAMPLE_CAPTION,
        model_dir=lambda wildcards, input: str(Path(input.model).parent),
    log:
        "logs/sample_base/shard-{sample_shard}.log",
    benchmark:
        "benchmarks/sample_base/shard-{sample_shard}.tsv"


# Merges the shards and writes the DICOM export (sample.dicom_export): the files name the run
# (PatientName SYNTHETIC^<run_name>), so a new run_name or a change of dicom_export rewrites
# them here, in seconds, and never regenerates an image.
rule sample_manifest:
    input:
        expand(rules.sample.output, sample_shard=SAMPLE_SHARDS),
    output:
        manifest="results/samples/manifest.parquet",
        dicom=directory("results/samples/dicom"),
    params:
        dicom_export=str(config["sample"]["dicom_export"]).lower(),
        run_name=shlex.quote(config["run_name"]),
    log:
        "logs/sample_manifest/sample_manifest.log",
    benchmark:
        "benchmarks/sample_manifest/sample_manifest.tsv"
    conda:
        "../envs/sample.yaml"
    shell:
        "python -m idc_diffusion sample-manifest --shards {input} --out {output.manifest}"
        " --dicom-export {params.dicom_export} --dicom-dir {output.dicom}"
        " --run-name {params.run_name} > {log} 2>&1"


use rule sample_manifest as sample_base_manifest with:
    input:
        expand(rules.sample_base.output, sample_shard=SAMPLE_SHARDS),
    output:
        manifest="results/samples_base/manifest.parquet",
        dicom=directory("results/samples_base/dicom"),
    params:
        dicom_export=str(config["sample"]["dicom_export"]).lower(),
        run_name=shlex.quote(config["run_name"] + "-base"),
    log:
        "logs/sample_base_manifest/sample_base_manifest.log",
    benchmark:
        "benchmarks/sample_base_manifest/sample_base_manifest.tsv"
