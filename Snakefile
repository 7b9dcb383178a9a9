# QuARI reproduction harness: from embeddings to the paper's tables and figures.
#
#   snakemake --cores all                                 # every output (rule all), default (offline) config
#   snakemake --report results/report.html                # then Snakemake's report of that run
#   snakemake --cores all results/table1.csv --configfile workflow/config/paper.yaml \
#       --replace-workflow-config                           # the paper's real-data reproduction
#
# `rule all` below lists every output. Asking for results/table1.csv builds every table and figure.

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


# every final output of the workflow
rule all:
    default_target: True
    input:
        rules.tables.output,  # results/table{1,2,3,4}.csv and .md
        rules.figure_tsne.output,  # figures/fig3_tsne.png and .pdf
        rules.figure_cost_accuracy.output,  # figures/fig4_cost_accuracy.png and .pdf
        rules.report_markdown.output,  # results/report.md
        rules.report_pages.output,  # results/report/: the pages of `snakemake --report`


onerror:
    print(
        "\nA job failed. Snakemake names it above with its log file (results/logs/...); the log "
        "ends with the error and where it happened.\nFix the cause and run the same command "
        "again: finished jobs are kept, only the failed job and those after it run.\n"
        "`snakemake -n` lists what is left to do.",
        file=sys.stderr,
    )
