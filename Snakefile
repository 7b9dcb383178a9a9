# QuARI reproduction harness: from embeddings to the paper's tables and figures.
#
#   snakemake --cores all results/table1.csv              # the whole chain, default (offline) config
#   snakemake --cores all results/table1.csv --configfile workflow/config/paper.yaml \
#       --replace-workflow-config                           # the paper's real-data reproduction
#
# results/table1.csv is the final target: asking for it builds every table and figure.

from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow/config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/mining.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"


rule all:
    default_target: True
    input:
        "results/table1.csv",
