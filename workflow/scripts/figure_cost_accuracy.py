"""Figure 4: re-ranking cost (harness-measured) against accuracy, the paper's points drawn faintly."""

import pandas as pd

from quari.reporting.figures import (cost_accuracy_caption, measured_cost_accuracy, paper_figure4_points,
                           plot_cost_accuracy)
from quari.reporting.report import hardware_of
from quari.runlog import log_to
from quari.reporting.tables import load_evaluations


def main(smk):
    evaluations = load_evaluations(smk.input.evaluations)
    caption = cost_accuracy_caption(hardware_of(evaluations), smk.params.data, smk.params.backbones)
    fig = plot_cost_accuracy(measured_cost_accuracy(evaluations),
                             paper_figure4_points(pd.read_csv(smk.input.paper)), caption)
    for out in (smk.output.png, smk.output.pdf):
        fig.savefig(out, dpi="figure")  # the resolution the labels were placed at


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
