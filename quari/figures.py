"""Figure 3 (t-SNE of backbone vs QuARI space) and Figure 4 (re-ranking cost vs accuracy)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from quari.store import l2_normalize  # noqa: E402
from quari.tables import DISPLAY_NAME, PAPER_METHOD  # noqa: E402


@dataclass
class TsnePanel:
    """One query's neighbourhood: the query, its positives and shared distractors, in two spaces."""

    title: str
    backbone_points: np.ndarray  # [1 + P + D, E], row 0 the query
    adapted_points: np.ndarray   # the same rows in the query's adapted space
    num_positives: int


def map_rows(query: np.ndarray, left: np.ndarray, right: np.ndarray, scale: float, anchor: float,
             rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query's adapted space: (q', normalised m(d) for every row) with
    m(d) = anchor * d + scale * (d @ left) @ right.T, as QuARI scores them."""
    mapped = anchor * rows + scale * (rows @ left) @ right.T
    return l2_normalize(query[None])[0], l2_normalize(mapped)


def tsne_2d(points: np.ndarray, seed: int) -> np.ndarray:
    perplexity = float(min(30, max(5, (len(points) - 1) / 4)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed,
                metric="cosine").fit_transform(np.asarray(points, dtype=np.float32))


def plot_tsne(panels: list[TsnePanel], seed: int, caption: str):
    """A grid: one row per query, backbone space left, QuARI space right."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 4.2 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        for col, (space, pts) in enumerate((("backbone", panel.backbone_points),
                                            ("QuARI", panel.adapted_points))):
            xy = tsne_2d(pts, seed)
            ax = axes[row, col]
            p = panel.num_positives
            ax.scatter(xy[1 + p:, 0], xy[1 + p:, 1], s=3, c="0.75", label="distractors", rasterized=True)
            ax.scatter(xy[1:1 + p, 0], xy[1:1 + p, 1], s=14, c="tab:red", label="positives")
            ax.scatter(xy[0, 0], xy[0, 1], s=120, marker="*", c="tab:blue", edgecolors="k",
                       label="query")
            ax.set_title(f"{panel.title}: {space} space", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].legend(loc="lower left", fontsize=7, framealpha=0.8)
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def plot_cost_accuracy(measured: pd.DataFrame, paper: pd.DataFrame, caption: str):
    """Two panels: ILIAS (ms per 1k pairs vs mAP@1k) and INQUIRE (ms per 100 pairs vs mAP@50).

    ``measured`` columns: panel ("ilias"/"inquire"), method, ms, accuracy. ``paper``: the same
    columns from the paper's Figure 4, drawn faintly for comparison.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, panel, xlabel, ylabel in (
        (axes[0], "ilias", "ms per 1k image pairs (log)", "mAP@1k"),
        (axes[1], "inquire", "ms per 100 text-image pairs (log)", "mAP@50"),
    ):
        ref = paper[paper["panel"] == panel]
        ax.scatter(ref["ms"], ref["accuracy"], c="0.6", alpha=0.35, marker="s", s=30,
                   label="paper (H100, real data)")
        for _, r in ref.iterrows():
            ax.annotate(DISPLAY_NAME.get(r["method"], r["method"]), (r["ms"], r["accuracy"]),
                        fontsize=6, color="0.55",
                        xytext=(3, -8), textcoords="offset points")
        ours = measured[measured["panel"] == panel]
        ax.scatter(ours["ms"], ours["accuracy"], c="tab:red", s=40, label="measured")
        for _, r in ours.iterrows():
            ax.annotate(DISPLAY_NAME.get(r["method"], r["method"]), (r["ms"], r["accuracy"]),
                        fontsize=8,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("ILIAS re-ranking (top-1k)" if panel == "ilias" else "INQUIRE re-ranking (top-100)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def paper_figure4_points(paper_numbers: pd.DataFrame) -> pd.DataFrame:
    """The paper's Figure 4 points (method, ms, accuracy) from ``paper-numbers.csv``."""
    rows = []
    for table, panel in (("fig4-left", "ilias"), ("fig4-right", "inquire")):
        part = paper_numbers[paper_numbers["table"] == table]
        cost = part[part["metric"].str.startswith("ms_per")].set_index("method")["value"]
        acc = part[~part["metric"].str.startswith("ms_per")].set_index("method")["value"]
        for method in cost.index.intersection(acc.index):
            rows.append({"panel": panel, "method": method, "ms": float(cost[method]),
                         "accuracy": float(acc[method])})
    return pd.DataFrame(rows, columns=["panel", "method", "ms", "accuracy"])


def measured_cost_accuracy(evaluations) -> pd.DataFrame:
    """Figure 4's measured points (panel, method, ms, accuracy) from evaluation results: ILIAS
    image-to-image re-ranking (ms per 1k pairs, mAP@k x100) and INQUIRE re-ranking (ms per 100
    pairs, mAP@50 x100). Methods are named as the tables name them (the backbone's re-ranking is
    the initial ranking)."""
    rows = []
    for ev in evaluations:
        renamed = PAPER_METHOD.get(ev["method_type"])
        method = renamed[1] if renamed else ev["method"]
        for panel, task, cost in (("ilias", "i2i", "ms_per_1k_pairs"),
                                  ("inquire", "t2i", "ms_per_100_pairs")):
            result = ev["tasks"].get(task, {}).get("rerank") if ev["benchmark"] == panel else None
            if result is None:
                continue
            ap = next(v for k, v in result["metrics"].items() if k.startswith("mAP@"))
            rows.append({"panel": panel, "method": method, "ms": float(result[cost]),
                         "accuracy": 100.0 * ap})
    return pd.DataFrame(rows, columns=["panel", "method", "ms", "accuracy"])


def cost_accuracy_caption(hardware, data: str, backbone: str) -> str:
    """Figure 4's caption: names the hardware the times were taken on, which it must know."""
    hardware = sorted(set(hardware))
    if not hardware:
        raise ValueError("Figure 4 needs the hardware its timings were taken on")
    kind = "synthetic world (embedded offline benchmark)" if data == "synthetic" else "real data"
    return (f"Timed on {', '.join(hardware)}; {kind}, backbone {backbone}; time of the method's "
            f"re-ranking only, shortlist given. Grey: the paper's points (one H100, real data).")
