"""Figure 4: re-ranking cost (harness-measured) against accuracy, the paper's points drawn faintly."""

import pandas as pd

from quari.figures import paper_figure4_points, plot_cost_accuracy
from quari.runlog import log_to
from quari.tables import load_evaluations


def average_precision(result):
    """The mAP@k entry of a result's metrics, whatever its k."""
    return next(v for k, v in result["metrics"].items() if k.startswith("mAP@"))


def main(smk):
    rows, hardware, backbone = [], set(), None
    for ev in load_evaluations(smk.input.evaluations):
        backbone = ev["backbone"]
        hardware.add(ev.get("hardware", ev["device"]))
        if ev["benchmark"] == "ilias" and "i2i" in ev["tasks"]:
            r = ev["tasks"]["i2i"]["rerank"]
            rows.append({"panel": "ilias", "method": ev["method"], "ms": r["ms_per_1k_pairs"],
                         "accuracy": 100 * average_precision(r)})
        if ev["benchmark"] == "inquire":
            r = ev["tasks"]["t2i"]["rerank"]
            rows.append({"panel": "inquire", "method": ev["method"], "ms": r["ms_per_100_pairs"],
                         "accuracy": 100 * average_precision(r)})
    measured = pd.DataFrame(rows)
    kind = "synthetic world" if smk.params.data == "synthetic" else "real data"
    caption = (f"Measured on {', '.join(sorted(hardware))}; {kind}, backbone {backbone}; "
               f"time of the method's re-ranking only, shortlist given. Grey: the paper's points (H100).")
    fig = plot_cost_accuracy(measured, paper_figure4_points(pd.read_csv(smk.input.paper)), caption)
    for out in (smk.output.png, smk.output.pdf):
        fig.savefig(out, dpi=150)


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
