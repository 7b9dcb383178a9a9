"""The Table 3a re-rankers against references written from their definitions: alpha-QE (numpy
brute force), Chamfer similarity (a loop over descriptors) and spatial verification (synthetic
point sets with a known transform)."""

import numpy as np
import pytest
import torch

from baselines.alpha_qe import AlphaQE
from baselines.local_features.rerankers import ChamferReranker, SpatialVerificationReranker
from baselines.local_features.matching import (chamfer_similarities, chamfer_similarity,
                                               ransac_inliers, save_local_descriptors,
                                               spatial_verification, tentative_matches)
from tests.builders import reads_only_candidates


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- alpha-QE --------------------------------------------------------------------------------------
def expanded_query(q, rows, n, alpha):
    """q + sum over the n most similar rows of max(cos, 0)^alpha * row, normalised (numpy loop)."""
    q = unit(q)
    rows = unit(rows)
    sims = rows @ q
    new = q.copy()
    for i in np.argsort(-sims, kind="stable")[:n]:
        new += max(sims[i], 0.0) ** alpha * rows[i]
    return unit(new)


@pytest.mark.parametrize("neighbours,alpha", [(0, 3.0), (1, 3.0), (2, 3.0), (5, 3.0), (3, 1.0), (15, 3.0)])
def test_alpha_qe_rerank_matches_brute_force(rng, neighbours, alpha):
    gallery = rng.standard_normal((40, 8)).astype(np.float32)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    shortlist = np.stack([rng.permutation(40)[:15] for _ in range(4)])
    got = AlphaQE(neighbours=neighbours, alpha=alpha, device="cpu").rerank(queries, gallery, shortlist)
    ref = np.stack([unit(gallery[s]) @ expanded_query(q, gallery[s], neighbours, alpha)
                    for q, s in zip(queries, shortlist)])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    if neighbours == 0:  # no expansion: plain cosine
        np.testing.assert_allclose(ref, np.einsum("bke,be->bk", unit(gallery[shortlist]), unit(queries)),
                                   atol=1e-6)


@pytest.mark.parametrize("neighbours", [1, 2, 5])
@pytest.mark.parametrize("as_torch", [False, True])
def test_alpha_qe_search_matches_brute_force(rng, neighbours, as_torch):
    gallery = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    k = 10
    method = AlphaQE(neighbours=neighbours, device="cpu")
    g = torch.from_numpy(gallery) if as_torch else gallery
    scores, idx = method.search(queries, g, k, chunk_rows=7)
    for b, q in enumerate(queries):
        all_scores = unit(gallery) @ expanded_query(q, gallery, neighbours, 3.0)
        order = np.argsort(-all_scores, kind="stable")[:k]
        np.testing.assert_array_equal(idx[b].numpy(), order)
        np.testing.assert_allclose(scores[b].numpy(), all_scores[order], atol=1e-5)


def test_alpha_qe_expansion_pulls_in_the_neighbours_neighbours():
    # d1 is the query's nearest row; d2 is far from the query but close to d1: expansion promotes it
    q = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    gallery = unit(np.array([[0.7, 0.71, 0.0], [0.0, 1.0, 0.0], [0.25, 0.0, 0.97]], dtype=np.float32))
    plain = AlphaQE(neighbours=0, device="cpu").rerank(q, gallery, np.array([[0, 1, 2]]))
    expanded = AlphaQE(neighbours=1, alpha=1.0, device="cpu").rerank(q, gallery, np.array([[0, 1, 2]]))
    assert plain[0, 1] < plain[0, 2] and expanded[0, 1] > expanded[0, 2]


# -- Chamfer similarity ----------------------------------------------------------------------------
def chamfer_loop(query, db):
    total = 0.0
    for qi in query:
        total += max(float(qi @ dj / np.linalg.norm(qi) / np.linalg.norm(dj)) for dj in db)
    return total / len(query)


def test_chamfer_matches_a_loop(rng):
    query, db = rng.standard_normal((7, 4)), rng.standard_normal((5, 4))
    assert chamfer_similarity(query, db) == pytest.approx(chamfer_loop(query, db), abs=1e-6)
    # averaged over the query's descriptors: not symmetric
    assert chamfer_similarity(db, query) == pytest.approx(chamfer_loop(db, query), abs=1e-6)
    assert chamfer_similarity(query, db) != pytest.approx(chamfer_similarity(db, query), abs=1e-3)


def test_batched_chamfer_ignores_padding(rng):
    query = rng.standard_normal((9, 6))
    db = rng.standard_normal((11, 8, 6))
    counts = rng.integers(1, 9, 11)
    counts[3] = 0
    db[np.arange(8)[None, :] >= counts[:, None]] = 100.0  # padding that would win every max
    got = chamfer_similarities(torch.from_numpy(query), torch.from_numpy(db), torch.from_numpy(counts),
                               chunk_elements=9 * 8 * 3)  # chunks of 3 candidates
    ref = [chamfer_loop(query, db[i, :c]) if c else -1.0 for i, c in enumerate(counts)]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


# -- spatial verification --------------------------------------------------------------------------
AFFINE = np.array([[0.8, 0.3], [-0.2, 1.1]])
SHIFT = np.array([0.1, -0.05])


def affine_pairs(rng, inliers=40, outliers=20, noise=1e-3):
    src = rng.random((inliers + outliers, 2))
    dst = src @ AFFINE.T + SHIFT + noise * rng.standard_normal(src.shape)
    dst[inliers:] = rng.random((outliers, 2))
    return src, dst


def test_ransac_recovers_the_inliers_of_an_affine_map(rng):
    src, dst = affine_pairs(rng)
    assert abs(ransac_inliers(src, dst, "affine", threshold=0.02) - 40) <= 2


def test_ransac_recovers_the_inliers_of_a_similarity(rng):
    src = rng.random((50, 2))
    angle, scale = 0.6, 1.3
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + SHIFT
    dst[30:] = rng.random((20, 2))
    assert abs(ransac_inliers(src, dst, "similarity", threshold=0.02) - 30) <= 2
    # a similarity cannot explain the shear of a general affine map
    src, dst = affine_pairs(rng)
    assert ransac_inliers(src, dst, "similarity", threshold=0.02) < 20


def test_ransac_finds_little_in_unrelated_points(rng):
    src, dst = rng.random((60, 2)), rng.random((60, 2))
    assert ransac_inliers(src, dst, "affine", threshold=0.02) < 8
    assert ransac_inliers(src[:2], dst[:2], "affine") == 0  # fewer than a minimal sample


def test_ransac_is_deterministic_under_its_seed(rng):
    src, dst = affine_pairs(rng, inliers=12, outliers=40, noise=0.01)
    runs = [ransac_inliers(src, dst, threshold=0.02, iterations=5, seed=s) for s in (0, 0, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len(set(runs)) > 1  # few hypotheses: the seed decides which are tried


def test_tentative_matches_are_mutual_nearest_neighbours(rng):
    q, d = rng.standard_normal((20, 5)), rng.standard_normal((15, 5))
    qi, dj = tentative_matches(q, d)
    sim = unit(q) @ unit(d).T
    ref = [(i, j) for i in range(20) for j in range(15)
           if sim[i].argmax() == j and sim[:, j].argmax() == i]
    assert list(zip(qi.tolist(), dj.tolist())) == ref and ref
    qi, dj = tentative_matches(q, d, min_similarity=0.5)
    assert all(sim[i, j] >= 0.5 for i, j in zip(qi, dj))


def matching_images(rng, shared=20, dim=32):
    """A query and a database image sharing ``shared`` descriptors at affinely related positions."""
    shared_desc = rng.standard_normal((shared, dim))
    q_desc = np.concatenate([shared_desc + 0.05 * rng.standard_normal((shared, dim)),
                             rng.standard_normal((25, dim))])
    q_xy = rng.random((shared + 25, 2))
    db_desc = np.concatenate([shared_desc, rng.standard_normal((10, dim))])
    db_xy = np.concatenate([q_xy[:shared] @ AFFINE.T + SHIFT, rng.random((10, 2))])
    return q_desc, q_xy, db_desc, db_xy


def test_spatial_verification_counts_the_geometrically_consistent_matches(rng):
    q_desc, q_xy, db_desc, db_xy = matching_images(rng)
    score = spatial_verification(q_desc, q_xy, db_desc, db_xy, threshold=0.02)
    assert 18 <= score <= 23
    assert score == spatial_verification(q_desc, q_xy, db_desc, db_xy, threshold=0.02)
    # same descriptors, positions scrambled: the matches survive, the geometry does not
    scrambled = spatial_verification(q_desc, q_xy, db_desc, rng.permutation(db_xy), threshold=0.02)
    assert scrambled < 8
    unrelated = spatial_verification(q_desc, q_xy, rng.standard_normal(db_desc.shape),
                                     rng.random(db_xy.shape), threshold=0.02)
    assert unrelated < 8


# -- the re-ranking methods ------------------------------------------------------------------------
@pytest.fixture
def local_world(rng, tmp_path):
    """Five database images and two queries; query 0 matches database image "b"."""
    db_ids = ["a", "b", "c", "d", "e"]
    q_desc, q_xy, match_desc, match_xy = matching_images(rng)
    db_desc = rng.standard_normal((5, 30, 32))
    db_xy = rng.random((5, 30, 2))
    db_desc[1], db_xy[1] = match_desc, match_xy
    counts = np.array([30, 30, 12, 30, 7])
    save_local_descriptors(tmp_path / "db.npz", db_ids, db_desc, db_xy, counts)
    queries_desc = np.stack([q_desc, rng.standard_normal(q_desc.shape)])
    save_local_descriptors(tmp_path / "q.npz", ["q0", "q1"], queries_desc, np.stack([q_xy, q_xy]))
    gallery_ids = ["d", "b", "e", "a", "c"]  # gallery row order differs from the file's order
    return dict(db=(db_desc, db_xy, counts, db_ids), q=(queries_desc, q_xy), gallery_ids=gallery_ids,
                context={"local_descriptors": tmp_path / "db.npz",
                         "query_local_descriptors": tmp_path / "q.npz", "gallery_ids": gallery_ids})


@pytest.mark.parametrize("cls", [ChamferReranker, SpatialVerificationReranker])
def test_local_rerankers_score_candidates_by_id(local_world, cls):
    method = cls(device="cpu").fit(None, **local_world["context"])
    db_desc, db_xy, counts, db_ids = local_world["db"]
    queries_desc, q_xy = local_world["q"]
    gallery = np.zeros((5, 4), dtype=np.float32)  # global embeddings are not used
    shortlist = np.array([[1, 0, 4], [3, 2, 1]])
    got = method.rerank(gallery[:2], gallery, shortlist, query_ids=["q0", "q1"])
    for b in range(2):
        for j, row in enumerate(shortlist[b]):
            i = db_ids.index(local_world["gallery_ids"][row])
            desc, xy = db_desc[i, :counts[i]], db_xy[i, :counts[i]]
            ref = (chamfer_similarity(queries_desc[b], desc) if cls is ChamferReranker
                   else spatial_verification(queries_desc[b], q_xy, desc, xy))
            assert got[b, j].item() == pytest.approx(ref, abs=1e-5)
    assert got[0, 0] == got[0].max()  # query 0 finds its matching image "b" (gallery row 1)
    with pytest.raises(NotImplementedError):
        method.search(gallery[:2], gallery, 3, query_ids=["q0", "q1"])
    with pytest.raises(KeyError):
        method.rerank(gallery[:1], gallery, shortlist[:1], query_ids=["unknown"])


def test_local_reranker_needs_gallery_ids(local_world):
    context = {k: v for k, v in local_world["context"].items() if k != "gallery_ids"}
    method = ChamferReranker(device="cpu").fit(None, **context)
    gallery = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(RuntimeError, match="gallery ids"):
        method.rerank(gallery[:1], gallery, np.array([[0, 1]]), query_ids=["q0"])
    method.set_gallery(local_world["gallery_ids"])
    assert method.rerank(gallery[:1], gallery, np.array([[0, 1]]), query_ids=["q0"]).shape == (1, 2)
    ref = method.rerank(gallery[:1], gallery, np.array([[3, 1]]), query_ids=["q0"])  # a, b
    method.set_gallery(["a", "zz", "b", "c", "d"])  # a shortlisted row without descriptors
    got = method.rerank(gallery[:1], gallery, np.array([[0, 1, 2]]), query_ids=["q0"])
    assert got[0, 1].item() == -np.inf  # ranked last, logged, not fatal
    assert torch.equal(got[0, [0, 2]], ref[0])
    # a memory-mapped id column is kept as it is (only shortlisted rows are decoded)
    from quari.store import IdColumn
    method.set_gallery(IdColumn.from_strings(["a", "zz", "b", "c", "d"]))
    assert isinstance(method.gallery_ids_, IdColumn)
    assert torch.equal(method.rerank(gallery[:1], gallery, np.array([[0, 1, 2]]),
                                     query_ids=["q0"]), got)


@pytest.mark.parametrize("cls", [ChamferReranker, SpatialVerificationReranker])
def test_memory_mapped_and_in_memory_descriptors_score_the_same(local_world, cls, monkeypatch):
    """The re-rankers memory-map the files by default and read only the shortlisted images'
    rows; reading the files into memory (the behaviour before) gives the same scores."""
    import functools

    from baselines.local_features import matching as local_matching

    gallery = np.zeros((5, 4), dtype=np.float32)
    shortlist = np.array([[1, 0, 4], [3, 2, 1]])
    mapped = cls(device="cpu").fit(None, **local_world["context"])
    assert isinstance(mapped.database_.descriptors, np.memmap)
    assert isinstance(mapped.queries_.descriptors, np.memmap)
    scores = reads_only_candidates(
        mapped, lambda: mapped.rerank(gallery[:2], gallery, shortlist, query_ids=["q0", "q1"]),
        local_world["gallery_ids"], shortlist)
    monkeypatch.setattr(local_matching, "load_local_descriptors",
                        functools.partial(local_matching.load_local_descriptors, mmap=False))
    in_memory = cls(device="cpu").fit(None, **local_world["context"])
    assert type(in_memory.database_.descriptors) is np.ndarray
    assert in_memory.database_.descriptors.dtype == np.float32
    torch.testing.assert_close(
        in_memory.rerank(gallery[:2], gallery, shortlist, query_ids=["q0", "q1"]), scores,
        rtol=0, atol=1e-6)


def test_chamfer_reads_float16_rows_and_converts_them(rng):
    """Float16 candidates (as stored) score as their float32 conversion, on any chunking."""
    query = rng.standard_normal((6, 8)).astype(np.float32)
    db = rng.standard_normal((7, 5, 8)).astype(np.float16)
    counts = rng.integers(1, 6, 7)
    for chunk in (6 * 5, 6 * 5 * 3, 1 << 20):
        got = chamfer_similarities(torch.from_numpy(query), torch.from_numpy(db),
                                   torch.from_numpy(counts), chunk_elements=chunk)
        ref = [chamfer_loop(query, db[i, :c].astype(np.float32)) for i, c in enumerate(counts)]
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


@pytest.mark.gpu
def test_chamfer_on_cuda_matches_cpu(local_world):
    """Candidates are gathered on the CPU in their stored dtype and moved chunk by chunk."""
    gallery = np.zeros((5, 4), dtype=np.float32)
    shortlist = np.array([[1, 0, 4, 2, 3], [3, 2, 1, 0, 4]])
    scores = {device: ChamferReranker(device=device).fit(None, **local_world["context"]).rerank(
        gallery[:2], gallery, shortlist, query_ids=["q0", "q1"]) for device in ("cpu", "cuda")}
    torch.testing.assert_close(scores["cuda"], scores["cpu"], atol=1e-5, rtol=1e-5)
