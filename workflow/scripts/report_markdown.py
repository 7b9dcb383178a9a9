"""Write results/report.md: every table and figure with a line of explanation, and the run's
configuration."""

from quari.reporting.report import write_report
from quari.runlog import log_to


def main(smk):
    write_report(smk.output[0], smk.input.tables, smk.input.figures, dict(smk.params.config),
                 smk.input.evaluations)


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
