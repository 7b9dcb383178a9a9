"""quari.evaluation: full-gallery ranking against a brute-force reference, query batching."""

import numpy as np
import pytest

from baselines.identity import Identity
from quari import metrics
from quari.evaluation import RetrievalTask, evaluate_search
from quari.store import EmbeddingSet


class CountingGallery(np.ndarray):
    """A gallery array that counts how often its first row is read (one read per pass)."""

    passes = 0

    def __getitem__(self, index):
        if isinstance(index, slice) and (index.start or 0) == 0:
            CountingGallery.passes += 1
        return super().__getitem__(index)


def random_task(rng, queries=10, gallery=300, dim=16):
    g = rng.standard_normal((gallery, dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gids = [f"g{i}" for i in range(gallery)]
    qids = [f"q{i}" for i in range(queries)]
    # positives among each query's nearest rows, so that AP is far from zero
    near = np.argsort(-(q @ g.T), axis=1)[:, :40]
    positives = {qid: {gids[j] for j in rng.choice(near[n], 4, replace=False)}
                 for n, qid in enumerate(qids)}
    return q, g, qids, gids, positives


@pytest.mark.parametrize("query_batch", [1, 3, 64])
def test_search_metrics_equal_brute_force_at_any_query_batch(query_batch):
    rng = np.random.default_rng(0)
    q, g, qids, gids, positives = random_task(rng)
    gallery = g.view(CountingGallery)
    CountingGallery.passes = 0
    task = RetrievalTask("i2i", EmbeddingSet(q, qids), EmbeddingSet(gallery, gids), positives)
    result = evaluate_search(Identity(device="cpu"), task, "ilias", k=50, chunk_rows=64,
                             query_batch=query_batch)
    ranked = [[gids[j] for j in np.argsort(-(g @ row), kind="stable")[:50]] for row in q]
    expected = metrics.ilias_map_at_k(ranked, [positives[i] for i in qids], 50)
    assert result["metrics"]["mAP@50"] == pytest.approx(expected, abs=1e-9)
    # each batch of queries streams the gallery once
    assert CountingGallery.passes == -(-len(qids) // query_batch)


@pytest.mark.parametrize("benchmark,k", [("ilias", 30), ("inquire", 20)])
def test_memory_mapped_ids_score_like_the_id_lists(tmp_path, benchmark, k):
    """A gallery loaded with memory-mapped ids (positives found as rows once) scores exactly as
    ranking ids against positive-id sets does; positives absent from the gallery still count
    in P, and the re-ranking path agrees too."""
    from quari.evaluation import evaluate_rerank
    from quari.store import IdColumn, load_embedding_set, save_embedding_set

    rng = np.random.default_rng(3)
    q, g, qids, gids, positives = random_task(rng, queries=7, gallery=250)
    positives[qids[0]] = positives[qids[0]] | {"not-in-the-gallery"}
    save_embedding_set(tmp_path / "g", g, gids, shard_rows=100)
    gallery = load_embedding_set(tmp_path / "g")
    assert isinstance(gallery.ids, IdColumn)
    mapped = RetrievalTask("i2i", EmbeddingSet(q, qids), gallery, positives)
    listed = RetrievalTask("i2i", EmbeddingSet(q, qids), EmbeddingSet(np.asarray(gallery.embeddings), gids),
                           positives)
    method = Identity(device="cpu")
    got = evaluate_search(method, mapped, benchmark, k=k, chunk_rows=64)["metrics"]
    ranked = [[gids[j] for j in np.argsort(-(g.astype(np.float16).astype(np.float64) @ row),
                                           kind="stable")[:k]] for row in q]
    truth = [positives[i] for i in qids]
    if benchmark == "ilias":
        assert got[f"mAP@{k}"] == pytest.approx(metrics.ilias_map_at_k(ranked, truth, k), abs=1e-9)
    else:
        ref = metrics.inquire_metrics(ranked, truth, k)
        assert got == pytest.approx({f"mAP@{k}": ref["mAP"], f"nDCG@{k}": ref["nDCG"],
                                     "MRR": ref["MRR"]}, abs=1e-9)
    assert evaluate_search(method, listed, benchmark, k=k, chunk_rows=64)["metrics"] == got
    a = evaluate_rerank(method, mapped, benchmark, shortlist=40, k=k, chunk_rows=64)
    b = evaluate_rerank(method, listed, benchmark, shortlist=40, k=k, chunk_rows=64)
    assert a["metrics"] == b["metrics"]
    assert a["relevant_in_shortlist"] == b["relevant_in_shortlist"]
    assert a["num_positives"] == b["num_positives"] == [len(positives[i]) for i in qids]
