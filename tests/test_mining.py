"""Semi-positive mining against a numpy brute force over the deduplicated images."""

import numpy as np
import pytest

from quari.mining import (dedupe_images, load_semipositives, mine_semipositives,
                          save_semipositives)


def brute_force(embeddings, ids, k, top_n, temperature):
    """Reference written from the definition: distinct ids in order of first occurrence, each
    against every other distinct image, ties by lower row, softmax over the k best."""
    ids = list(ids)
    first = {}
    for row, i in enumerate(ids):
        first.setdefault(i, row)
    rows = list(first.values())
    x = np.asarray(embeddings, dtype=np.float64)[rows]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = len(rows)
    indices = np.full((n, top_n), -1)
    weights = np.zeros((n, top_n))
    for a in range(n):
        others = [(-float(x[a] @ x[b]), b) for b in range(n) if b != a]
        best = sorted(others)[:k]
        if not best:
            continue
        logits = np.array([-s for s, _ in best]) / temperature
        p = np.exp(logits - logits.max())
        p /= p.sum()
        for j, (_, b) in enumerate(best[:top_n]):
            indices[a, j], weights[a, j] = b, p[j]
    return indices, weights, rows


def sign_vectors(rng, n, dim=16):
    """Unit vectors of +-1/4 entries: every inner product is an exact multiple of 1/8, so
    float32 sums are exact and ties are real ties."""
    return rng.choice([-0.25, 0.25], size=(n, dim)).astype(np.float32)


def test_matches_brute_force_random():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 12)).astype(np.float32)
    ids = [f"img{i}" for i in range(150)]
    got = mine_semipositives(x, ids, k=20, top_n=3, temperature=0.07, batch_size=32,
                             progress=False)
    ref_i, ref_w, _ = brute_force(x, ids, 20, 3, 0.07)
    np.testing.assert_array_equal(got.indices, ref_i)
    np.testing.assert_allclose(got.weights, ref_w, rtol=1e-4, atol=1e-6)
    assert got.indices.dtype == np.int64 and got.weights.dtype == np.float32


def test_duplicate_ids_never_mine_themselves():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((30, 8)).astype(np.float32)
    # 1 to 5 caption rows per image, shuffled, as (image, caption) training pairs give
    rows = np.concatenate([np.full(rng.integers(1, 6), i) for i in range(30)])
    rng.shuffle(rows)
    ids = np.array([f"im{r:02d}" for r in rows])
    got = mine_semipositives(base[rows], ids, k=10, top_n=2, batch_size=7, progress=False)
    ref_i, ref_w, ref_rows = brute_force(base[rows], ids, 10, 2, 0.07)
    np.testing.assert_array_equal(got.indices, ref_i)
    np.testing.assert_allclose(got.weights, ref_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got.source_rows, ref_rows)
    # a semi-positive is never the image itself, under any of its copies
    for a, neigh in enumerate(got.indices):
        assert a not in neigh
        assert got.image_ids[a] not in got.image_ids[neigh]
    # mapping back to the pairs: each caption row gets its image's semi-positives
    idx, w = got.per_pair()
    assert idx.shape == (len(rows), 2)
    for m, image in enumerate(ids):
        a = list(got.image_ids).index(image)
        np.testing.assert_array_equal(idx[m], got.indices[a])
        np.testing.assert_array_equal(w[m], got.weights[a])
    # and as rows of the input array: a row of another image
    src = got.source_indices()
    for a in range(len(got.image_ids)):
        for s in src[a]:
            assert s >= 0 and ids[s] != got.image_ids[a]


def test_k_larger_than_the_other_images_pads():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    ids = ["a", "b", "a", "c"]  # three distinct images: two others each
    got = mine_semipositives(x, ids, k=100, top_n=3, progress=False)
    ref_i, ref_w, _ = brute_force(x, ids, 100, 3, 0.07)
    np.testing.assert_array_equal(got.indices, ref_i)
    np.testing.assert_allclose(got.weights, ref_w, rtol=1e-4, atol=1e-6)
    assert (got.indices[:, 2] == -1).all() and (got.weights[:, 2] == 0).all()
    # with only two others, the softmax is over those two: the kept weights sum to one
    np.testing.assert_allclose(got.weights.sum(1), 1.0, rtol=1e-5)


def test_single_image_has_no_semipositives():
    got = mine_semipositives(np.ones((3, 4), np.float32), [7, 7, 7], k=5, top_n=2,
                             progress=False)
    assert got.indices.shape == (1, 2) and (got.indices == -1).all()
    assert (got.weights == 0).all()


def test_ties_go_to_the_lower_row():
    rng = np.random.default_rng(3)
    x = sign_vectors(rng, 120)
    x[60:90] = x[0:30]  # exact copies under other ids: ties at similarity 1
    ids = np.arange(120) * 10  # integer ids work too
    got = mine_semipositives(x, ids, k=7, top_n=4, batch_size=25, progress=False)
    ref_i, ref_w, _ = brute_force(x, ids, 7, 4, 0.07)
    np.testing.assert_array_equal(got.indices, ref_i)
    np.testing.assert_allclose(got.weights, ref_w, rtol=1e-4, atol=1e-7)
    assert got.indices[0, 0] == 60 and got.indices[60, 0] == 0


def test_tie_larger_than_the_search_width():
    rng = np.random.default_rng(6)
    x = sign_vectors(rng, 200)
    x[150:] = x[3]  # 50 copies of image 3: a tie much wider than k + 1 hits
    got = mine_semipositives(x[::-1], range(200), k=4, top_n=2, batch_size=64, progress=False)
    ref_i, ref_w, _ = brute_force(x[::-1], range(200), 4, 2, 0.07)
    np.testing.assert_array_equal(got.indices, ref_i)
    np.testing.assert_allclose(got.weights, ref_w, rtol=1e-4, atol=1e-7)


def test_weights_are_softmax_over_k_not_top_n():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    wide = mine_semipositives(x, range(50), k=40, top_n=2, progress=False)
    narrow = mine_semipositives(x, range(50), k=2, top_n=2, progress=False)
    np.testing.assert_array_equal(wide.indices, narrow.indices)
    np.testing.assert_allclose(narrow.weights.sum(1), 1.0, rtol=1e-5)
    assert (wide.weights.sum(1) < narrow.weights.sum(1)).all()


def test_dedupe_order_and_inverse():
    x = np.arange(12, dtype=np.float32).reshape(6, 2) + 1
    d = dedupe_images(x, ["z", "y", "z", "x", "y", "x"])
    assert list(d.ids) == ["z", "y", "x"]
    np.testing.assert_array_equal(d.source_rows, [0, 1, 3])
    np.testing.assert_array_equal(d.inverse, [0, 1, 0, 2, 1, 2])
    np.testing.assert_allclose(np.linalg.norm(d.embeddings, axis=1), 1.0, rtol=1e-6)


def test_bad_arguments():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError):
        mine_semipositives(x, [1, 2], progress=False)
    with pytest.raises(ValueError):
        mine_semipositives(x, [1, 2, 3], k=2, top_n=3, progress=False)


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    got = mine_semipositives(x, [f"i{i % 15}" for i in range(20)], k=5, progress=False)
    save_semipositives(tmp_path / "sp.npz", got)
    back = load_semipositives(tmp_path / "sp.npz")
    for name in ("indices", "weights", "image_ids", "source_rows", "inverse"):
        np.testing.assert_array_equal(getattr(back, name), getattr(got, name))


def test_differing_copies_of_one_id_warn(caplog):
    x = np.eye(4, dtype=np.float32)
    with caplog.at_level("WARNING", logger="quari.mining"):
        d = dedupe_images(x, ["a", "b", "a", "c"])
    assert "differ" in caplog.text
    np.testing.assert_array_equal(d.embeddings[0], x[0])  # the first row stands for the id
    caplog.clear()
    with caplog.at_level("WARNING", logger="quari.mining"):
        dedupe_images(x[[0, 1, 0, 2]], ["a", "b", "a", "c"])
    assert caplog.text == ""
