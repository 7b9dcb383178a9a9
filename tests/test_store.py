"""On-disk formats: round trips, sharding, resumable writing, refusal of incomplete sets."""

import numpy as np
import pytest

from quari.store import (EmbeddingSetWriter, iter_shards, load_embedding_set, load_positives,
                         load_training_collection, save_embedding_set, save_positives,
                         save_training_collection)

from .conftest import random_collection


def test_embedding_set_round_trip_with_shards(tmp_path, rng):
    emb = rng.standard_normal((25, 8)).astype(np.float32)
    ids = [f"id{i}" for i in range(25)]
    save_embedding_set(tmp_path / "set", emb, ids, shard_rows=10)
    assert len(list(iter_shards(tmp_path / "set"))) == 3
    loaded = load_embedding_set(tmp_path / "set")
    assert loaded.ids == ids
    assert loaded.embeddings.dtype == np.float16
    np.testing.assert_allclose(loaded.embeddings, emb, atol=2e-3)


def test_incomplete_set_is_refused_and_resumes(tmp_path, rng):
    writer = EmbeddingSetWriter(tmp_path / "set", dim=4)
    writer.add_shard(rng.standard_normal((3, 4)), ["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="not a complete embedding set"):
        load_embedding_set(tmp_path / "set")
    # a new writer (a restarted job) sees the completed shard and continues after it
    again = EmbeddingSetWriter(tmp_path / "set", dim=4)
    assert again.completed_rows == 3
    again.add_shard(rng.standard_normal((2, 4)), ["d", "e"])
    again.close()
    assert load_embedding_set(tmp_path / "set").ids == ["a", "b", "c", "d", "e"]


def test_shard_shape_and_id_checks(tmp_path, rng):
    writer = EmbeddingSetWriter(tmp_path / "set", dim=4)
    with pytest.raises(ValueError):
        writer.add_shard(rng.standard_normal((3, 5)), ["a", "b", "c"])
    with pytest.raises(ValueError):
        writer.add_shard(rng.standard_normal((3, 4)), ["a", "b"])
    with pytest.raises(ValueError):
        writer.add_shard(rng.standard_normal((1, 4)), ["a\nb"])


def test_training_collection_and_positives_round_trip(tmp_path, rng):
    coll = random_collection(rng)
    save_training_collection(tmp_path / "c", coll)
    again = load_training_collection(tmp_path / "c")
    assert again.images.ids == coll.images.ids
    np.testing.assert_array_equal(again.caption_image, coll.caption_image)
    np.testing.assert_array_equal(again.image_labels, coll.image_labels)
    save_positives(tmp_path / "gt.json", {"q1": ["b", "a"], "q2": []})
    assert load_positives(tmp_path / "gt.json") == {"q1": {"a", "b"}, "q2": set()}


def test_a_sharded_set_loads_as_a_view_that_reads_like_the_concatenation(tmp_path, rng):
    """Several shards are never concatenated on load; slices, rows and gathers of the view equal
    those of the concatenated array, and a streaming search and a re-ranking over it agree."""
    import torch

    from baselines import get_method
    from quari.scoring import cosine_topk
    from quari.store import ShardedRows

    x = rng.standard_normal((23, 6)).astype(np.float16)
    writer = EmbeddingSetWriter(tmp_path / "set", dim=6)
    for start in range(0, 23, 5):
        writer.add_shard(x[start:start + 5], [f"r{i}" for i in range(start, min(start + 5, 23))])
    writer.close()
    loaded = load_embedding_set(tmp_path / "set")
    rows = loaded.embeddings
    assert isinstance(rows, ShardedRows) and rows.shape == (23, 6) and len(loaded.ids) == 23
    for sl in (slice(0, 23), slice(3, 17), slice(4, 5), slice(20, 40), slice(7, 7), slice(1, 20, 3)):
        np.testing.assert_array_equal(rows[sl], x[sl])
    np.testing.assert_array_equal(rows[12], x[12])
    np.testing.assert_array_equal(rows[-1], x[-1])
    gather = rng.integers(0, 23, size=(4, 7))
    np.testing.assert_array_equal(rows[gather], x[gather])
    np.testing.assert_array_equal(np.asarray(rows), x)
    with pytest.raises(IndexError):
        rows[np.array([23])]
    np.testing.assert_array_equal(load_embedding_set(tmp_path / "set", mmap=False).embeddings, x)

    queries = torch.from_numpy(rng.standard_normal((3, 6)).astype(np.float32))
    s_view, i_view = cosine_topk(queries, rows, k=8, chunk_rows=4)
    s_full, i_full = cosine_topk(queries, x, k=8, chunk_rows=4)
    assert torch.equal(i_view, i_full) and torch.allclose(s_view, s_full)
    method = get_method("identity")(device="cpu")
    assert torch.allclose(method.rerank(queries, rows, gather[:3]), method.rerank(queries, x, gather[:3]))
