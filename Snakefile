# vsbench: a virtual-staining benchmark campaign as one DAG.
# Targets: `snakemake --cores all` (demo), `snakemake target/er/metrics.csv` (one target),
# `snakemake --profile profiles/slurm --configfile my_campaign.yaml` (cluster).

from snakemake.utils import min_version

min_version("9.0")


if not config:

    configfile: f"{workflow.basedir}/config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "report/index.html",
        expand("target/{target}/metrics.csv", target=CAMPAIGN["targets"]),
