"""Assemble results/table{1,2,3,4}.csv (long form) with their Markdown renderings."""

import pandas as pd

from quari.runlog import log_to
from quari.reporting.tables import TABLES, evaluation_rows, load_evaluations, write_table


def main(smk):
    rows = evaluation_rows(load_evaluations(smk.input.evaluations))
    paper = pd.read_csv(smk.input.paper)
    for name in TABLES:
        write_table(rows, paper, name, smk.output[f"table{name}"], smk.output[f"table{name}_md"],
                    smk.params.run_id)


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
