# QuARI reproduction harness: from embeddings to the paper's tables and figures.
#
#   snakemake --cores all                                 # every output (rule all), default (offline) config
#   snakemake --report results/report.html                # then Snakemake's report of that run
#   snakemake --cores all results/table1.csv --configfile workflow/config/paper.yaml \
#       --replace-workflow-config                           # the paper's real-data reproduction
#
# results/table1.csv is the final target: asking for it builds every table and figure.

import sys

from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow/config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/mining.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "results/table1.csv",
        rules.report_pages.output,


onerror:
    print(
        "\nA job failed. Snakemake names it above with its log file (results/logs/...); the log "
        "ends with the error and where it happened.\nFix the cause and run the same command "
        "again: finished jobs are kept, only the failed job and those after it run.\n"
        "`snakemake -n` lists what is left to do.",
        file=sys.stderr,
    )
