"""Assemble the paper's tables (long form, ours beside the paper's numbers) from evaluation results.

Every evaluation result (one JSON per benchmark x backbone x method, written by the harness) is
flattened into rows named by the run's config method key (``alpha_qe1: {type: alpha_qe,
neighbours: 1}`` is the row ``alpha_qe1``). Each table selects its rows, spells the real ones the
way ``paper-numbers.csv`` does (:func:`row_name`, :data:`PAPER_SETTING`,
:data:`PAPER_RERANK_BACKBONE`: the one place where our names meet the paper's), attaches the
paper's value and the delta (real data only: synthetic rows are labelled and never compared),
lists the paper rows this run did not measure as reported, and renders a Markdown view laid out
like the paper's table.

Tables: "1" ILIAS search (1a backbone vs QuARI, 1b static linear adaptation vs QuARI), "2"
INQUIRE search, "3" re-ranking (3a ILIAS top-1k, 3b INQUIRE top-100: the paper's column beside
the full-pool scoring, INQUIRE-Rerank's official scoring in columns of its own), "4" the
ablations.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from quari.evaluation import k_label, rerank_metrics
from quari.store import atomic_write_text

COLUMNS = ["table", "benchmark", "setting", "backbone", "method", "metric", "value", "paper_value",
           "delta", "shortlist", "ms_per_1k_pairs", "ms_per_100_pairs", "data", "run_id",
           "dropped"]  # dropped: items left out of the row's scores, in words ("" = none)

#: table name -> (the paper's sub-tables it holds, title)
TABLES = {
    "1": (["1a", "1b"], "Table 1: ILIAS retrieval, backbone vs QuARI (1a) and static linear "
                        "adaptation vs QuARI (1b)"),
    "2": (["2"], "Table 2: INQUIRE text-to-image retrieval"),
    "3": (["3a", "3b"], "Table 3: re-ranking, ILIAS top-1k (3a) and INQUIRE top-100 (3b)"),
    "4": (["4"], "Table 4: ablations on SigLIP2-L (one refinement step, no semi-positives, "
                 "no noise, fine-tuned backbone)"),
}

# ---- our names -> the paper's names (the one place) ---------------------------------------------

#: the paper's row names of the backbone's own ranking (a method class declaring ``is_backbone``)
#: in (search tables, re-ranking tables); every other row keeps its config key, which must then
#: be spelled as in paper-numbers.csv (the paper configuration's keys are its row names)
BACKBONE_ROWS = ("backbone", "initial_ranking")

#: Table 4's rows (paper names) and what each is; a config key equal to the name makes the row
ABLATIONS = {
    "backbone": "the frozen backbone (cosine)",
    "finetuned_backbone": "fine-tuned backbone: an E x E projection from the identity, trained "
                          "on QuARI's data and loss (baselines/finetuned_backbone.py)",
    "quari_no_iterative_refinement": "QuARI with one refinement step (model.num_steps: 1)",
    "quari_no_semipositives": "QuARI trained without semi-positives "
                              "(train.use_semipositives: false)",
    "quari_no_noise": "QuARI trained without modality-gap noise (train.use_noise: false)",
    "quari": "QuARI, full recipe",
}

#: Table 1b's rows (static linear adaptation and QuARI trained on its UnED images)
TABLE_1B_METHODS = ("linear_adaptation", "quari_uned")

#: INQUIRE-Rerank's two scorings of one re-ranking (the ``rerank`` and ``rerank_full_pool`` entries
#: of an evaluation): the benchmark's official one (AP / nDCG / MRR over the 100 candidates,
#: P = relevant candidates, best possible 100) and the full-pool one (Fullrank's mAP@50 /
#: nDCG@50 / MRR with P = every positive of the query in iNat24), which is how the INQUIRE
#: repository scores a re-ranked top-100 (src/eval_fullrank_two_stage.py) and what the paper's
#: Table 3b column reports. Our settings name them; only the full-pool one meets the paper's.
OFFICIAL_RERANK_SETTING = "rerank top-{n}, official Rerank scoring"
FULL_POOL_RERANK_SETTING = "rerank top-{n}, full-pool scoring"
#: evaluation entries that re-rank a shortlist (the rest, ``search``, rank the whole gallery)
RERANK_MODES = ("rerank", "rerank_full_pool")

#: (sub-table, benchmark, our setting) -> the paper's wording of the same setting
PAPER_SETTING = {
    ("2", "inquire", "t2i@5M"): "fullrank (not labelled in the paper; most likely)",
    ("4", "inquire", "t2i@5M"): "(setting not labelled)",
    ("3b", "inquire", FULL_POOL_RERANK_SETTING.format(n=100)): "rerank top-100 (INQUIRE-Rerank)",
}

#: Table 3a re-ranks the top-1k of one backbone's search; the paper does not say which, the
#: initial mAP (19.6) is SigLIP-L's Table 1a value
PAPER_RERANK_BACKBONE = {
    ("3a", "siglip-vit-l16@384"): "siglip-vit-l16@384 (initial ranking; inferred)",
}

#: Table 3b re-ranks INQUIRE's fixed shortlist (the benchmark's OpenCLIP ViT-H-14-378 top-100).
#: A measured row is compared with it only when its evaluation says it re-ranked that same
#: shortlist (``"shortlist_source": "benchmark"`` in the re-ranking result); a backbone's own
#: top-100 is a different experiment and stays uncompared.
BENCHMARK_SHORTLIST = "initial ranking from the benchmark"
#: Table 3b's QuARI row names the backbone family QuARI ran on: (method, family) -> paper row
PAPER_3B_METHOD = {("quari", "siglip2"): "quari_siglip2"}

#: how the Markdown tables print the paper's rows that are a configuration of a method (its
#: parameters, its training set) or no method of ours: the paper's wording. Every other row is
#: printed with its method's label (:func:`row_label`)
PAPER_ROW_NAMES = {
    "backbone": "backbone", "initial_ranking": "initial ranking", "best_possible": "best possible",
    "quari_uned": "QuARI (UnED 1M)", "quari_siglip2": "QuARI (SigLIP2)",
    "alpha_qe1": "α-QE (n=1)", "alpha_qe2": "α-QE (n=2)", "alpha_qe5": "α-QE (n=5)",
    "quari_no_iterative_refinement": "QuARI, no iterative refinement",
    "quari_no_semipositives": "QuARI, no semi-positives", "quari_no_noise": "QuARI, no noise",
    # Table 3b's vision-language re-rankers (numbers reported by the INQUIRE benchmark)
    "blip2_flant5xxl": "BLIP-2 FlanT5-XXL", "instructblip_t5xxl": "InstructBLIP T5-XXL",
    "paligemma_3b_mix_448": "PaliGemma 3B", "llava_1.5_13b": "LLaVA-1.5 13B",
    "llava_1.6_7b": "LLaVA-1.6 7B", "llava_1.6_34b": "LLaVA-1.6 34B", "vila_13b": "VILA 13B",
    "vila_40b": "VILA 40B", "gpt_4v": "GPT-4V", "gpt_4o": "GPT-4o",
}


def _declared(method_type: str, attribute: str) -> bool:
    """What the method class of an evaluation declares (``quari.methods``); False for a type
    no longer registered."""
    from quari.methods import get_method

    try:
        return bool(getattr(get_method(method_type), attribute))
    except KeyError:
        return False


def row_name(ev: dict, rerank: bool) -> str:
    """An evaluation's row name in the tables: its config key, or the paper's name of the
    backbone's own ranking (:data:`BACKBONE_ROWS`)."""
    return BACKBONE_ROWS[rerank] if _declared(ev["method_type"], "is_backbone") else ev["method"]


def row_label(method: str, labels: dict[str, str] | None = None) -> str:
    """How the tables and figures print a row: the paper's wording of its own rows
    (:data:`PAPER_ROW_NAMES`), else the label its evaluation recorded (``labels``: row ->
    label, the method's :meth:`~quari.methods.RetrievalMethod.display_label`), else the label
    of the method class of that name, else the name itself."""
    if method in PAPER_ROW_NAMES:
        return PAPER_ROW_NAMES[method]
    if labels and labels.get(method):
        return labels[method]
    from quari.methods import get_method

    try:
        label = get_method(method).label
    except KeyError:
        return method
    return label if label and "{" not in label else method


def size_label(n: int) -> str:
    """Gallery size as the paper writes it (5M, 100M), or the exact count below a million."""
    return f"{round(n / 1_000_000)}M" if n >= 1_000_000 else str(n)


def _scale(metric: str, value: float) -> float:
    """AP and nDCG are shown x100 as in the paper; MRR stays in [0, 1]."""
    return value if metric == "MRR" else 100.0 * value


def _digits(metric: str) -> int:
    """Decimals kept: 2 on the x100 scale, 4 for MRR in [0, 1]."""
    return 4 if metric == "MRR" else 2


def _cutoff(metric: str) -> int:
    """The k of a metric name ("mAP@1k" -> 1000, "mAP@50" -> 50)."""
    label = metric.split("@", 1)[1]
    return int(label[:-1]) * 1000 if label.endswith("k") else int(label)


# ---- best possible re-ranking ---------------------------------------------------------------------

def best_possible_metrics(relevant_in_shortlist: Sequence[int], num_positives: Sequence[int],
                          shortlist: int, scoring: str, k: int) -> dict[str, float]:
    """The metrics of the ideal re-ranking of every query's shortlist: its relevant candidates
    first, scored by the very function that scores a re-ranking
    (:func:`quari.evaluation.rerank_metrics`; ``scoring`` "ilias", "inquire" or
    "inquire_full_pool").

    It is the ceiling of any re-ranker of that shortlist (Table 3's "best possible" rows) and
    depends only on how many of each query's ``shortlist`` candidates are relevant and on its
    total number of positives.
    """
    if len(relevant_in_shortlist) != len(num_positives) or not len(num_positives):
        raise ValueError(f"{len(relevant_in_shortlist)} shortlist counts for "
                         f"{len(num_positives)} queries")
    ideal = []
    for hits, positives in zip(relevant_in_shortlist, num_positives):
        if not 0 <= hits <= min(shortlist, positives):
            raise ValueError(f"{hits} relevant candidates in a shortlist of {shortlist} for a "
                             f"query with {positives} positives")
        ideal.append(np.r_[np.ones(hits), np.zeros(shortlist - hits)])
    return rerank_metrics(ideal, num_positives, scoring, k)


# ---- evaluation JSONs -> rows -------------------------------------------------------------------

def load_evaluations(paths: Iterable[str | Path]) -> list[dict]:
    """The evaluation JSONs written by the harness, in the order given."""
    return [json.loads(Path(p).read_text()) for p in paths]


def _rerank_setting(ev: dict, mode: str, res: dict, task: str) -> str:
    """Our name of a re-ranking's setting: ILIAS says its gallery, INQUIRE-Rerank's fixed lists
    say which of their two scorings the row carries (a backbone's own INQUIRE top-k, as on
    synthetic data, is scored the official way and keeps the plain name)."""
    shortlist = k_label(res["shortlist"])
    if ev["benchmark"] == "ilias":
        return f"{task}@{size_label(ev['gallery_size'])} rerank top-{shortlist}"
    if mode == "rerank_full_pool":
        return FULL_POOL_RERANK_SETTING.format(n=shortlist)
    if res.get("shortlist_source") == "benchmark":
        return OFFICIAL_RERANK_SETTING.format(n=shortlist)
    return f"rerank top-{shortlist}"


def _best_possible(ev: dict, mode: str, res: dict) -> dict[str, float]:
    """The best possible ordering's metrics of a re-ranking entry, in its own scoring."""
    if mode == "rerank_full_pool":
        return best_possible_metrics(res["relevant_in_shortlist"], res["num_positives"],
                                     res["shortlist"], "inquire_full_pool", res["k"])
    k = _cutoff(next(m for m in res["metrics"] if "@" in m))
    return best_possible_metrics(res["relevant_in_shortlist"], res["num_positives"],
                                 res["shortlist"], ev["benchmark"], k)


def dropped_note(ev: dict, task: str) -> str:
    """What an evaluation left out (its ``dropped`` reports, quari.dropped), in words: queries
    of this task, gallery items, training images and pairs; "" when nothing."""
    reports = ev.get("dropped") or {}
    queries = {"i2i": "image_queries"}.get(task, "text_queries")
    parts = []
    for key, what in ((queries, "queries"), ("gallery", "gallery images"),
                      ("training", "training images")):
        report = reports.get(key) or {}
        if report.get("dropped"):
            of = f" of {report['requested']:,}" if report.get("requested") else ""
            extra = (f" (and {report['captions_dropped']:,} training pairs)"
                     if report.get("captions_dropped") else "")
            parts.append(f"{report['dropped']:,}{of} {what} left out{extra}")
    return "; ".join(parts)


def evaluation_rows(evaluations: Iterable[dict]) -> pd.DataFrame:
    """One row per (benchmark, task, mode, backbone, method, metric) from evaluation JSONs, in
    our own spelling, plus a ``best_possible`` row per re-ranking of the backbone's evaluation
    (its class declares ``is_backbone``) when it records its shortlist's relevance (see
    :func:`best_possible_metrics`).
    """
    rows = []
    for ev in evaluations:
        synthetic = ev["data"] == "synthetic"
        for task, modes in ev["tasks"].items():
            for mode, res in modes.items():
                if mode == "search" and _declared(ev["method_type"], "reranker"):
                    continue
                setting = (f"{task}@{size_label(res['gallery_size'])}" if mode == "search"
                           else _rerank_setting(ev, mode, res, task))
                ms_1k = res.get("ms_per_1k_pairs")
                common = {
                    "model_size": ev.get("model_size", ""),
                    "benchmark": ev["benchmark"] + (" (synthetic)" if synthetic else ""),
                    "task": task, "mode": mode, "setting": setting, "backbone": ev["backbone"],
                    "shortlist": res.get("shortlist", "all"), "data": ev["data"],
                    "run_id": ev["run_id"], "shortlist_source": res.get("shortlist_source"),
                    "dropped": dropped_note(ev, task),
                }
                measured = {"method": row_name(ev, mode != "search"), "label": ev.get("label"),
                            "ms_per_1k_pairs": ms_1k,
                            "ms_per_100_pairs": (
                                res.get("ms_per_100_pairs", None if ms_1k is None else ms_1k / 10)
                                if ev["benchmark"] == "inquire" else None)}
                found = [(measured, res["metrics"])]
                if (mode != "search" and _declared(ev["method_type"], "is_backbone")
                        and "relevant_in_shortlist" in res):
                    ideal = _best_possible(ev, mode, res)
                    found.append(({"method": "best_possible", "label": None, "ms_per_1k_pairs": None,
                                   "ms_per_100_pairs": None}, ideal))
                for names, values in found:
                    for metric, value in values.items():
                        rows.append({**common, **names, "metric": metric,
                                     "value": round(_scale(metric, value), _digits(metric))})
    return pd.DataFrame(rows)


# ---- one table ----------------------------------------------------------------------------------

def _family(backbone: str) -> str:
    """A backbone's family as the paper's row names use it ("siglip2-vit-l16@512" -> "siglip2")."""
    return backbone.split("-", 1)[0]


def _paper_spelling(table: str, row) -> tuple[str, str, str]:
    """(setting, backbone, method) of a real measured row as paper-numbers.csv spells them."""
    bench = row["benchmark"]
    setting = PAPER_SETTING.get((table, bench, row["setting"]), row["setting"])
    backbone, method = row["backbone"], row["method"]
    if table == "3a":
        backbone = PAPER_RERANK_BACKBONE.get((table, backbone), backbone)
    if table == "3b" and row.get("shortlist_source") == "benchmark":
        method = PAPER_3B_METHOD.get((method, _family(backbone)), method)
        backbone = BENCHMARK_SHORTLIST
    return setting, backbone, method


def _select(df: pd.DataFrame, name: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows of table ``name`` and the sub-table each goes to."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
    if df.empty:
        return df, []
    ilias = df["benchmark"].str.startswith("ilias")
    ablation_only = df["method"].isin(set(ABLATIONS) - {"backbone", "quari"})
    if name == "1":
        sel = df[(df["mode"] == "search") & ilias & ~ablation_only]
        return sel, ["1b" if m in TABLE_1B_METHODS else "1a" for m in sel["method"]]
    if name == "2":
        sel = df[(df["mode"] == "search") & ~ilias & ~ablation_only]
        return sel, ["2"] * len(sel)
    if name == "3":
        sel = df[df["mode"].isin(RERANK_MODES) & ~(ilias & (df["task"] != "i2i")) & ~ablation_only]
        return sel, ["3a" if b.startswith("ilias") else "3b" for b in sel["benchmark"]]
    # Table 4 holds the backbones the ablations ran on (not every backbone's QuARI and cosine)
    ablated = set(zip(df.loc[ablation_only, "benchmark"], df.loc[ablation_only, "backbone"]))
    on_ablated = pd.Series([(b, k) in ablated for b, k in zip(df["benchmark"], df["backbone"])],
                           index=df.index)
    sel = df[(df["mode"] == "search") & df["method"].isin(ABLATIONS) & on_ablated]
    return sel, ["4"] * len(sel)


def build_table(df: pd.DataFrame, paper: pd.DataFrame, name: str) -> pd.DataFrame:
    """The measured rows of table ``name`` (see :data:`TABLES`) in long form: real rows spelled
    as the paper spells them with ``paper_value`` and ``delta`` = ours - paper where the paper
    has the row; synthetic rows as they are, never compared."""
    sel, subtables = _select(df, name)
    if sel.empty:
        return pd.DataFrame(columns=COLUMNS)
    out = sel.copy()
    out["table"] = subtables
    key = ["table", "benchmark", "setting", "backbone", "method", "metric"]
    lookup = {tuple(str(r[k]) for k in key): r["value"] for _, r in paper.iterrows()}
    values = []
    for i, r in out.iterrows():
        if r["data"] != "real":
            values.append(None)
            continue
        setting, backbone, method = _paper_spelling(r["table"], r)
        out.loc[i, ["setting", "backbone", "method"]] = [setting, backbone, method]
        values.append(lookup.get((r["table"], r["benchmark"], setting, backbone, method,
                                  r["metric"])))
    out["paper_value"] = pd.to_numeric(pd.Series(values, index=out.index), errors="coerce")
    out["delta"] = [None if pd.isna(p) else round(v - p, _digits(m))
                    for v, p, m in zip(out["value"], out["paper_value"], out["metric"])]
    return _in_paper_order(out[COLUMNS], paper)


def paper_only_rows(paper: pd.DataFrame, tables: list[str], present: pd.DataFrame) -> pd.DataFrame:
    """Paper rows of ``tables`` this run did not measure, marked ``data = "paper (not run)"``."""
    key = ["table", "benchmark", "setting", "backbone", "method", "metric"]
    have = {tuple(str(r[k]) for k in key) for _, r in present.iterrows()}
    rows = []
    for _, r in paper[paper["table"].astype(str).isin(tables)].iterrows():
        if tuple(str(r[k]) for k in key) not in have:
            rows.append({**{k: r[k] for k in key}, "table": str(r["table"]), "value": None,
                         "paper_value": r["value"], "delta": None, "shortlist": None,
                         "ms_per_1k_pairs": None, "ms_per_100_pairs": None,
                         "data": "paper (not run)", "run_id": None})
    return pd.DataFrame(rows, columns=COLUMNS)


def assemble_table(df: pd.DataFrame, paper: pd.DataFrame, name: str,
                   run_id: str | None = None) -> pd.DataFrame:
    """Table ``name`` complete: measured rows, then every paper row not measured (as reported),
    in the paper's order; ``run_id`` fills measured rows that lack one."""
    measured = build_table(df, paper, name)
    if run_id is not None:
        measured["run_id"] = measured["run_id"].fillna(run_id)
    reported = paper_only_rows(paper, TABLES[name][0], measured)
    parts = [p for p in (measured, reported) if not p.empty]
    full = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    return _in_paper_order(full, paper)


def _in_paper_order(table: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Sub-table, real before synthetic, then backbones, methods, settings and metrics in the
    order the paper lists them (names the paper lacks after, alphabetically)."""
    if table.empty:
        return table.reset_index(drop=True)

    def rank(column: str) -> dict:
        order = {}
        for t, v in zip(paper["table"].astype(str), paper[column]):
            order.setdefault((t, v), len(order))
        return order

    ranks = {c: rank(c) for c in ("backbone", "method", "setting", "metric")}
    # synthetic rows follow the paper's method order of their sub-table
    methods = {}
    for (t, m), i in ranks["method"].items():
        methods.setdefault((t, m), i)
    late = len(paper) + 1
    keys = pd.DataFrame({
        "table": table["table"].astype(str),
        "synthetic": table["benchmark"].str.endswith("(synthetic)"),
        "benchmark": table["benchmark"],
        **{c: [ranks[c].get((t, v), late) for t, v in zip(table["table"].astype(str), table[c])]
           for c in ("backbone", "setting", "metric")},
        "method": [methods.get((t, v), late) for t, v in zip(table["table"].astype(str),
                                                           table["method"])],
        "backbone_name": table["backbone"], "method_name": table["method"],
        "setting_name": table["setting"], "metric_name": table["metric"],
    }, index=table.index)
    order = keys.sort_values(["table", "synthetic", "benchmark", "backbone", "backbone_name",
                              "method", "method_name", "setting", "setting_name", "metric",
                              "metric_name"], kind="stable").index
    return table.loc[order].reset_index(drop=True)


# ---- Markdown -----------------------------------------------------------------------------------

#: one line under a sub-table's heading saying what it compares
NOTES = {
    "3a": "Re-ranking the backbone's cosine top-1k; time of the re-ranking alone (shortlist given).",
    "3b": ("The paper re-ranks INQUIRE's fixed top-100 (OpenCLIP ViT-H-14-378); a measured row is "
           "compared with it only when its evaluation re-ranked that same shortlist. Best possible "
           "= the shortlist's relevant candidates first (computed, not copied)."),
}


def _note(table: str) -> str | None:
    """The note under a sub-table's heading (Table 4's names its rows)."""
    if table == "4":
        return "Rows: " + "; ".join(f"{row_label(k)} = {v}" for k, v in ABLATIONS.items()) + "."
    return NOTES.get(table)


#: under Table 3b's heading when real rows were measured: which column is which scoring
RERANK_SCORING_NOTE = (
    "Two scorings of the same re-ranking. \"rerank top-100 (INQUIRE-Rerank)\" columns: the "
    "paper's, recomputed here (mAP@50, nDCG@50, MRR over the top 50 with P = every positive of "
    "the query in iNat24 from the Fullrank annotations, as the INQUIRE repository scores a "
    "re-ranked top-100 in src/eval_fullrank_two_stage.py); positives outside the 100 candidates "
    "cannot be found, so the best possible ordering stays below 100. \"official Rerank scoring\" "
    "columns: INQUIRE-Rerank's own evaluation (src/eval_rerank_with_clip.py / _llm.py: AP, nDCG "
    "and MRR over all 100 candidates with P = the relevant ones, best possible 100); the paper "
    "has no such column.")


def _number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def to_markdown(table: pd.DataFrame, title: str,
                model_sizes: dict[tuple[str, str], str] | None = None,
                labels: dict[str, str] | None = None) -> str:
    """A readable rendering: one line per (sub-table, benchmark, backbone, method) in the order of
    ``table``, one column per setting and metric, cells "ours (paper)"; the shortlist QuARI and
    the others scored, and for re-ranking tables the time per 1k (ILIAS) or 100 (INQUIRE) pairs.
    Rows marked † are the paper's, not run here; a synthetic row's backbone says "(synthetic)";
    a method of ``model_sizes`` ((backbone, method) -> size) has its size beside its name; a
    row is printed as :func:`row_label` says (``labels``: row -> its evaluation's label)."""
    model_sizes = model_sizes or {}
    if table.empty:
        return f"# {title}\n\n(no rows)\n"
    lines = [f"# {title}", "",
             "Cells: ours (paper). AP and nDCG x100, MRR in [0, 1]. Synthetic rows are the embedded "
             "offline benchmark and have no paper counterpart. † = reported by the paper, not run "
             "here.", ""]
    noted: set[str] = set()  # each sub-table's note once, above its first part
    for (tab, bench), part in table.groupby(["table", "benchmark"], sort=False):
        rows: dict[tuple, dict] = {}
        columns: list[str] = []
        for _, r in part.iterrows():
            column = f"{r['setting']} {r['metric']}"
            if column not in columns:
                columns.append(column)
            row = rows.setdefault((r["backbone"], r["method"]),
                                  {"reported_only": True, "shortlist": "", "ms": "", "notes": [],
                                   "synthetic": r["data"] == "synthetic"})
            note = r.get("dropped")
            if isinstance(note, str) and note:
                note = f"{r['setting']}: {note}"
                if note not in row["notes"]:
                    row["notes"].append(note)
            ours = "–" if pd.isna(r["value"]) else _number(r["value"])
            paper = "" if pd.isna(r["paper_value"]) else f" ({r['paper_value']:g})"
            row[column] = ours + paper
            if r["data"] != "paper (not run)":
                row["reported_only"] = False
                row["shortlist"] = row["shortlist"] or _shortlist_text(r["shortlist"])
                cost = r["ms_per_100_pairs"] if bench.startswith("inquire") else r["ms_per_1k_pairs"]
                if not row["ms"] and not pd.isna(cost):
                    row["ms"] = f"{cost:.3g}"
        rerank = str(tab).startswith("3")
        cost_head = "ms / 100 pairs" if bench.startswith("inquire") else "ms / 1k pairs"
        head = ["backbone", "method", *columns, "shortlist"] + ([cost_head] if rerank else [])
        body, footnotes = [], []
        for (backbone, method), row in rows.items():
            size = model_sizes.get((backbone, method))
            label = (row_label(method, labels) + (f" ({size})" if size else "")
                     + (" †" if row["reported_only"] else ""))
            shown = f"{backbone} (synthetic)" if row["synthetic"] else backbone
            if row["notes"]:  # items left out: a footnote, never a silent denominator change
                footnotes.append(f"[{len(footnotes) + 1}] {shown}, {label}: "
                                 + "; ".join(row["notes"]) + ".")
                label += f" [{len(footnotes)}]"
            body.append([shown, label, *(row.get(c, "") for c in columns), row["shortlist"]]
                        + ([row["ms"]] if rerank else []))
        lines += [f"## Table {tab}: {bench}", ""]
        if _note(str(tab)) and str(tab) not in noted:
            lines += [_note(str(tab)), ""]
            noted.add(str(tab))
        if str(tab) == "3b" and (part["data"] == "real").any():
            lines += [RERANK_SCORING_NOTE, ""]
        lines += [_md(head, body), ""]
        if footnotes:
            lines += ["Left out of the scores above (unreadable images; see each set's "
                      "skipped.tsv):", "", *footnotes, ""]
    return "\n".join(lines)


def _shortlist_text(shortlist) -> str:
    if shortlist is None or (isinstance(shortlist, float) and np.isnan(shortlist)):
        return ""
    return "all" if str(shortlist) == "all" else f"top-{k_label(int(float(shortlist)))}"


def _md(head: list[str], body: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(v) for v in row) + " |" for row in body]
    return "\n".join(out)


def model_sizes(df: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(backbone, method) -> the size its evaluation recorded (``model_size``), where there is one
    (QuARI smaller than the paper's: "H 64, 1 layer, rank 16; CPU-size")."""
    if "model_size" not in df:
        return {}
    sized = df[df["model_size"].fillna("").astype(str) != ""]
    return {(b, m): s for b, m, s in sized[["backbone", "method", "model_size"]].itertuples(index=False)}


def method_labels(df: pd.DataFrame) -> dict[str, str]:
    """Row (config key) -> the label its evaluations recorded, where they recorded one."""
    if "label" not in df:
        return {}
    named = df[df["label"].fillna("").astype(str) != ""]
    return dict(zip(named["method"], named["label"]))


def write_table(df: pd.DataFrame, paper: pd.DataFrame, name: str, csv_path: str | Path,
                md_path: str | Path, run_id: str | None = None) -> pd.DataFrame:
    """Assemble table ``name`` and write its long-form CSV and Markdown atomically; returns it."""
    full = assemble_table(df, paper, name, run_id)
    atomic_write_text(csv_path, full.to_csv(index=False))
    atomic_write_text(md_path, to_markdown(full, TABLES[name][1], model_sizes(df),
                                           method_labels(df)))
    return full
