"""The metrics against the benchmarks' official formulas (scikit-learn based) and known values."""

import numpy as np
import pytest
import sklearn.metrics

from quari import metrics


def official_ap_at_k(y_true, y_score, count_pos, k):
    """The official ILIAS/INQUIRE AP: sklearn AP of the top k, rescaled by hits / min(k, P)."""
    y_true, y_score = np.asarray(y_true)[:k], np.asarray(y_score)[:k]
    if y_true.sum() == 0:
        return 0.0
    return sklearn.metrics.average_precision_score(y_true, y_score) * y_true.sum() / min(count_pos, k)


def official_ndcg_at_k(y_true, y_score, count_pos, k):
    missing = int(count_pos - np.sum(y_true))
    t = list(y_true) + [1] * missing
    s = list(y_score) + [-100] * missing
    return sklearn.metrics.ndcg_score([t], [s], k=k)


def test_known_values():
    # relevant at ranks 1 and 3, P = 2: (1/1 + 2/3) / 2
    assert metrics.average_precision_at_k([1, 0, 1, 0], 2, 10) == pytest.approx((1 + 2 / 3) / 2)
    # a third positive never retrieved lowers AP: / min(k, P) = 3
    assert metrics.average_precision_at_k([1, 0, 1, 0], 3, 10) == pytest.approx((1 + 2 / 3) / 3)
    # k smaller than P: normalise by k
    assert metrics.average_precision_at_k([1, 1, 0], 10, 2) == pytest.approx(1.0)
    assert metrics.reciprocal_rank([0, 0, 1, 1]) == pytest.approx(1 / 3)
    assert metrics.reciprocal_rank([0, 0]) == 0.0
    assert metrics.ndcg_at_k([1, 1], 2, 2) == pytest.approx(1.0)
    assert metrics.ndcg_at_k([0, 1], 1, 2) == pytest.approx(1 / np.log2(3))


def test_empty_and_degenerate():
    assert metrics.average_precision_at_k([], 3, 10) == 0.0
    assert metrics.average_precision_at_k([0, 0], 0, 10) == 0.0
    assert metrics.ndcg_at_k([0, 0], 0, 10) == 0.0
    assert metrics.reciprocal_rank([]) == 0.0
    with pytest.raises(ValueError):
        metrics.average_precision_at_k([2, 0], 1, 5)


@pytest.mark.parametrize("seed", range(20))
def test_against_official_formula_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    y_true = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
    y_score = np.sort(rng.standard_normal(n))[::-1]  # distinct scores, ranked order
    extra = int(rng.integers(0, 5))
    count_pos = int(y_true.sum()) + extra
    for k in (1, 5, 50, 1000):  # k larger than the list included
        if count_pos == 0:
            continue
        ours = metrics.average_precision_at_k(y_true, count_pos, k)
        assert ours == pytest.approx(official_ap_at_k(y_true, y_score, count_pos, k), abs=1e-12)
        if y_true[:k].sum() > 0 and k <= n:
            ours_ndcg = metrics.ndcg_at_k(y_true[:k], count_pos, k)
            assert ours_ndcg == pytest.approx(
                official_ndcg_at_k(y_true[:k], y_score[:k], count_pos, k), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_ties_match_sklearn_grouping(seed):
    rng = np.random.default_rng(100 + seed)
    n = 60
    y_score = np.sort(rng.integers(0, 8, n).astype(float))[::-1]  # many ties
    y_true = (rng.random(n) < 0.3).astype(int)
    if y_true.sum() == 0:
        y_true[0] = 1
    count_pos = int(y_true.sum()) + 2
    for k in (10, 60):
        ours = metrics.average_precision_at_k(y_true, count_pos, k, scores=y_score)
        assert ours == pytest.approx(official_ap_at_k(y_true, y_score, count_pos, k), abs=1e-12)


def test_ilias_map_is_mean_over_queries():
    ranked = [["a", "x", "b"], ["y", "c"], ["z"]]
    positives = [{"a", "b"}, {"c", "d"}, set()]
    expected = np.mean([(1 + 2 / 3) / 2, (1 / 2) / 2, 0.0])
    assert metrics.ilias_map_at_k(ranked, positives, k=1000) == pytest.approx(expected)
    # only the top k count
    assert metrics.ilias_map_at_k([["x", "a"]], [{"a"}], k=1) == 0.0
    with pytest.raises(ValueError):
        metrics.ilias_map_at_k(ranked, positives[:2])


def test_inquire_rerank_verified_shape():
    # Rerank: P = relevant among the candidates, AP over the whole list.
    rel = [[1, 0, 1, 0], [0, 0, 0, 1]]
    out = metrics.inquire_rerank_metrics(rel)
    assert out["mAP"] == pytest.approx(np.mean([(1 + 2 / 3) / 2, 1 / 4]))
    assert out["MRR"] == pytest.approx(np.mean([1, 1 / 4]))
    # a perfect ranking scores 1 on every metric
    perfect = metrics.inquire_rerank_metrics([[1, 1, 0, 0]])
    assert perfect == pytest.approx({"mAP": 1.0, "nDCG": 1.0, "MRR": 1.0})


def test_inquire_fullrank_counts_missed_positives():
    out = metrics.inquire_metrics([["a", "x"]], [{"a", "b", "c"}], k=2)
    assert out["mAP"] == pytest.approx(1 / 2)  # one hit at rank 1, / min(2, 3)
    assert out["nDCG"] == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert out["MRR"] == pytest.approx(1.0)


# ---- INQUIRE-Rerank scored against every positive in the pool (the paper's Table 3b) ----------

def brute_force_full_pool(ranked_relevance, num_positives, k):
    """AP@k, nDCG@k and MRR@k per query written out from their definitions, then averaged."""
    aps, ndcgs, rrs = [], [], []
    for rel, p in zip(ranked_relevance, num_positives):
        hits, precision_sum, dcg, rr = 0, 0.0, 0.0, 0.0
        for rank in range(1, min(k, len(rel)) + 1):
            if rel[rank - 1]:
                hits += 1
                precision_sum += hits / rank
                dcg += 1 / np.log2(rank + 1)
                rr = rr or 1 / rank
        ideal = sum(1 / np.log2(rank + 1) for rank in range(1, min(k, p) + 1))
        aps.append(precision_sum / min(k, p))
        ndcgs.append(dcg / ideal)
        rrs.append(rr)
    return {"mAP": np.mean(aps), "nDCG": np.mean(ndcgs), "MRR": np.mean(rrs)}


@pytest.mark.parametrize("seed", range(10))
def test_full_pool_rerank_metrics_against_the_definitions(seed):
    rng = np.random.default_rng(300 + seed)
    lists, counts = [], []
    for _ in range(6):
        rel = (rng.random(100) < rng.uniform(0.0, 0.5)).astype(int)
        lists.append(rel)
        # P from "only the relevant candidates" to far more than k (most positives missed)
        counts.append(max(1, int(rel.sum()) + int(rng.choice([0, 3, 40, 900]))))
    for k in (10, 50, 100):
        got = metrics.inquire_rerank_fullpool_metrics(lists, counts, k=k)
        assert got == pytest.approx(brute_force_full_pool(lists, counts, k), abs=1e-12)
        # and the official scikit-learn formulas of the INQUIRE repository on the top k
        scores = np.linspace(1, 0, 100)
        official = [official_ap_at_k(r, scores, p, k) for r, p in zip(lists, counts)]
        assert got["mAP"] == pytest.approx(np.mean(official), abs=1e-12)
        for r, p in zip(lists, counts):
            if r[:k].sum() > 0:  # sklearn's nDCG is undefined without a hit
                one = metrics.inquire_rerank_fullpool_metrics([r], [p], k=k)
                assert one["nDCG"] == pytest.approx(
                    official_ndcg_at_k(r[:k], scores[:k], p, k), abs=1e-12)


def test_full_pool_rerank_known_values_and_p_larger_than_k():
    # relevant at ranks 1 and 3 of 4 candidates; 10 positives in the pool, k = 2:
    # AP@2 = (1/1) / min(2, 10); nDCG@2 = 1 / (1 + 1/log2(3)); MRR = 1
    got = metrics.inquire_rerank_fullpool_metrics([[1, 0, 1, 0]], [10], k=2)
    assert got == pytest.approx({"mAP": 0.5, "nDCG": 1 / (1 + 1 / np.log2(3)), "MRR": 1.0})
    # the same list with P = 2: the official Rerank scoring over the whole list (k = 4)
    assert metrics.inquire_rerank_fullpool_metrics([[1, 0, 1, 0]], [2], k=4) == pytest.approx(
        metrics.inquire_rerank_metrics([[1, 0, 1, 0]]))
    # a first hit beyond k gives no reciprocal rank (the top k is what is kept)
    assert metrics.inquire_rerank_fullpool_metrics([[0, 0, 1]], [1], k=2)["MRR"] == 0.0
    # only the order of the 0/1 relevance matters: what lies beyond k never counts
    a = metrics.inquire_rerank_fullpool_metrics([[1, 0, 1, 1, 1]], [9], k=3)
    b = metrics.inquire_rerank_fullpool_metrics([[1, 0, 1, 0, 0]], [9], k=3)
    assert a == b


def test_full_pool_rerank_rejects_counts_that_disagree_with_the_labels():
    with pytest.raises(ValueError, match="'q1': 3 relevant candidates but only 2 positives"):
        metrics.inquire_rerank_fullpool_metrics([[1, 0], [1, 1, 1]], [5, 2], k=50,
                                                query_ids=["q0", "q1"])
    with pytest.raises(ValueError, match="no positives in the pool"):
        metrics.inquire_rerank_fullpool_metrics([[0, 0]], [0])
    with pytest.raises(ValueError, match="2 ranked lists but 1 positive counts"):
        metrics.inquire_rerank_fullpool_metrics([[1], [1]], [1])
    with pytest.raises(ValueError, match="no queries"):
        metrics.inquire_rerank_fullpool_metrics([], [])
    # P smaller than the list but not than its relevant candidates is fine
    assert metrics.inquire_rerank_fullpool_metrics([[0, 1, 0, 0]], [1], k=4)["mAP"] == 0.5
