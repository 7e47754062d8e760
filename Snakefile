# IDC-Diffusion: IDC cohort -> DICOM -> windowed, captioned images -> model -> samples -> report.
# Run: snakemake --profile profiles/local --configfile config/demo.yaml   (see README.md)
from snakemake.utils import min_version

min_version("9.0")


# config/config.yaml is the real run; `--configfile X` replaces it (never merges into it), so
# the demo and your own configs are complete on their own, with the schema's defaults.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/cohort.smk"
include: "rules/download.smk"
include: "rules/prepare.smk"
include: "rules/train.smk"
include: "rules/sample.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        rules.cohort.output,
        rules.dataset.output,
        rules.train.output,
        rules.model_card.output,
        rules.sample_manifest.output,
        rules.evaluate.output,
    default_target: True
