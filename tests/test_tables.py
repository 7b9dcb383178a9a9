"""Table assembly: paper values attached to the right rows, deltas, synthetic rows never compared,
every paper row present (measured or reported), best possible computed from the shortlist."""

import csv
import itertools

import numpy as np
import pandas as pd
import pytest

from quari import metrics
from quari.reporting.tables import (ABLATIONS, TABLES, assemble_table, best_possible_metrics, build_table,
                          evaluation_rows, paper_only_rows, size_label, to_markdown, write_table)

from tests.builders import PAPER, PAPER_CSV, evaluation

TABLE_PARTS = {name: parts for name, (parts, _) in TABLES.items()}


def paper_value(table, benchmark, setting, backbone, method, metric):
    """The paper's number read straight from the CSV file (independent of pandas and tables.py)."""
    with open(PAPER_CSV, newline="") as f:
        hits = [float(r["value"]) for r in csv.DictReader(f)
                if (r["table"], r["benchmark"], r["setting"], r["backbone"], r["method"],
                    r["metric"]) == (table, benchmark, setting, backbone, method, metric)]
    assert len(hits) == 1, (table, method, setting, backbone, metric)
    return hits[0]


def test_size_labels():
    assert size_label(100_000_000) == "100M"
    assert size_label(5_000_000) == "5M"
    assert size_label(6250) == "6250"


def test_paper_value_and_delta_on_matching_real_rows():
    evs = [evaluation("identity", "identity", "clip-vit-b16@224", i2i=0.05),
           evaluation("quari", "quari", "clip-vit-b16@224", i2i=0.09)]
    table = build_table(evaluation_rows(evs), PAPER, "1")
    row = table[(table["method"] == "backbone") & (table["setting"] == "i2i@100M")].iloc[0]
    assert row["paper_value"] == pytest.approx(4.2)  # Table 1a, CLIP-B backbone, I2I@100M
    assert row["value"] == pytest.approx(5.0)
    assert row["delta"] == pytest.approx(0.8)
    q = table[(table["method"] == "quari") & (table["setting"] == "i2i@100M")].iloc[0]
    assert q["paper_value"] == pytest.approx(8.4) and q["delta"] == pytest.approx(0.6)
    assert set(table["table"]) == {"1a"}


def test_synthetic_rows_are_labelled_and_never_compared_in_any_table():
    evs = [evaluation(m, t, "syn-b256", benchmark=b, data="synthetic", gallery=6250)
           for m, t in (("identity", "identity"), ("quari", "quari"), ("alpha_qe1", "alpha_qe"),
                        ("quari_no_noise", "quari"), ("finetuned_backbone", "finetuned_backbone"),
                        ("linear_adaptation", "linear_adaptation"))
           for b in ("ilias", "inquire")]
    rows = evaluation_rows(evs)
    for name in TABLES:
        table = build_table(rows, PAPER, name)
        assert len(table) > 0, name
        assert table["paper_value"].isna().all() and table["delta"].isna().all(), name
        assert table["benchmark"].str.endswith("(synthetic)").all(), name
        assert (table["data"] == "synthetic").all()
    assert set(build_table(rows, PAPER, "1")["setting"]) == {"i2i@6250", "t2i@6250"}
    assert set(build_table(rows, PAPER, "4")["method"]) == {"backbone", "quari", "quari_no_noise",
                                                           "finetuned_backbone"}
    without_ablations = rows[~rows["method"].isin(["quari_no_noise", "finetuned_backbone"])]
    assert build_table(without_ablations, PAPER, "4").empty  # Table 4 = backbones ablated


def full_paper_run():
    """Real evaluations of every row the paper configuration measures (values arbitrary)."""
    rng = np.random.default_rng(0)
    v = lambda: float(rng.uniform(0.05, 0.5))  # noqa: E731
    backbones = sorted(set(PAPER.loc[PAPER["table"].isin(["1a", "1b"]), "backbone"]))
    evs = []
    for b in backbones:
        for method, mtype in (("identity", "identity"), ("quari", "quari"),
                              ("linear_adaptation", "linear_adaptation"), ("quari_uned", "quari")):
            evs.append(evaluation(method, mtype, b, i2i=v(), t2i=v()))
    for method, mtype in (("alpha_qe1", "alpha_qe"), ("alpha_qe2", "alpha_qe"),
                          ("alpha_qe5", "alpha_qe"), ("chamfer", "chamfer"),
                          ("spatial_verification", "spatial_verification")):
        evs.append(evaluation(method, mtype, "siglip-vit-l16@384", i2i=v(), t2i=v()))
    for method in ABLATIONS:
        mtype = {"backbone": "identity", "finetuned_backbone": "finetuned_backbone"}.get(method, "quari")
        key = "identity" if method == "backbone" else method
        evs.append(evaluation(key, mtype, "siglip2-vit-l16@512", benchmark="inquire",
                              gallery=5_000_000, i2i=v(), t2i=v()))
        if method not in ("backbone", "quari"):  # those are already in the ILIAS runs above
            evs.append(evaluation(key, mtype, "siglip2-vit-l16@512", i2i=v(), t2i=v()))
    for b in ("clip-vit-b16@224", "siglip-vit-l16@384"):
        evs += [evaluation(m, t, b, benchmark="inquire", gallery=5_000_000, i2i=v(), t2i=v())
                for m, t in (("identity", "identity"), ("quari", "quari"))]
    # Table 3b: INQUIRE-Rerank's fixed lists, scored both ways
    counts = {"relevant_in_shortlist": [3, 0, 40], "num_positives": [3, 0, 40]}
    for m, t in (("identity", "identity"), ("quari", "quari")):
        evs.append(evaluation(m, t, "siglip2-vit-l16@512", benchmark="inquire", gallery=300,
                              i2i=v(), rerank_extra={"shortlist_source": "benchmark", **counts},
                              full_pool={"ap": v(), "relevant_in_shortlist": [3, 0, 40],
                                         "num_positives": [30, 7, 41]}))
    return evs


def test_every_paper_row_is_present_once_measured_or_reported():
    rows = evaluation_rows(full_paper_run())
    for name, parts in TABLE_PARTS.items():
        table = assemble_table(rows, PAPER, name, run_id="r")
        paper = PAPER[PAPER["table"].isin(parts)]
        key = ["table", "benchmark", "setting", "backbone", "method", "metric"]
        for _, p in paper.iterrows():
            match = table[(table[key].astype(str) == p[key].astype(str).values).all(axis=1)]
            assert len(match) == 1, tuple(p[key])
            assert match.iloc[0]["paper_value"] == pytest.approx(p["value"])
        reported = table[table["data"] == "paper (not run)"]
        assert reported["value"].isna().all() and reported["paper_value"].notna().all()


def test_measured_rows_replace_reported_ones_and_deltas_are_right():
    rows = evaluation_rows(full_paper_run())
    compared = 0
    for name in TABLES:
        table = assemble_table(rows, PAPER, name)
        for _, r in table[table["data"] == "real"].iterrows():
            if pd.isna(r["paper_value"]):
                continue
            expected = paper_value(r["table"], r["benchmark"], r["setting"], r["backbone"],
                                   r["method"], r["metric"])
            assert r["paper_value"] == pytest.approx(expected)
            assert r["delta"] == pytest.approx(r["value"] - expected, abs=1e-9)
            compared += 1
    # 1a: 7 backbones x 2 methods x (i2i@100M, t2i@100M); 1b: 14; 2: 2 x 2 x 3 metrics;
    # 3a: all but AMES; 3b: initial ranking, best possible and QuARI x 3 metrics (full-pool
    # scoring only); 4: 6 rows x (ILIAS i2i@100M + 3 INQUIRE metrics)
    assert compared == 28 + 14 + 12 + 7 + 9 + 24
    # what this run did not measure is reported, nothing else
    reported = {name: (lambda t: t[t["data"] == "paper (not run)"])(assemble_table(rows, PAPER, name))
                for name in TABLES}
    assert set(reported["1"]["setting"]) == {"t2i@5M"}  # the run's ILIAS gallery is 100M
    assert set(reported["2"]["backbone"]) == {"clip-vit-l14@336", "siglip-so400m14@384"}
    assert set(reported["3"].loc[reported["3"]["table"] == "3a", "method"]) == {"ames"}
    assert (reported["3"]["table"] == "3b").sum() == (PAPER["table"] == "3b").sum() - 9
    assert set(reported["4"]["setting"]) == {"t2i@5M"}


def test_table3a_row_names_map_onto_the_paper():
    evs = [evaluation("identity", "identity", "siglip-vit-l16@384", i2i=0.196),
           evaluation("alpha_qe2", "alpha_qe", "siglip-vit-l16@384", i2i=0.21),
           evaluation("quari", "quari", "siglip-vit-l16@384", i2i=0.3)]
    table = build_table(evaluation_rows(evs), PAPER, "3")
    assert set(table["table"]) == {"3a"}  # only I2I re-ranking is in Table 3a
    assert set(table["backbone"]) == {"siglip-vit-l16@384 (initial ranking; inferred)"}
    got = dict(zip(table["method"], table["delta"]))
    assert got == pytest.approx({"initial_ranking": 0.0, "alpha_qe2": 0.6, "quari": 0.9})
    assert (table["ms_per_1k_pairs"] == 2.0).all() and (table["shortlist"] == 1000).all()


def test_table3b_is_compared_only_on_the_benchmark_shortlist_and_full_pool_scoring():
    own = [evaluation("quari", "quari", "siglip2-vit-l16@512", benchmark="inquire", i2i=0.456)]
    table = build_table(evaluation_rows(own), PAPER, "3")
    assert table["paper_value"].isna().all() and set(table["method"]) == {"quari"}
    assert set(table["setting"]) == {"rerank top-100"}  # a backbone's own top-100
    given = [evaluation("quari", "quari", "siglip2-vit-l16@512", benchmark="inquire", i2i=0.61,
                        rerank_extra={"shortlist_source": "benchmark"},
                        full_pool={"ap": 0.456, "relevant_in_shortlist": [1],
                                   "num_positives": [9]})]
    table = build_table(evaluation_rows(given), PAPER, "3")
    assert set(table["table"]) == {"3b"} and len(table) == 6
    assert set(table["backbone"]) == {"initial ranking from the benchmark"}
    assert set(table["method"]) == {"quari_siglip2"}
    # the full-pool scoring is the paper's column: compared
    full = table[table["setting"] == "rerank top-100 (INQUIRE-Rerank)"].set_index("metric")
    assert full.loc["mAP@50", "value"] == pytest.approx(45.6)
    assert full.loc["mAP@50", "delta"] == pytest.approx(0.0)
    assert full.loc["MRR", "paper_value"] == pytest.approx(0.76)
    assert full.loc["MRR", "delta"] == pytest.approx(0.4 - 0.76)
    # the official Rerank scoring stays visible, labelled, never compared
    official = table[table["setting"] == "rerank top-100, official Rerank scoring"]
    assert set(official["metric"]) == {"mAP@50", "nDCG@50", "MRR"}
    assert official["paper_value"].isna().all() and official["delta"].isna().all()
    assert official.set_index("metric").loc["mAP@50", "value"] == pytest.approx(61.0)
    assert (table["ms_per_100_pairs"] == 0.2).all() and (table["shortlist"] == 100).all()


def test_table3b_best_possible_rows_in_both_scorings():
    # three queries: relevant candidates 2, 0, 5 of 100; positives in the pool 4, 3, 80
    counts = {"relevant_in_shortlist": [2, 0, 5]}
    evs = [evaluation(m, t, "siglip2-vit-l16@512", benchmark="inquire", gallery=300,
                      rerank_extra={"shortlist_source": "benchmark", **counts,
                                    "num_positives": [2, 0, 5]},
                      full_pool={"ap": 0.2, **counts, "num_positives": [4, 3, 80]})
           for m, t in (("identity", "identity"), ("quari", "quari"))]
    table = build_table(evaluation_rows(evs), PAPER, "3")
    best = table[table["method"] == "best_possible"]
    assert len(best) == 6  # one row per metric and scoring, from the backbone's evaluation only
    full = best[best["setting"] == "rerank top-100 (INQUIRE-Rerank)"].set_index("metric")
    # by hand, k = 50: the ideal AP of a query is hits / min(50, P), so 2/4, 0 and 5/50
    assert full.loc["mAP@50", "value"] == pytest.approx(round(100 * (2 / 4 + 0 + 5 / 50) / 3, 2))
    ideal = lambda hits, p: (sum(1 / np.log2(r + 1) for r in range(1, hits + 1))  # noqa: E731
                             / sum(1 / np.log2(r + 1) for r in range(1, min(50, p) + 1)))
    assert full.loc["nDCG@50", "value"] == pytest.approx(
        round(100 * (ideal(2, 4) + 0 + ideal(5, 80)) / 3, 2))
    assert full.loc["MRR", "value"] == pytest.approx(round(2 / 3, 4))
    assert full.loc["mAP@50", "paper_value"] == pytest.approx(65.6)
    # the official scoring of the same lists: a query with a relevant candidate scores 100
    official = best[best["setting"] == "rerank top-100, official Rerank scoring"]
    assert official["value"].tolist() == pytest.approx([66.67, 66.67, 0.6667])
    assert official["paper_value"].isna().all()


def test_table3b_markdown_shows_both_scorings(tmp_path):
    evs = [evaluation("identity", "identity", "siglip2-vit-l16@512", benchmark="inquire",
                      gallery=300, i2i=0.5, rerank_extra={"shortlist_source": "benchmark"},
                      full_pool={"ap": 0.333, "relevant_in_shortlist": [1],
                                 "num_positives": [9]})]
    write_table(evaluation_rows(evs), PAPER, "3", tmp_path / "t.csv", tmp_path / "t.md", "r")
    md = (tmp_path / "t.md").read_text()
    part = md.split("## Table 3b")[1]
    assert "official Rerank scoring" in part and "P = every positive of the query" in part
    head = next(line for line in part.splitlines() if line.startswith("| backbone"))
    assert head.split(" | ")[2:5] == [f"rerank top-100 (INQUIRE-Rerank) {m}"
                                      for m in ("mAP@50", "nDCG@50", "MRR")]
    assert head.split(" | ")[5:8] == [f"rerank top-100, official Rerank scoring {m}"
                                      for m in ("mAP@50", "nDCG@50", "MRR")]
    initial = next(line for line in part.splitlines() if "| initial ranking |" in line)
    assert initial.split(" | ")[2] == "33.3 (33.3)" and initial.split(" | ")[5] == "50"
    # without measured real rows (the offline default) the note is not there
    offline = to_markdown(assemble_table(evaluation_rows([]), PAPER, "3"), "Table 3")
    assert "official Rerank scoring" not in offline


def test_table4_ablations_map_and_stay_out_of_tables_1_to_3():
    evs = [evaluation("quari_no_noise", "quari", "siglip2-vit-l16@512", i2i=0.2),
           evaluation("quari_no_noise", "quari", "siglip2-vit-l16@512", benchmark="inquire",
                      gallery=5_000_000, i2i=0.441)]
    rows = evaluation_rows(evs)
    for name in ("1", "2", "3"):
        assert build_table(rows, PAPER, name).empty
    other = evaluation_rows([evaluation("quari", "quari", "clip-vit-b16@224")])
    table = build_table(pd.concat([rows, other], ignore_index=True), PAPER, "4")
    assert set(table["backbone"]) == {"siglip2-vit-l16@512"}
    inquire = table[(table["benchmark"] == "inquire") & (table["metric"] == "mAP@50")].iloc[0]
    assert inquire["setting"] == "(setting not labelled)" and inquire["delta"] == pytest.approx(0)
    ilias = table[table["setting"] == "i2i@100M"].iloc[0]
    assert ilias["paper_value"] == pytest.approx(20.0) and ilias["delta"] == pytest.approx(0.0)


def brute_force_best(relevance, num_positives, score):
    """The best score over every ordering of a shortlist."""
    return max(score(np.array(p), num_positives) for p in set(itertools.permutations(relevance)))


def test_best_possible_is_the_best_ordering():
    rng = np.random.default_rng(1)
    shortlists = [rng.integers(0, 2, 7) for _ in range(5)]
    positives = [int(s.sum()) + int(rng.integers(0, 3)) for s in shortlists]
    k = 5  # a cut-off inside the shortlist, so the order matters for AP@k
    got = best_possible_metrics([int(s.sum()) for s in shortlists], positives, 7, "ilias", k)
    brute = np.mean([brute_force_best(s, p, lambda r, p: metrics.average_precision_at_k(r, p, k))
                     for s, p in zip(shortlists, positives)])
    assert got == {"mAP@5": pytest.approx(brute)}
    # INQUIRE-Rerank: P = relevant candidates, so a query with any relevant one scores 1
    got = best_possible_metrics([3, 0, 1, 2], [3, 0, 1, 2], 6, "inquire", 50)
    assert got == pytest.approx({"mAP@50": 0.75, "nDCG@50": 0.75, "MRR": 0.75})
    with pytest.raises(ValueError, match="relevant candidates"):
        best_possible_metrics([4], [3], 10, "ilias", 10)


def test_full_pool_best_possible_on_a_hand_made_case():
    # three queries with 4 candidates each, k = 3:
    #   2 relevant, P = 3 -> [1, 1, 0, 0]: AP = 2/3, nDCG = (1 + 1/log2 3) / (1 + 1/log2 3 + 1/2)
    #   1 relevant, P = 1 -> [1, 0, 0, 0]: everything 1
    #   0 relevant, P = 5 -> nothing can be found: 0
    got = best_possible_metrics([2, 1, 0], [3, 1, 5], 4, "inquire_full_pool", 3)
    ndcg_first = (1 + 1 / np.log2(3)) / (1 + 1 / np.log2(3) + 1 / 2)
    assert got == pytest.approx({"mAP@3": (2 / 3 + 1 + 0) / 3, "nDCG@3": (ndcg_first + 1) / 3,
                                 "MRR": 2 / 3})
    # no ordering of the candidates does better (every arrangement of the first query)
    import itertools
    for order in set(itertools.permutations([1, 1, 0, 0])):
        assert metrics.inquire_rerank_fullpool_metrics([order], [3], k=3)["mAP"] <= 2 / 3 + 1e-12
    with pytest.raises(ValueError, match="5 relevant candidates in a shortlist of 4"):
        best_possible_metrics([5], [9], 4, "inquire_full_pool", 50)


def test_best_possible_row_comes_from_the_backbone_evaluation():
    extra = {"relevant_in_shortlist": [2, 0], "num_positives": [4, 1]}
    evs = [evaluation("identity", "identity", "syn", data="synthetic", gallery=6000,
                      rerank_extra=extra),
           evaluation("quari", "quari", "syn", data="synthetic", gallery=6000, rerank_extra=extra)]
    table = build_table(evaluation_rows(evs), PAPER, "3")
    best = table[table["method"] == "best_possible"]
    assert len(best) == 1 and best.iloc[0]["setting"] == "i2i@6000 rerank top-1k"
    assert best.iloc[0]["value"] == pytest.approx(100 * (2 / 4 + 0) / 2)
    assert pd.isna(best.iloc[0]["ms_per_1k_pairs"])


def test_markdown_shows_ours_and_paper_in_paper_order(tmp_path):
    evs = [evaluation("quari", "quari", "siglip-vit-l16@384", i2i=0.291),
           evaluation("identity", "identity", "siglip-vit-l16@384", i2i=0.196)]
    full = write_table(evaluation_rows(evs), PAPER, "3", tmp_path / "t.csv", tmp_path / "t.md", "r")
    md = (tmp_path / "t.md").read_text()
    assert "29.1 (29.1)" in md and "Table 3a" in md and "ms / 1k pairs" in md
    lines = [line for line in md.splitlines() if "(initial ranking; inferred)" in line]
    assert [line.split(" | ")[1] for line in lines] == [
        "initial ranking", "α-QE (n=1) †", "α-QE (n=2) †", "α-QE (n=5) †", "Chamfer similarity †",
        "spatial verification †", "AMES †", "QuARI"]
    again = pd.read_csv(tmp_path / "t.csv")
    assert list(again.columns) == list(full.columns) and len(again) == len(full)
    assert (full.loc[full["data"] == "real", "run_id"] == "r").all()


def test_old_entry_points_still_work():
    rows = evaluation_rows([evaluation("identity", "identity", "x", data="synthetic")])
    for name, parts in TABLE_PARTS.items():
        reported = paper_only_rows(PAPER, parts, build_table(rows, PAPER, name))
        assert len(reported) == PAPER["table"].isin(parts).sum()
    assert "Table 1a" in to_markdown(build_table(rows, PAPER, "1"), "Table 1")


def test_reranking_methods_appear_only_in_the_reranking_table():
    rows = evaluation_rows([evaluation("alpha_qe2", "alpha_qe", "syn-b256", data="synthetic"),
                            evaluation("quari", "quari", "syn-b256", data="synthetic")])
    assert set(rows.loc[rows["mode"] == "search", "method"]) == {"quari"}
    assert set(rows.loc[rows["mode"] == "rerank", "method"]) == {"alpha_qe2", "quari"}
