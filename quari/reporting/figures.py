"""Figure 3 (t-SNE of backbone vs QuARI space) and Figure 4 (re-ranking cost vs accuracy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.path import Path  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from quari.store import l2_normalize  # noqa: E402
from quari.reporting.tables import row_label, row_name  # noqa: E402


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


@dataclass(frozen=True)
class _LabelStyle:
    """How one series of Figure 4 is drawn and labelled."""

    color: str         # marker colour
    marker: str        # matplotlib marker
    size: float        # marker area in points^2 (scatter's ``s``)
    alpha: float       # marker opacity
    fontsize: float    # label size in points
    text_color: str    # label colour (leader lines use it too)
    legend: str        # the series' legend entry


#: the paper's points, faint grey squares, and the harness's measured points, red discs
_PAPER_STYLE = _LabelStyle(color="0.6", marker="s", size=30, alpha=0.35, fontsize=6,
                           text_color="0.45", legend="paper (H100, real data)")
_MEASURED_STYLE = _LabelStyle(color="tab:red", marker="o", size=40, alpha=1.0, fontsize=8,
                              text_color="black", legend="measured")


@dataclass(frozen=True)
class _LabelOffset:
    """One place a label may go: its anchor's offset from the point, how the text hangs off it."""

    dx: float    # points, positive to the right
    dy: float    # points, positive upwards
    ha: str      # horizontal alignment of the text at the anchor
    va: str      # vertical alignment of the text at the anchor
    leader: bool  # far enough from the point to need a line back to it


@dataclass(frozen=True)
class _LabelLayout:
    """Knobs of the Figure 4 label placer (lengths in points)."""

    gap: float = 2.0              # space between a marker's edge and its own label
    far_rings: tuple[float, ...] = (10.0, 18.0, 28.0, 42.0, 60.0, 85.0)  # leader-line distances
    far_angles: int = 24          # directions tried on every far ring
    pad: float = 1.0              # clear space kept around every label
    clearance: float = 2.0        # clear space kept between a leader-line label and other markers
    merge_distance: float = 0.8   # points closer than this many marker diameters share a label
    # where no place is free, what a collision costs relative to covering a marker (per pixel^2):
    outside_weight: float = 100.0  # leaving the axes (onto the ticks, or off the figure)
    overlap_weight: float = 5.0    # covering another label or the legend: text becomes unreadable
    crossing_weight: float = 0.2   # per line crossed, times the label's area: a line reads through


def _direction_offset(ux: float, uy: float, distance: float, leader: bool) -> _LabelOffset:
    """The offset ``distance`` points along unit vector (ux, uy), the text hanging away from the
    point so that its nearest edge (or corner) is that far from it."""
    ha = "left" if ux > 0.25 else "right" if ux < -0.25 else "center"
    va = "bottom" if uy > 0.25 else "top" if uy < -0.25 else "center"
    return _LabelOffset(distance * ux, distance * uy, ha, va, leader)


def _label_offsets(radius: float, layout: _LabelLayout) -> list[_LabelOffset]:
    """Candidate label places for a marker of ``radius`` points, best first: right, left, above,
    below, the four diagonals, then rings further out (with a leader line), nearest ring first
    and, on a ring, the most horizontal directions first (labels are wide, so they stack)."""
    near = radius + layout.gap
    diag = np.sqrt(0.5)
    offsets = [_direction_offset(ux, uy, near, leader=False)
               for ux, uy in ((1, 0), (-1, 0), (0, 1), (0, -1),
                              (diag, diag), (diag, -diag), (-diag, diag), (-diag, -diag))]
    angles = 2 * np.pi * np.arange(layout.far_angles) / layout.far_angles
    # most horizontal first, then right before left, then above before below
    angles = sorted(angles, key=lambda a: (round(abs(np.sin(a)), 6), np.cos(a) < 0, np.sin(a) < 0))
    for ring in layout.far_rings:
        offsets += [_direction_offset(float(np.cos(a)), float(np.sin(a)), radius + ring,
                                      leader=True) for a in angles]
    return offsets


_ALIGN_FRACTION = {"left": 0.0, "bottom": 0.0, "center": 0.5, "right": 1.0, "top": 1.0}


def _offset_box(anchor: np.ndarray, offset: _LabelOffset, size: np.ndarray,
                px_per_pt: float) -> np.ndarray:
    """The label's display box [x0, y0, x1, y1] (pixels) for a point at ``anchor`` (pixels)."""
    x0 = anchor[0] + offset.dx * px_per_pt - _ALIGN_FRACTION[offset.ha] * size[0]
    y0 = anchor[1] + offset.dy * px_per_pt - _ALIGN_FRACTION[offset.va] * size[1]
    return np.array([x0, y0, x0 + size[0], y0 + size[1]])


def _leader_end(offset: _LabelOffset) -> tuple[float, float]:
    """Where on its label (fractions of the box, from the lower left) a leader line attaches: the
    edge or corner facing the point."""
    return _ALIGN_FRACTION[offset.ha], _ALIGN_FRACTION[offset.va]


def _overlap_areas(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Area of the intersection of ``box`` with each row of ``boxes`` (all [x0, y0, x1, y1])."""
    if len(boxes) == 0:
        return np.zeros(0)
    w = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    h = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _segment_crosses_box(start: np.ndarray, end: np.ndarray, box: np.ndarray) -> bool:
    """Whether the segment start-end passes through the rectangle [x0, y0, x1, y1]."""
    return bool(Path(np.array([start, end])).intersects_bbox(Bbox.from_extents(*box), filled=True))


def _segments_cross(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two segments (start, end) cross (touching ends count)."""
    return bool(Path(np.array(a)).intersects_path(Path(np.array(b)), filled=False))


def _coincident_groups(anchors: np.ndarray, distance: float) -> list[list[int]]:
    """Indices of points closer than ``distance`` pixels, chained (single linkage), each group in
    input order and the groups ordered by their first member."""
    group = list(range(len(anchors)))
    for i in range(len(anchors)):
        for j in range(i):
            if np.hypot(*(anchors[i] - anchors[j])) < distance and group[i] != group[j]:
                old, new = max(group[i], group[j]), min(group[i], group[j])
                group = [new if g == old else g for g in group]
    return [[i for i in range(len(anchors)) if group[i] == g] for g in sorted(set(group))]


@dataclass
class _PendingLabel:
    """One label to place: its text, the point(s) it names and the style of their series."""

    text: str
    anchor: np.ndarray  # display pixels of the point (the centroid of a shared label's points)
    radius: float       # points from the anchor to the outer edge of its marker(s)
    markers: list[int]  # the named points, as rows of the axes' marker list
    style: _LabelStyle


def _pending_labels(ax, frame: pd.DataFrame, style: _LabelStyle, first_marker: int,
                    layout: _LabelLayout) -> list[_PendingLabel]:
    """The labels of one series, whose points are markers ``first_marker`` onwards: points whose
    markers (almost) coincide share one label, their names joined by " / " in the frame's order."""
    if frame.empty:
        return []
    px_per_pt = ax.figure.dpi / 72.0
    marker_radius = np.sqrt(style.size) / 2
    anchors = ax.transData.transform(frame[["ms", "accuracy"]].to_numpy(dtype=float))
    names = (list(frame["label"]) if "label" in frame
             else [row_label(m) for m in frame["method"]])
    labels = []
    merge_px = layout.merge_distance * 2 * marker_radius * px_per_pt
    for members in _coincident_groups(anchors, merge_px):
        centre = anchors[members].mean(axis=0)
        spread = max(np.hypot(*(anchors[i] - centre)) for i in members) / px_per_pt
        labels.append(_PendingLabel(" / ".join(names[i] for i in members), centre,
                                    marker_radius + spread, [first_marker + i for i in members],
                                    style))
    return labels


@dataclass
class _LabelObstacles:
    """What a new label must keep clear of, in display pixels ([x0, y0, x1, y1] boxes)."""

    inside: np.ndarray     # the axes' area, which labels must stay within
    markers: np.ndarray    # [M, 4] every point's marker
    fixed: np.ndarray      # [F, 4] other fixed things: the legend
    labels: np.ndarray     # [L, 4] labels placed so far
    leaders: list[tuple[np.ndarray, np.ndarray]]  # leader lines placed so far (start, end)


def _label_cost(box: np.ndarray, leader: tuple[np.ndarray, np.ndarray] | None, own: list[int],
                near_distance: float, obstacles: _LabelObstacles, layout: _LabelLayout,
                px_per_pt: float) -> float:
    """How badly a label at ``box`` (with its leader line, if any) collides, in weighted pixels^2.

    Counts the area outside the axes, the area over placed labels (kept ``layout.pad`` apart) or
    the legend, the area over other points' markers, and a share of the label's area for every
    crossing of a leader line with a label, a marker or another leader. Markers are kept
    ``near_distance`` (how far a label beside its own point sits from it) away from a label
    without a leader, ``layout.clearance`` from one with a leader. Zero when the place is free.
    """
    area = float(np.prod(box[2:] - box[:2]))
    pad = layout.pad * px_per_pt
    # a label beside its point must be nearer to it than to any other point, or it names the
    # wrong one; a label with a leader line only needs some air
    clearance = (layout.clearance if leader is not None else near_distance) * px_per_pt
    others = np.delete(obstacles.markers, own, axis=0)
    grown = others + np.array([-clearance, -clearance, clearance, clearance])
    padded = box + np.array([-pad, -pad, pad, pad])
    outside = max(0.0, area - _overlap_areas(box, obstacles.inside[None])[0])
    covered = (_overlap_areas(padded, obstacles.labels).sum()
               + _overlap_areas(box, obstacles.fixed).sum())
    crossings = sum(_segment_crosses_box(*line, padded) for line in obstacles.leaders)
    if leader is not None:
        crossings += sum(_segment_crosses_box(*leader, other)
                         for other in np.vstack([obstacles.labels, others, obstacles.fixed]))
        crossings += sum(_segments_cross(leader, line) for line in obstacles.leaders)
    return (layout.outside_weight * outside + layout.overlap_weight * covered
            + _overlap_areas(box, grown).sum() + layout.crossing_weight * crossings * area)


def _place_point_labels(ax, series: list[tuple[pd.DataFrame, _LabelStyle]], renderer,
                        layout: _LabelLayout = _LabelLayout()) -> list:
    """Label every point of ``series`` (placed in that order, points in frame order) so that no
    label overlaps another, a marker or the legend, or leaves the axes.

    Greedy and deterministic: each label takes the first of :func:`_label_offsets` that is free
    (see :func:`_label_cost`; far ones get a thin leader line that must cross no label, marker or
    other leader), or the least-colliding one where none is. Needs the axes' final position (lay
    the figure out and draw it first); returns the annotations.

    Why not adjustText: it pushes labels apart by iterated repulsion until a step limit, which
    does not guarantee that no label overlaps another or a marker where many points nearly
    coincide (Figure 4 stacks several re-rankers at one cost), nor keeps leader lines from
    crossing labels; a search over candidate places does whenever a free place exists, which the
    tests check, and the figure stays the same from run to run without another pinned package.
    """
    px_per_pt = ax.figure.dpi / 72.0
    frame_box = ax.get_window_extent(renderer)
    markers = []
    for frame, style in series:
        half = np.sqrt(style.size) / 2 * px_per_pt
        for x, y in ax.transData.transform(frame[["ms", "accuracy"]].to_numpy(dtype=float)):
            markers.append([x - half, y - half, x + half, y + half])
    legend = ax.get_legend()
    fixed = [legend.get_window_extent(renderer).extents] if legend is not None else []
    obstacles = _LabelObstacles(
        inside=np.array([frame_box.x0 + 1, frame_box.y0 + 1, frame_box.x1 - 1, frame_box.y1 - 1]),
        markers=np.array(markers, dtype=float).reshape(-1, 4),
        fixed=np.array(fixed, dtype=float).reshape(-1, 4), labels=np.zeros((0, 4)), leaders=[])
    pending, first_marker = [], 0
    for frame, style in series:
        pending += _pending_labels(ax, frame, style, first_marker, layout)
        first_marker += len(frame)
    probe = Text(0, 0, "")  # measures each label's size with the figure's own renderer
    probe.set_figure(ax.figure)
    annotations = []
    for label in pending:
        probe.set_text(label.text)
        probe.set_fontsize(label.style.fontsize)
        size = np.array(probe.get_window_extent(renderer).size)
        best, best_cost, best_box, best_leader = None, np.inf, None, None
        for offset in _label_offsets(label.radius, layout):
            box = _offset_box(label.anchor, offset, size, px_per_pt)
            leader = ((label.anchor, box[:2] + np.array(_leader_end(offset)) * size)
                      if offset.leader else None)
            cost = _label_cost(box, leader, label.markers, label.radius + layout.gap, obstacles,
                               layout, px_per_pt)
            if cost < best_cost:
                best, best_cost, best_box, best_leader = offset, cost, box, leader
            if cost < 1e-6:  # free (the areas are floats: no exact zero to wait for)
                break
        obstacles.labels = np.vstack([obstacles.labels, best_box])
        if best_leader is not None:
            obstacles.leaders.append(best_leader)
        arrow = (dict(arrowstyle="-", lw=0.5, color=label.style.text_color, shrinkA=0,
                      shrinkB=label.radius, relpos=_leader_end(best)) if best.leader else None)
        annotations.append(ax.annotate(
            label.text, ax.transData.inverted().transform(label.anchor),
            xytext=(best.dx, best.dy), textcoords="offset points", ha=best.ha, va=best.va,
            fontsize=label.style.fontsize, color=label.style.text_color, arrowprops=arrow))
    return annotations


def _freeze_legend(ax, renderer) -> None:
    """Pin a ``loc="best"`` legend where it was last drawn, so labels added later cannot move it."""
    legend = ax.get_legend()
    box = legend.get_window_extent(renderer)
    legend.set_loc(tuple(ax.transAxes.inverted().transform((box.x0, box.y0))))


#: Figure 4 is laid out at the resolution it is saved at: small text's hinted width changes with
#: the resolution (by up to 12 %), so labels measured at another one could touch once saved
FIGURE4_DPI = 150


def plot_cost_accuracy(measured: pd.DataFrame, paper: pd.DataFrame, caption: str):
    """Two panels: ILIAS (ms per 1k pairs vs mAP@1k) and INQUIRE (ms per 100 pairs vs mAP@50).

    ``measured`` columns: panel ("ilias"/"inquire"), method, ms, accuracy. ``paper``: the same
    columns from the paper's Figure 4, drawn faintly for comparison. Every point is labelled with
    its method, labels placed so that none overlaps another (see :func:`_place_point_labels`).
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=FIGURE4_DPI)
    panels = []
    for ax, panel, xlabel, ylabel in (
        (axes[0], "ilias", "ms per 1k image pairs (log)", "mAP@1k"),
        (axes[1], "inquire", "ms per 100 text-image pairs (log)", "mAP@50"),
    ):
        series = [(paper[paper["panel"] == panel], _PAPER_STYLE),
                  (measured[measured["panel"] == panel], _MEASURED_STYLE)]
        for frame, style in series:
            ax.scatter(frame["ms"], frame["accuracy"], c=style.color, alpha=style.alpha,
                       marker=style.marker, s=style.size, label=style.legend)
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.08)  # room for the labels of the outermost points
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("ILIAS re-ranking (top-1k)" if panel == "ilias" else "INQUIRE re-ranking (top-100)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        panels.append((ax, series[::-1]))  # measured labels placed first: nearest places
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.canvas.draw()  # final axes positions and legend places; a renderer to measure labels with
    renderer = fig.canvas.get_renderer()
    for ax, series in panels:
        _freeze_legend(ax, renderer)
        _place_point_labels(ax, series, renderer)
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
        method = row_name(ev, rerank=True)
        label = row_label(method, {ev["method"]: ev.get("label")})
        for panel, task, cost in (("ilias", "i2i", "ms_per_1k_pairs"),
                                  ("inquire", "t2i", "ms_per_100_pairs")):
            entries = ev["tasks"].get(task, {}) if ev["benchmark"] == panel else {}
            # the paper's INQUIRE points are full-pool scores (Table 3b): plot ours of that kind
            # where the evaluation has them (real INQUIRE-Rerank)
            result = entries.get("rerank_full_pool", entries.get("rerank"))
            if result is None:
                continue
            ap = next(v for k, v in result["metrics"].items() if k.startswith("mAP@"))
            rows.append({"panel": panel, "method": method, "label": label,
                         "ms": float(result[cost]), "accuracy": 100.0 * ap})
    return pd.DataFrame(rows, columns=["panel", "method", "label", "ms", "accuracy"])


def cost_accuracy_caption(hardware, data: str, backbone: str | Sequence[str]) -> str:
    """Figure 4's caption: names the hardware the times were taken on, which it must know, and
    the backbone (one name, or the (ILIAS, INQUIRE) panels' backbones)."""
    hardware = sorted(set(hardware))
    if not hardware:
        raise ValueError("Figure 4 needs the hardware its timings were taken on")
    kind = "synthetic world (embedded offline benchmark)" if data == "synthetic" else "real data"
    if not isinstance(backbone, str):
        ilias, inquire = backbone
        backbone = ilias if ilias == inquire else f"{ilias} (ILIAS), {inquire} (INQUIRE)"
    return (f"Timed on {', '.join(hardware)}; {kind}, backbone {backbone}; time of the method's "
            f"re-ranking only, shortlist given. Grey: the paper's points (one H100, real data).")
