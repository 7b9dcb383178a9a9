"""Figures 3 and 4: what they draw, checked on small inputs."""

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from quari import scoring
from quari.reporting.figures import (TsnePanel, _coincident_groups, _LabelLayout, _label_offsets,
                           _offset_box, cost_accuracy_caption, map_rows, measured_cost_accuracy,
                           paper_figure4_points, plot_cost_accuracy, plot_tsne)
from quari.reporting.tables import row_label
from quari.transform import QueryTransform

from tests.builders import PAPER



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
        {"panel": "ilias", "method": "initial_ranking", "label": "initial ranking", "ms": 3.0,
         "accuracy": 20.0},
        {"panel": "inquire", "method": "quari", "label": "QuARI", "ms": 0.8, "accuracy": 50.0}]


def test_inquire_rerank_points_use_the_paper_comparable_full_pool_scoring():
    ev = rerank_eval("quari", "quari", "inquire", 0.9, 8.0)  # official Rerank AP: 90
    ev["tasks"]["t2i"]["rerank_full_pool"] = {"metrics": {"mAP@50": 0.4}, "ms_per_1k_pairs": 8.0,
                                              "ms_per_100_pairs": 0.8}
    got = measured_cost_accuracy([ev])
    assert got.to_dict("records") == [
        {"panel": "inquire", "method": "quari", "label": "QuARI", "ms": 0.8, "accuracy": 40.0}]


def test_caption_names_the_hardware():
    caption = cost_accuracy_caption(["NVIDIA H100 80GB HBM3"], "real", "siglip-vit-l16@384")
    assert "NVIDIA H100 80GB HBM3" in caption and "real data" in caption
    both = cost_accuracy_caption(["CPU"], "real", ("siglip-vit-l16@384", "siglip2-vit-l16@512"))
    assert "siglip-vit-l16@384 (ILIAS), siglip2-vit-l16@512 (INQUIRE)" in both
    assert "backbone syn-b;" in cost_accuracy_caption(["CPU"], "synthetic", ("syn-b", "syn-b"))
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


# --- Figure 4's label placement ---------------------------------------------------------------

#: ten measured methods crowded among the paper's alpha-QE / Chamfer points (ms 2-6, mAP 18-26),
#: spaced as the measured points of an offline run are
CLUSTER = pd.DataFrame(
    [("ilias", m, ms, acc) for m, ms, acc in (
        ("initial_ranking", 2.2, 21.0), ("alpha_qe1", 2.35, 20.3), ("alpha_qe2", 2.8, 20.5),
        ("alpha_qe5", 1.8, 19.7), ("quari", 5.0, 24.2), ("quari_no_noise", 2.6, 23.8),
        ("quari_no_iterative_refinement", 2.9, 24.8), ("linear_adaptation", 5.9, 22.0),
        ("finetuned_backbone", 3.9, 21.4), ("oracle", 2.1, 25.8))],
    columns=["panel", "method", "ms", "accuracy"])


def label_boxes(fig, ax):
    """Display boxes of the axes' labels, text only (an annotation's own extent adds its line)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [Text.get_window_extent(t, renderer) for t in ax.texts]


def test_figure4_labels_of_a_cluster_do_not_overlap():
    fig = plot_cost_accuracy(CLUSTER, paper_figure4_points(PAPER), "Timed on CPU X")
    ax = fig.axes[0]
    boxes = label_boxes(fig, ax)
    names = [name for t in ax.texts for name in t.get_text().split(" / ")]
    expected = [row_label(m) for m in CLUSTER["method"]]
    paper_methods = PAPER[PAPER["table"] == "fig4-left"]["method"].unique()
    expected += [row_label(m) for m in paper_methods]
    assert sorted(names) == sorted(expected)  # every point named, once
    for i, a in enumerate(boxes):
        assert fig.bbox.contains(a.x0, a.y0) and fig.bbox.contains(a.x1, a.y1)
        assert ax.bbox.contains(a.x0, a.y0) and ax.bbox.contains(a.x1, a.y1)
        assert not a.overlaps(ax.get_legend().get_window_extent())
        for b in boxes[:i]:
            assert not a.overlaps(b), (ax.texts[i].get_text(), b)


def test_cluster_is_crowded_enough_to_need_placement():
    """The test above can fail: labels at one fixed offset (the old layout) overlap there."""
    fig = plot_cost_accuracy(CLUSTER, paper_figure4_points(PAPER), "Timed on CPU X")
    ax = fig.axes[0]
    for t in ax.texts:
        t.xyann, t.arrowprops, t.arrow_patch = (3, 3), None, None
        t.set_ha("left")
        t.set_va("bottom")
    boxes = label_boxes(fig, ax)
    assert any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[:i])


def test_figure4_labels_keep_off_the_markers():
    points = paper_figure4_points(PAPER)
    fig = plot_cost_accuracy(CLUSTER, points[points["panel"] == "inquire"], "x")
    ax = fig.axes[0]
    boxes = label_boxes(fig, ax)
    radius = np.sqrt(40) / 2 * fig.dpi / 72  # measured markers: s=40 points^2
    centres = ax.transData.transform(CLUSTER[["ms", "accuracy"]].to_numpy())
    for x, y in centres:
        marker = Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
        assert not any(marker.overlaps(b) for b in boxes)


def test_label_without_leader_is_nearest_its_own_point():
    """A label set beside its point (no leader line) must not sit closer to another point."""
    fig = plot_cost_accuracy(CLUSTER, paper_figure4_points(PAPER), "x")
    ax = fig.axes[0]
    boxes = label_boxes(fig, ax)
    centres = np.vstack([ax.transData.transform(c.get_offsets()) for c in ax.collections])
    beside = 0
    for t, box in zip(ax.texts, boxes):
        if t.arrow_patch is not None or " / " in t.get_text():  # leader, or a shared label
            continue
        beside += 1
        own = ax.transData.transform(t.xy)
        zero = np.zeros(len(centres))
        dx = np.maximum.reduce([box.x0 - centres[:, 0], centres[:, 0] - box.x1, zero])
        dy = np.maximum.reduce([box.y0 - centres[:, 1], centres[:, 1] - box.y1, zero])
        nearest = centres[np.argmin(np.hypot(dx, dy))]  # the point nearest the label's box
        assert np.allclose(nearest, own), t.get_text()
    assert beside >= 5


def test_coincident_points_share_one_label():
    same = pd.DataFrame([("inquire", "alpha_qe1", 0.2, 60.0), ("inquire", "alpha_qe2", 0.2, 60.0),
                         ("inquire", "quari", 3.0, 70.0)], columns=CLUSTER.columns)
    fig = plot_cost_accuracy(same, paper_figure4_points(PAPER), "x")
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert "α-QE (n=1) / α-QE (n=2)" in texts and "QuARI" in texts
    assert not any("α-QE (n=1)" in t and t != "α-QE (n=1) / α-QE (n=2)" for t in texts)


def test_figure4_labels_are_deterministic():
    def placements():
        fig = plot_cost_accuracy(CLUSTER, paper_figure4_points(PAPER), "x")
        return [(t.get_text(), tuple(t.xyann), t.get_ha(), t.get_va()) for t in fig.axes[0].texts]
    assert placements() == placements()


def test_label_candidates_start_clear_of_the_marker():
    """Every candidate box keeps at least radius + gap between the point and the label."""
    layout = _LabelLayout()
    offsets = _label_offsets(4.0, layout)
    assert [(o.ha, o.va) for o in offsets[:4]] == [("left", "center"), ("right", "center"),
                                                   ("center", "bottom"), ("center", "top")]
    assert not any(o.leader for o in offsets[:8]) and all(o.leader for o in offsets[8:])
    size = np.array([50.0, 10.0])
    for o in offsets:
        x0, y0, x1, y1 = _offset_box(np.zeros(2), o, size, px_per_pt=1.0)
        gap = np.hypot(max(x0, 0, -x1), max(y0, 0, -y1))  # distance from the point to the box
        assert gap >= 4.0 + layout.gap - 1e-9


def test_coincident_groups_chain_close_points():
    anchors = np.array([[0.0, 0.0], [50.0, 0.0], [4.0, 0.0], [8.0, 0.0], [53.0, 3.0]])
    assert _coincident_groups(anchors, distance=5.0) == [[0, 2, 3], [1, 4]]


def test_crowded_figure4_still_labels_every_point():
    """Where no place is free (thirty points on top of each other) every point still gets one."""
    rng = np.random.default_rng(0)
    crowd = pd.DataFrame({"panel": "ilias", "method": [f"method {i}" for i in range(30)],
                          "ms": 3 + rng.random(30), "accuracy": 20 + rng.random(30)})
    wide = pd.DataFrame([("ilias", "far", 1e3, 90.0), ("ilias", "near", 1e-1, 0.0),
                         ("inquire", "other panel", 1.0, 50.0)],
                        columns=CLUSTER.columns)
    fig = plot_cost_accuracy(crowd, wide, "x")
    names = [n for t in fig.axes[0].texts for n in t.get_text().split(" / ")]
    assert sorted(names) == sorted(list(crowd["method"]) + ["far", "near"])
    assert [t.get_text() for t in fig.axes[1].texts] == ["other panel"]
