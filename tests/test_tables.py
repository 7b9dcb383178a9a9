"""Table assembly: paper values attached to the right rows, deltas, synthetic rows never compared."""

import pandas as pd
import pytest

from quari.tables import build_table, evaluation_rows, paper_only_rows, size_label, to_markdown

from .conftest import ROOT

PAPER = pd.read_csv(ROOT / "workflow/resources/paper_numbers.csv")


def evaluation(method, method_type, backbone, benchmark="ilias", data="real", gallery=100_000_000,
               i2i=0.1, t2i=0.2):
    search = lambda v, k: {"metrics": {k: v}, "gallery_size": gallery, "ms_per_1k_pairs": 1.0,  # noqa: E731
                           "shortlist": "all"}
    rerank = lambda v, k: {"metrics": {k: v}, "shortlist": 1000, "ms_per_1k_pairs": 2.0}  # noqa: E731
    tasks = ({"i2i": {"search": search(i2i, "mAP@1k"), "rerank": rerank(i2i, "mAP@1k")},
              "t2i": {"search": search(t2i, "mAP@1k"), "rerank": rerank(t2i, "mAP@1k")}}
             if benchmark == "ilias" else
             {"t2i": {"search": {"metrics": {"mAP@50": i2i, "nDCG@50": t2i, "MRR": 0.5},
                                 "gallery_size": gallery, "ms_per_1k_pairs": 1.0, "shortlist": "all"},
                      "rerank": {"metrics": {"mAP@50": i2i, "nDCG@50": t2i, "MRR": 0.5},
                                 "shortlist": 100, "ms_per_1k_pairs": 2.0}}})
    return {"run_id": "r", "data": data, "benchmark": benchmark, "backbone": backbone,
            "method": method, "method_type": method_type, "gallery_size": gallery, "tasks": tasks}


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


def test_synthetic_rows_are_labelled_and_never_compared():
    evs = [evaluation("identity", "identity", "clip-vit-b16@224", data="synthetic", gallery=6250)]
    table = build_table(evaluation_rows(evs), PAPER, "1")
    assert table["paper_value"].isna().all()
    assert (table["benchmark"] == "ilias (synthetic)").all()
    assert set(table["setting"]) == {"i2i@6250", "t2i@6250"}


def test_every_paper_row_is_present_once_measured_or_reported():
    for name, tables in (("1", ["1a", "1b"]), ("2", ["2"]), ("3", ["3a", "3b"])):
        empty = build_table(evaluation_rows([evaluation("identity", "identity", "x", data="synthetic")]),
                            PAPER, name)
        reported = paper_only_rows(PAPER, tables, empty)
        assert len(reported) == (PAPER["table"].isin(tables)).sum()
        assert reported["paper_value"].notna().all()


def test_rerank_rows_go_to_table3_with_paper_names():
    evs = [evaluation("identity", "identity", "siglip-vit-l16@384 (initial ranking; inferred)",
                      i2i=0.196)]
    rows = evaluation_rows(evs)
    table = build_table(rows, PAPER, "3")
    init = table[table["method"] == "initial_ranking"]
    assert len(init) == 1 and init.iloc[0]["table"] == "3a"  # only I2I re-ranking is in Table 3a
    assert init.iloc[0]["paper_value"] == pytest.approx(19.6)
    assert init.iloc[0]["delta"] == pytest.approx(0.0)


def test_markdown_shows_ours_and_paper():
    evs = [evaluation("quari", "quari", "clip-vit-b16@224", i2i=0.09)]
    md = to_markdown(build_table(evaluation_rows(evs), PAPER, "1"), "Table 1")
    assert "9 (8.4)" in md and "Table 1a" in md
