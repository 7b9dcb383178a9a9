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
