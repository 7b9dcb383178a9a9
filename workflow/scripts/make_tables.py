"""Assemble results/table{1,2,3}.csv (long form) and their Markdown renderings."""

import pandas as pd

from quari.runlog import log_to
from quari.store import atomic_write_text
from quari.tables import build_table, evaluation_rows, load_evaluations, paper_only_rows, to_markdown

TITLES = {
    "1": "Table 1: ILIAS retrieval, backbone vs QuARI (1a) and static linear adaptation vs QuARI (1b)",
    "2": "Table 2: INQUIRE text-to-image retrieval",
    "3": "Table 3: re-ranking, ILIAS top-1k (3a) and INQUIRE-Rerank top-100 (3b)",
}
PAPER_TABLES = {"1": ["1a", "1b"], "2": ["2"], "3": ["3a", "3b"]}


def main(smk):
    rows = evaluation_rows(load_evaluations(smk.input.evaluations))
    paper = pd.read_csv(smk.input.paper)
    for name in ("1", "2", "3"):
        table = build_table(rows, paper, name)
        table["run_id"] = table["run_id"].fillna(smk.params.run_id)
        full = pd.concat([table, paper_only_rows(paper, PAPER_TABLES[name], table)], ignore_index=True)
        atomic_write_text(smk.output[f"table{name}"], full.to_csv(index=False))
        atomic_write_text(smk.output[f"table{name}_md"], to_markdown(full, TITLES[name]))


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
