"""Assemble the paper's tables (long form, ours beside the paper's numbers) from evaluation results.

Every evaluation result (one JSON per benchmark x backbone x method, written by the harness) is
flattened into rows; each table selects its rows, attaches the paper's value where the paper has
one (real data only: synthetic rows are labelled and never compared), and renders a Markdown view
laid out like the paper's table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from quari.evaluation import k_label

COLUMNS = ["table", "benchmark", "setting", "backbone", "method", "metric", "value", "paper_value",
           "delta", "shortlist", "ms_per_1k_pairs", "data", "run_id"]

#: our method type -> the paper's method name in search tables and in re-ranking tables
PAPER_NAME = {"identity": ("backbone", "initial_ranking")}


def size_label(n: int) -> str:
    """Gallery size as the paper writes it (5M, 100M), or the exact count below a million."""
    return f"{round(n / 1_000_000)}M" if n >= 1_000_000 else str(n)


#: our (benchmark, setting) -> the paper's wording of the same setting
PAPER_SETTING = {
    ("inquire", "t2i@5M"): "fullrank (not labelled in the paper; most likely)",
    ("inquire", "rerank top-100"): "rerank top-100 (INQUIRE-Rerank)",
}


def _scale(metric: str, value: float) -> float:
    """AP and nDCG are shown x100 as in the paper; MRR stays in [0, 1]."""
    return value if metric == "MRR" else 100.0 * value


def evaluation_rows(evaluations: Iterable[dict]) -> pd.DataFrame:
    """One row per (benchmark, task, mode, backbone, method, metric) from evaluation JSONs."""
    rows = []
    for ev in evaluations:
        for task, modes in ev["tasks"].items():
            for mode, res in modes.items():
                synthetic = ev["data"] == "synthetic"
                if mode == "search":
                    setting = f"{task}@{size_label(res['gallery_size'])}"
                elif ev["benchmark"] == "ilias":
                    setting = f"{task}@{size_label(ev['gallery_size'])} rerank top-{k_label(res['shortlist'])}"
                else:
                    setting = f"rerank top-{k_label(res['shortlist'])}"
                if not synthetic:
                    setting = PAPER_SETTING.get((ev["benchmark"], setting), setting)
                paper_method = ev["method"]
                if ev["method_type"] in PAPER_NAME:
                    paper_method = PAPER_NAME[ev["method_type"]][mode == "rerank"]
                for metric, value in res["metrics"].items():
                    rows.append({
                        "benchmark": ev["benchmark"] + (" (synthetic)" if synthetic else ""),
                        "task": task, "mode": mode, "setting": setting,
                        "backbone": ev["backbone"], "method": paper_method,
                        "metric": metric, "value": round(_scale(metric, value), 2),
                        "shortlist": res.get("shortlist", "all"),
                        "ms_per_1k_pairs": round(res["ms_per_1k_pairs"], 4),
                        "data": ev["data"], "run_id": ev["run_id"],
                    })
    return pd.DataFrame(rows)


def load_evaluations(paths: Iterable[str | Path]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def attach_paper_values(df: pd.DataFrame, paper: pd.DataFrame, tables: list[str]) -> pd.DataFrame:
    """Add ``paper_value`` and ``delta`` (ours - paper) on real rows the paper reports."""
    paper = paper[paper["table"].astype(str).isin(tables)]
    key = ["benchmark", "setting", "backbone", "method", "metric"]
    lookup = {tuple(r[k] for k in key): (r["table"], r["value"]) for _, r in paper.iterrows()}
    tables_col, values = [], []
    for _, r in df.iterrows():
        hit = lookup.get(tuple(r[k] for k in key)) if r["data"] == "real" else None
        tables_col.append(hit[0] if hit else tables[0])
        values.append(hit[1] if hit else None)
    df = df.copy()
    df["table"] = tables_col
    df["paper_value"] = pd.to_numeric(pd.Series(values, index=df.index), errors="coerce")
    df["delta"] = (df["value"] - df["paper_value"]).round(2)
    return df


def build_table(df: pd.DataFrame, paper: pd.DataFrame, name: str) -> pd.DataFrame:
    """Select one paper table's rows: "1" ILIAS search, "2" INQUIRE search, "3" re-ranking."""
    if name == "1":
        sel, tables = df[(df["mode"] == "search") & df["benchmark"].str.startswith("ilias")], ["1a", "1b"]
    elif name == "2":
        sel, tables = df[(df["mode"] == "search") & df["benchmark"].str.startswith("inquire")], ["2"]
    elif name == "3":
        sel = df[(df["mode"] == "rerank")
                 & ~(df["benchmark"].str.startswith("ilias") & (df["task"] != "i2i"))]
        tables = ["3a", "3b"]
    else:
        raise ValueError(f"unknown table {name!r}")
    out = attach_paper_values(sel, paper, tables)
    if name == "3":
        out["table"] = ["3a" if b.startswith("ilias") else "3b" for b in out["benchmark"]]
    if name == "1":
        out.loc[out["method"] == "linear_adaptation", "table"] = "1b"
    return out[COLUMNS].sort_values(["table", "benchmark", "backbone", "setting", "method", "metric"]
                                    ).reset_index(drop=True)


def paper_only_rows(paper: pd.DataFrame, tables: list[str], present: pd.DataFrame) -> pd.DataFrame:
    """Paper rows we did not measure (for completeness of the comparison), marked as reported."""
    key = ["benchmark", "setting", "backbone", "method", "metric"]
    have = {tuple(r[k] for k in key) for _, r in present.iterrows()}
    rows = []
    for _, r in paper[paper["table"].astype(str).isin(tables)].iterrows():
        if tuple(r[k] for k in key) not in have:
            rows.append({**{k: r[k] for k in key}, "table": r["table"], "value": None,
                         "paper_value": r["value"], "delta": None, "shortlist": None,
                         "ms_per_1k_pairs": None, "data": "paper (not run)", "run_id": None})
    return pd.DataFrame(rows, columns=COLUMNS)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    """A readable rendering: one line per (table, benchmark, backbone, method), one column per
    setting and metric, cells "ours (paper)"."""
    if table.empty:
        return f"# {title}\n\n(no rows)\n"
    t = table.copy()
    t["column"] = t["setting"] + " " + t["metric"]

    def cell(r):
        ours = "" if pd.isna(r["value"]) else f"{r['value']:.2f}".rstrip("0").rstrip(".")
        paper = "" if pd.isna(r["paper_value"]) else f" ({r['paper_value']:g})"
        return (ours or "–") + paper

    t["cell"] = t.apply(cell, axis=1)
    lines = [f"# {title}", "",
             "Cells: ours (paper). AP and nDCG x100, MRR in [0, 1]. Synthetic rows are the embedded "
             "offline benchmark and have no paper counterpart.", ""]
    for (tab, bench), part in t.groupby(["table", "benchmark"], sort=True):
        wide = part.pivot_table(index=["backbone", "method"], columns="column", values="cell",
                                aggfunc="first").fillna("")
        lines += [f"## Table {tab}: {bench}", "", _md(wide.reset_index()), ""]
    return "\n".join(lines)


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(out)
