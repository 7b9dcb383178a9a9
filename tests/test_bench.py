"""The benchmarks run end to end on tiny inputs (their numbers are printed, never asserted on
time; here only what they check: the pruned search's agreement with the full path)."""

import numpy as np
import pytest
import torch

from quari.bench import evaluation_memory, topk_speed


def test_topk_speed_random_maps_agree_with_the_full_path(capsys):
    out = topk_speed.main(["--rows", "3000", "--dim", "32", "--rank", "4", "--k", "20",
                           "--chunk-rows", "1000", "--batches", "1", "3", "--maps", "random",
                           "--threads", "1", "--dense-rows", "500"])
    assert set(out) == {"random/B=1", "random/B=3"}
    for r in out.values():
        assert r["same_id_sets"] == 1.0 and r["max_score_diff"] < 1e-5
        assert 0 < r["rescored"] <= 1
    assert "pruned vs dense E x E" in capsys.readouterr().out


def test_topk_speed_flat_maps_take_the_full_path():
    out = topk_speed.main(["--rows", "2000", "--dim", "48", "--k", "10", "--chunk-rows", "700",
                           "--batches", "2", "--maps", "flat", "--threads", "1"])
    r = out["flat/B=2"]
    assert r["bounded_queries"] == 0 and r["rescored"] == 1  # no useful bounds: every row
    assert r["same_id_sets"] == 1.0 and r["max_score_diff"] < 1e-5
    quick = topk_speed.main(["--rows", "2000", "--dim", "48", "--k", "10", "--batches", "2",
                             "--maps", "flat", "--threads", "1", "--no-full"])
    assert quick["flat/B=2"]["pruned_s"] > 0 and np.isnan(quick["flat/B=2"]["full_s"])


@pytest.mark.slow
def test_topk_speed_trained_maps_from_a_checkpoint(tmp_path):
    from quari.checkpoint import save_pretrained
    from quari.model import QuARI, QuARIConfig
    torch.manual_seed(0)
    save_pretrained(QuARI(QuARIConfig(embedding_dim=160, hidden_dim=16, nhead=2, num_layers=1,
                                      num_steps=1, rank=4, dropout=0.0)), tmp_path / "m")
    out = topk_speed.main(["--rows", "2000", "--dim", "160", "--k", "10", "--chunk-rows", "700",
                           "--batches", "2", "--maps", "trained", "--checkpoint",
                           str(tmp_path / "m"), "--threads", "1"])
    assert out["trained/B=2"]["same_id_sets"] == 1.0


@pytest.mark.slow
def test_evaluation_memory_runs_before_and_after(tmp_path):
    out = evaluation_memory.main(["--rows", "2500", "--shard-rows", "1000", "--dim", "8",
                                  "--queries", "4", "--query-batch", "2", "--k", "10",
                                  "--dir", str(tmp_path)])
    assert [(r["rows"], r["scenario"], r["ids"]) for r in out] == [
        (1000, "after", "IdColumn"), (1000, "before", "list"),
        (2500, "after", "IdColumn"), (2500, "before", "list")]
    # the same rankings and metrics whichever way the ids are held
    assert out[0]["metric"] == out[1]["metric"] and out[2]["metric"] == out[3]["metric"]


def test_training_step_bench_times_two_forms_of_one_function(capsys):
    from quari.bench import training_step
    out = training_step.main(["--dim", "48", "--hidden", "16", "--heads", "2", "--rank", "4",
                              "--batch", "12", "--steps", "2", "--repeats", "1"])
    assert out["ms_per_step_dense"] > 0 and out["ms_per_step_bases"] > 0
    assert out["loss_diff"] < 1e-5 and out["grad_diff"] < 1e-5
    assert "ratio (R^E / bases)" in capsys.readouterr().out
