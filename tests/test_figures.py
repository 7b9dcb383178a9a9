"""Figures 3 and 4: what they draw, checked on small inputs."""

import numpy as np
import pandas as pd
import pytest
import torch

from quari import scoring
from quari.figures import (TsnePanel, cost_accuracy_caption, map_rows, measured_cost_accuracy,
                           paper_figure4_points, plot_cost_accuracy, plot_tsne)
from quari.transform import QueryTransform

from .conftest import ROOT

PAPER = pd.read_csv(ROOT / "workflow/resources/paper_numbers.csv")


def rerank_eval(method, method_type, benchmark, ap, ms):
    task = "i2i" if benchmark == "ilias" else "t2i"
    key = "mAP@1k" if benchmark == "ilias" else "mAP@50"
    return {"benchmark": benchmark, "method": method, "method_type": method_type,
            "tasks": {task: {"rerank": {"metrics": {key: ap}, "ms_per_1k_pairs": ms,
                                        "ms_per_100_pairs": ms / 10}}}}


def test_paper_points_of_both_panels():
    points = paper_figure4_points(PAPER)
    left, right = points[points["panel"] == "ilias"], points[points["panel"] == "inquire"]
    assert len(left) == 7 and len(right) == 9
    quari = left[left["method"] == "quari"].iloc[0]
    assert (quari["ms"], quari["accuracy"]) == (4.2, 29.1)
    assert right[right["method"] == "vila_40b"].iloc[0]["ms"] == 28000


def test_measured_points_use_each_panels_cost_unit():
    evs = [rerank_eval("identity", "identity", "ilias", 0.2, 3.0),
           rerank_eval("quari", "quari", "inquire", 0.5, 8.0)]
    got = measured_cost_accuracy(evs)
    assert got.to_dict("records") == [
        {"panel": "ilias", "method": "initial_ranking", "ms": 3.0, "accuracy": 20.0},
        {"panel": "inquire", "method": "quari", "ms": 0.8, "accuracy": 50.0}]


def test_caption_names_the_hardware():
    caption = cost_accuracy_caption(["NVIDIA H100 80GB HBM3"], "real", "siglip-vit-l16@384")
    assert "NVIDIA H100 80GB HBM3" in caption and "real data" in caption
    with pytest.raises(ValueError, match="hardware"):
        cost_accuracy_caption([], "synthetic", "syn")


def test_figure4_layout():
    measured = measured_cost_accuracy([rerank_eval("quari", "quari", "ilias", 0.3, 5.0),
                                       rerank_eval("quari", "quari", "inquire", 0.4, 30.0)])
    fig = plot_cost_accuracy(measured, paper_figure4_points(PAPER), "Timed on CPU X")
    left, right = fig.axes
    assert left.get_xscale() == right.get_xscale() == "log"
    assert "1k image pairs" in left.get_xlabel() and left.get_ylabel() == "mAP@1k"
    assert "100 text-image pairs" in right.get_xlabel() and right.get_ylabel() == "mAP@50"
    paper_pts, ours = left.collections[:2]
    assert paper_pts.get_alpha() < 1 and len(paper_pts.get_offsets()) == 7  # faint paper points
    assert np.allclose(ours.get_offsets(), [[5.0, 30.0]])
    assert any("CPU X" in t.get_text() for t in fig.texts)


def test_map_rows_is_what_quari_scores():
    """Cosine between q' and the mapped rows equals the factored scoring of the transform."""
    gen = torch.Generator().manual_seed(0)
    dim, rank = 12, 3
    q = torch.nn.functional.normalize(torch.randn(1, dim, generator=gen), dim=-1)
    t = QueryTransform(query=q, left=torch.randn(1, dim, rank, generator=gen),
                       right=torch.randn(1, dim, rank, generator=gen), scale=0.8, anchor=1.0)
    rows = torch.randn(20, dim, generator=gen)
    q_adapted, mapped = map_rows(q[0].numpy(), t.left[0].numpy(), t.right[0].numpy(), t.scale,
                                 t.anchor, rows.numpy())
    np.testing.assert_allclose(mapped @ q_adapted, scoring.scores(t, rows)[0].numpy(), atol=1e-5)


def test_figure3_layout():
    rng = np.random.default_rng(0)
    panels = [TsnePanel(title, rng.standard_normal((30, 8)), rng.standard_normal((30, 8)), 4)
              for title in ("ILIAS image query", "INQUIRE text query")]
    fig = plot_tsne(panels, seed=0, caption="20 shared distractors")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["ILIAS image query: backbone space", "ILIAS image query: QuARI space",
                      "INQUIRE text query: backbone space", "INQUIRE text query: QuARI space"]
    distractors, positives, query = fig.axes[0].collections
    assert len(positives.get_offsets()) == 4 and len(distractors.get_offsets()) == 25
    assert tuple(positives.get_facecolor()[0][:3]) != tuple(distractors.get_facecolor()[0][:3])
