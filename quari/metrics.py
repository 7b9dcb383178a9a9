"""The official retrieval metrics of ILIAS and INQUIRE.

All values are fractions in [0, 1] (tables multiply AP and nDCG by 100, MRR is kept as is).

The official code of both benchmarks (``ilias/evaluation/src/dataset.py`` and
``INQUIRE/src/metrics.py``) computes AP with ``sklearn.metrics.average_precision_score`` on the
top-k scores and rescales it by ``hits / min(k, P)``; that is exactly

    AP@k = (1 / min(k, P)) * sum over relevant ranks i <= k of precision@i

when scores are distinct. When scores tie, scikit-learn treats a tied group as one threshold; pass
``scores`` to reproduce that behaviour bit for bit. ``relevance`` is always the 0/1 sequence in
ranked order (best first).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

__all__ = [
    "average_precision_at_k",
    "ndcg_at_k",
    "reciprocal_rank",
    "relevance_of",
    "ilias_map_at_k",
    "ilias_map_of_relevance",
    "inquire_metrics",
    "inquire_metrics_of_relevance",
    "inquire_rerank_metrics",
    "inquire_rerank_fullpool_metrics",
]


def _as_relevance(relevance) -> np.ndarray:
    rel = np.asarray(relevance, dtype=np.float64).reshape(-1)
    if rel.size and not np.isin(rel, (0.0, 1.0)).all():
        raise ValueError("relevance must be a 0/1 sequence in ranked order")
    return rel


def _tie_groups(scores: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal scores (scores sorted descending)."""
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(np.diff(scores) != 0)
    return np.concatenate([change, [scores.size - 1]])


def average_precision_at_k(relevance, num_positives: int, k: int, scores=None) -> float:
    """AP@k as ILIAS and INQUIRE define it: precision summed at relevant ranks <= k, / min(k, P).

    ``num_positives`` (P) counts every positive of the query in the whole pool, retrieved or not,
    so missed positives lower the AP. With P = 0 the AP is 0 (nothing can be found). ``scores``,
    if given, are the ranking scores in the same (descending) order: tied items then share one
    precision value, as scikit-learn's ``average_precision_score`` (used by the official code) does.
    """
    rel = _as_relevance(relevance)[:k]
    if num_positives <= 0 or k <= 0 or rel.sum() == 0:
        return 0.0
    hits = np.cumsum(rel)
    if scores is None:
        precision_sum = float((hits / np.arange(1, rel.size + 1))[rel == 1].sum())
    else:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)[:k]
        if s.size != rel.size:
            raise ValueError("scores and relevance must have the same length")
        if np.any(np.diff(s) > 0):
            raise ValueError("scores must be sorted in descending order")
        ends = _tie_groups(s)
        group_hits = hits[ends]
        new_hits = np.diff(np.concatenate([[0.0], group_hits]))
        precision_sum = float((new_hits * group_hits / (ends + 1)).sum())
    return precision_sum / min(k, num_positives)


def ndcg_at_k(relevance, num_positives: int, k: int) -> float:
    """nDCG@k with binary gains and a log2 discount, as INQUIRE computes it.

    Positives that were not retrieved count as ranked after the list, so the ideal DCG has
    min(k, P) hits. With P = 0 the value is 0.
    """
    rel = _as_relevance(relevance)[:k]
    if num_positives <= 0 or k <= 0:
        return 0.0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((rel * discounts[: rel.size]).sum())
    ideal = float(discounts[: min(k, num_positives)].sum())
    return dcg / ideal


def reciprocal_rank(relevance) -> float:
    """1 / rank of the first relevant item, 0 if the list holds none."""
    rel = _as_relevance(relevance)
    hit = np.flatnonzero(rel == 1)
    return 0.0 if hit.size == 0 else 1.0 / (hit[0] + 1)


def relevance_of(ranked_ids: Sequence, positives: Collection) -> np.ndarray:
    """The 0/1 relevance sequence of a ranked id list against a set of positive ids."""
    positives = positives if isinstance(positives, (set, frozenset)) else set(positives)
    return np.fromiter((1.0 if i in positives else 0.0 for i in ranked_ids), dtype=np.float64,
                       count=len(ranked_ids))


def _check_lengths(ranked_ids, positives):
    if len(ranked_ids) != len(positives):
        raise ValueError(f"{len(ranked_ids)} ranked lists but {len(positives)} positive sets")


def ilias_map_at_k(ranked_ids: Sequence[Sequence], positives: Sequence[Collection], k: int = 1000,
                   scores: Sequence[Sequence[float]] | None = None) -> float:
    """ILIAS mAP@k: the mean over queries (not instances) of AP@k, P = all positives of the query.

    ``ranked_ids[q]`` is query q's ranking (best first, at least its top k), ``positives[q]`` its
    positive database ids. A query with no positives contributes AP 0, as in the official code.
    """
    _check_lengths(ranked_ids, positives)
    return ilias_map_of_relevance([relevance_of(ids[:k], pos) for ids, pos in
                                   zip(ranked_ids, positives)],
                                  [len(pos) for pos in positives], k, scores)


def ilias_map_of_relevance(relevance: Sequence[Sequence[float]], num_positives: Sequence[int],
                           k: int = 1000, scores: Sequence[Sequence[float]] | None = None
                           ) -> float:
    """:func:`ilias_map_at_k` from each query's 0/1 relevance in ranked order and its number of
    positives P (a ranking of gallery rows scored against the rows of its positives)."""
    _check_lengths(relevance, num_positives)
    if not len(relevance):
        raise ValueError("no queries to evaluate")
    aps = [average_precision_at_k(rel, p, k, None if scores is None else scores[q])
           for q, (rel, p) in enumerate(zip(relevance, num_positives))]
    return float(np.mean(aps))


def inquire_metrics(ranked_ids: Sequence[Sequence], positives: Sequence[Collection], k: int = 50
                    ) -> dict[str, float]:
    """INQUIRE-Fullrank: mean AP@k, nDCG@k and MRR over queries; P = all positives in the pool.

    MRR is computed over the retrieved top k, as the official code does on the top-k list.
    """
    _check_lengths(ranked_ids, positives)
    return inquire_metrics_of_relevance([relevance_of(list(ids)[:k], pos) for ids, pos in
                                         zip(ranked_ids, positives)],
                                        [len(pos) for pos in positives], k)


def inquire_metrics_of_relevance(relevance: Sequence[Sequence[float]],
                                 num_positives: Sequence[int], k: int = 50) -> dict[str, float]:
    """:func:`inquire_metrics` from each query's 0/1 relevance in ranked order and its P."""
    _check_lengths(relevance, num_positives)
    if not len(relevance):
        raise ValueError("no queries to evaluate")
    ap, ndcg, rr = [], [], []
    for rel, p in zip(relevance, num_positives):
        rel = _as_relevance(rel)[:k]
        ap.append(average_precision_at_k(rel, p, k))
        ndcg.append(ndcg_at_k(rel, p, k))
        rr.append(reciprocal_rank(rel))
    return {"mAP": float(np.mean(ap)), "nDCG": float(np.mean(ndcg)), "MRR": float(np.mean(rr))}


def inquire_rerank_metrics(ranked_relevance: Sequence[Sequence[int]]) -> dict[str, float]:
    """INQUIRE-Rerank: every query's whole candidate list (100) is ranked and scored.

    ``ranked_relevance[q]`` is the 0/1 relevance of query q's candidates in the new order. k is the
    list length and P the number of relevant candidates, so AP is plain AP over the list (the
    benchmark's website calls it AP@50); nDCG likewise; MRR over the list.
    """
    if not ranked_relevance:
        raise ValueError("no queries to evaluate")
    ap, ndcg, rr = [], [], []
    for rel in ranked_relevance:
        rel = _as_relevance(rel)
        p = int(rel.sum())
        ap.append(average_precision_at_k(rel, p, rel.size))
        ndcg.append(ndcg_at_k(rel, p, rel.size))
        rr.append(reciprocal_rank(rel))
    return {"mAP": float(np.mean(ap)), "nDCG": float(np.mean(ndcg)), "MRR": float(np.mean(rr))}


def inquire_rerank_fullpool_metrics(ranked_relevance: Sequence[Sequence[int]],
                                    num_positives: Sequence[int], k: int = 50,
                                    query_ids: Sequence[str] | None = None) -> dict[str, float]:
    """INQUIRE-Rerank's candidate lists scored the Fullrank way: mean AP@k, nDCG@k and MRR with
    P = every positive of the query in the whole iNat24 pool (the Fullrank annotations).

    This is how the INQUIRE repository scores a re-ranked shortlist in two-stage retrieval
    (``src/eval_fullrank_two_stage.py``: re-rank a CLIP top-100, keep the top k = 50, pass
    ``count_pos`` = all annotated positives), and what the QuARI paper's Table 3b column
    reports, as its "best possible" row (65.6 mAP@50, not 100) shows: positives outside the
    candidates can never be found (``quari.reporting.tables.best_possible_metrics``).

    ``ranked_relevance[q]`` is query q's 0/1 relevance of its candidates in the new order,
    ``num_positives[q]`` its P. AP@k divides by min(k, P), the ideal DCG counts min(k, P) hits
    and MRR looks at the top k, as that script does. ``query_ids`` only name queries in errors.
    A query with P = 0, or with more relevant candidates than P, is an error: its labels and
    its count disagree (a wrong join between Rerank and Fullrank queries).
    """
    if not ranked_relevance:
        raise ValueError("no queries to evaluate")
    if len(ranked_relevance) != len(num_positives):
        raise ValueError(f"{len(ranked_relevance)} ranked lists but {len(num_positives)} "
                         "positive counts")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    ap, ndcg, rr = [], [], []
    for q, (rel, positives) in enumerate(zip(ranked_relevance, num_positives)):
        rel = _as_relevance(rel)
        name = repr(query_ids[q]) if query_ids is not None else f"#{q}"
        if positives <= 0:
            raise ValueError(f"query {name}: no positives in the pool (P = {positives})")
        if rel.sum() > positives:
            raise ValueError(f"query {name}: {int(rel.sum())} relevant candidates but only "
                             f"{positives} positives in the pool")
        ap.append(average_precision_at_k(rel, positives, k))
        ndcg.append(ndcg_at_k(rel, positives, k))
        rr.append(reciprocal_rank(rel[:k]))
    return {"mAP": float(np.mean(ap)), "nDCG": float(np.mean(ndcg)), "MRR": float(np.mean(rr))}
