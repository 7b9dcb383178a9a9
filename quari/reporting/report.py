"""``results/report.md``: one page gathering a run's tables and figures.

It says which run it is (run id), on what data (synthetic or real, in words no reader can miss),
on which hardware the timings were taken (read from the evaluation results), and with which
configuration; then every table (its Markdown rendering) and every figure (a relative image link),
each with one line saying what it shows. The workflow calls :func:`write_report`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from quari.store import atomic_write_text

log = logging.getLogger(__name__)

#: one line per table, keyed by file stem
TABLE_EXPLANATIONS = {
    "table1": "ILIAS search (mAP@1k, image-to-image and text-to-image): the frozen backbone "
              "against QuARI (1a), and ILIAS's static linear adaptation against QuARI (1b).",
    "table2": "INQUIRE text-to-image search over the whole pool: mAP@50, nDCG@50 and MRR.",
    "table3": "Re-ranking a fixed shortlist: the backbone's ILIAS top-1k (3a) and INQUIRE's "
              "top-100 (3b; on real data scored as the paper does, with all of a query's "
              "positives in the pool, and in INQUIRE-Rerank's official way), with the time of "
              "each re-ranker per 1k (ILIAS) or 100 (INQUIRE) pairs.",
    "table4": "Ablations: QuARI with one refinement step, without semi-positives, without noise, "
              "and a backbone projection fine-tuned on QuARI's data instead of QuARI.",
}

#: one line per figure, keyed by file stem
FIGURE_EXPLANATIONS = {
    "fig3_tsne": "Figure 3: t-SNE of one ILIAS image query and one INQUIRE text query among "
                 "shared distractors, backbone space beside QuARI's space; positives in red.",
    "fig4_cost_accuracy": "Figure 4: re-ranking time (log x; ms per 1k image pairs for ILIAS, per "
                          "100 text-image pairs for INQUIRE) against accuracy; the paper's points "
                          "in grey.",
}

DATA_LABELS = {
    "synthetic": ("**Data: SYNTHETIC.** Every number comes from the embedded offline benchmark "
                  "(`quari/synthetic.py`), a generated retrieval world in the shapes of ILIAS and "
                  "INQUIRE. It tests the harness; it is not comparable with the paper, and no "
                  "synthetic row is compared with a paper value."),
    "real": ("**Data: REAL** (ILIAS, INQUIRE and the paper's training collections). Measured "
             "rows are shown beside the paper's values, with the difference."),
}


def hardware_of(evaluations: Iterable[dict]) -> list[str]:
    """The distinct machines the evaluations were timed on (their ``hardware``, else ``device``)."""
    return sorted({str(ev.get("hardware") or ev.get("device") or "unknown") for ev in evaluations})


def data_kind(config: dict, evaluations: Sequence[dict]) -> str:
    """The run's data kind; evaluations that disagree with the configuration are an error."""
    kind = config.get("data")
    if kind not in DATA_LABELS:
        raise ValueError(f"config key 'data' must be one of {sorted(DATA_LABELS)}, got {kind!r}")
    other = sorted({ev["data"] for ev in evaluations} - {kind})
    if other:
        raise ValueError(f"the configuration says data: {kind}, but evaluation results are {other}")
    return kind


def _demote(markdown: str) -> str:
    """Headings one level down, so a table's "# Title" sits under the report's title."""
    return "\n".join("#" + line if line.startswith("#") else line
                     for line in markdown.strip().splitlines())


def _link(path: Path, report_dir: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), report_dir.resolve())).as_posix()


def render_report(run_id: str, data: str, hardware: Sequence[str], config: dict,
                  tables: Sequence[tuple[str, str]], figures: Sequence[str | Path],
                  report_dir: str | Path) -> str:
    """The report's Markdown. ``tables`` are (name, Markdown rendering) pairs named like their
    files ("table1"); ``figures`` are image paths, linked relative to ``report_dir``."""
    if data not in DATA_LABELS:
        raise ValueError(f"data must be one of {sorted(DATA_LABELS)}, got {data!r}")
    report_dir = Path(report_dir)
    plain = json.loads(json.dumps(config, default=str))  # plain types for YAML
    lines = [f"# QuARI reproduction report: run `{run_id}`", "", DATA_LABELS[data], "",
             f"- run id: `{run_id}`",
             f"- data: {data}",
             f"- hardware (timings): {', '.join(hardware) if hardware else 'not recorded'}",
             f"- tables: {len(tables)}, figures: {len(figures)}", "",
             "## Tables", ""]
    for name, markdown in tables:
        lines += [f"**{name}.** {TABLE_EXPLANATIONS.get(name, 'A table of this run.')}", "",
                  _demote(_demote(markdown)), ""]
    lines += ["## Figures", ""]
    for figure in figures:
        stem = Path(figure).stem
        explanation = FIGURE_EXPLANATIONS.get(stem, "A figure of this run.")
        lines += [f"**{stem}.** {explanation}", "",
                  f"![{stem}]({_link(Path(figure), report_dir)})", ""]
    lines += ["## Configuration", "", "```yaml",
              yaml.safe_dump(plain, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(path: str | Path, tables: Sequence[str | Path], figures: Sequence[str | Path],
                 config: dict, evaluations: Sequence[str | Path]) -> str:
    """Write ``path`` (results/report.md) from the table Markdown files, figure files, the
    configuration used and the evaluation JSONs (hardware and data kind); returns the text."""
    path = Path(path)
    evs = []
    for p in evaluations:
        try:
            evs.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read evaluation result {p}: {err}") from None
    missing = [str(p) for p in [*tables, *figures] if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"report inputs missing: {', '.join(missing)}")
    table_texts = [(Path(t).stem, Path(t).read_text()) for t in tables]
    text = render_report(str(config.get("run_id", "")), data_kind(config, evs), hardware_of(evs),
                         config, table_texts, figures, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    log.info("wrote %s: %d tables, %d figures", path, len(tables), len(figures))
    return text
