"""Factored low-rank scoring against dense E x E matrices and brute-force sorts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quari import scoring
from quari.transform import QueryTransform

VARIANTS = {"released": (1.0, 0.8), "paper": (0.0, 1.0)}


def random_transform(batch, dim, rank, variant, dtype=torch.float64, seed=0):
    anchor, scale = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    left = torch.randn(batch, dim, rank, generator=g, dtype=dtype) / dim ** 0.5
    right = torch.randn(batch, dim, rank, generator=g, dtype=dtype) / dim ** 0.5
    return QueryTransform(query=query, left=left, right=right, scale=scale, anchor=anchor)


def loop_scores(t, gallery):
    """Cosines written from the definition, one query and one row at a time."""
    out = torch.empty(t.batch_size, gallery.shape[0], dtype=torch.float64)
    for b in range(t.batch_size):
        w = t.anchor * torch.eye(t.dim, dtype=torch.float64) + t.scale * t.left[b] @ t.right[b].T
        for n, d in enumerate(gallery.double()):
            m = d @ w
            out[b, n] = t.query[b] @ m / m.norm()
    return out


def brute_topk(dense, k):
    """Best k per row by descending score, ties by lower index (numpy lexsort)."""
    dense = dense.numpy()
    order = np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in dense])
    return np.take_along_axis(dense, order, 1), order


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_reference_matches_definition(variant):
    t = random_transform(2, 6, 3, variant)
    gallery = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(scoring.dense_scores(t, gallery), loop_scores(t, gallery))


@pytest.mark.parametrize("variant", VARIANTS)
def test_scores_match_dense(variant):
    t = random_transform(4, 24, 5, variant)
    gallery = torch.randn(37, 24, dtype=torch.float64)
    torch.testing.assert_close(scoring.scores(t, gallery), scoring.dense_scores(t, gallery),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidate_scores_match_dense(variant):
    t = random_transform(3, 20, 4, variant)
    candidates = torch.randn(3, 11, 20, dtype=torch.float64)
    got = scoring.candidate_scores(t, candidates)
    torch.testing.assert_close(got, scoring.dense_scores(t, candidates), rtol=1e-10, atol=1e-10)
    # row b is scored under query b's map, not another's
    other = scoring.candidate_scores(t[1], candidates[:1])
    assert not torch.allclose(other, got[:1])


def test_float32_inputs_are_close_to_float64():
    t = random_transform(3, 32, 8, "released")
    gallery = torch.randn(50, 32, dtype=torch.float64)
    got = scoring.scores(t.to(dtype=torch.float32), gallery.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), scoring.dense_scores(t, gallery), atol=1e-5, rtol=0)


def test_degenerate_row_scores_zero_not_nan():
    t = random_transform(2, 8, 2, "paper")
    gallery = torch.zeros(3, 8, dtype=torch.float64)
    assert torch.equal(scoring.scores(t, gallery), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_rows,k", [(7, 10), (64, 5), (13, 1), (1000, 57)])
def test_topk_matches_brute_force(variant, chunk_rows, k):
    t = random_transform(5, 16, 4, variant)
    gallery = torch.randn(57, 16)
    s, i = scoring.topk(t, gallery, k, chunk_rows=chunk_rows)
    ref_s, ref_i = brute_topk(scoring.dense_scores(t, gallery.double()), k)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert s.shape == (5, k) and i.shape == (5, k)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_topk_float32_and_rank_deficient_factors(variant):
    t = random_transform(4, 16, 5, variant)
    t.right[:, :, 1] = t.right[:, :, 0]  # repeated column
    t.right[:, :, 3] = 0.0  # zero column
    gallery = torch.randn(80, 16)
    s, i = scoring.topk(t.to(dtype=torch.float32), gallery, 12, chunk_rows=30)
    ref_s, ref_i = brute_topk(scoring.dense_scores(t, gallery.double()), 12)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-5)


def test_merge_topk_breaks_ties_by_index():
    best_s = torch.tensor([[3.0, 2.0, 2.0]])
    best_i = torch.tensor([[7, 1, 4]])
    s, i = scoring.merge_topk(best_s, best_i, torch.tensor([[2.0, 5.0, 2.0]]),
                              torch.tensor([[8, 9, 10]]), 4)
    assert s.tolist() == [[5.0, 3.0, 2.0, 2.0]]
    assert i.tolist() == [[9, 7, 1, 4]]


def test_topk_k_larger_than_gallery_returns_all():
    t = random_transform(2, 8, 2, "released")
    gallery = torch.randn(9, 8)
    s, i = scoring.topk(t, gallery, 100, chunk_rows=4)
    assert s.shape == (2, 9)
    assert sorted(i[0].tolist()) == list(range(9))
    assert torch.all(s[:, :-1] >= s[:, 1:])


def test_topk_memmap_fp16(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((203, 16)).astype(np.float16)
    mm = np.memmap(tmp_path / "g.f16", dtype=np.float16, mode="w+", shape=data.shape)
    mm[:] = data
    mm.flush()
    mm = np.memmap(tmp_path / "g.f16", dtype=np.float16, mode="r", shape=data.shape)
    t = random_transform(3, 16, 4, "released")
    s, i = scoring.topk(t, mm, 20, chunk_rows=50)
    ref_s, ref_i = brute_topk(scoring.dense_scores(t, torch.from_numpy(data).double()), 20)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-6)
    # the same rows as an fp16 tensor give the same answer
    s2, i2 = scoring.topk(t, torch.from_numpy(data), 20, chunk_rows=33)
    assert torch.equal(i, i2)


def test_topk_ties_go_to_lower_index():
    # integer data and orthonormal basis vectors as the right factor make every product exact
    # (whatever the summation order), so duplicated rows score exactly alike
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (4, 12), generator=g).double()
    gallery = base[torch.randint(0, 4, (40,), generator=g)]
    right = torch.eye(12, dtype=torch.float64)[:, [2, 7]].expand(3, 12, 2)
    t = QueryTransform(query=torch.randint(-2, 3, (3, 12), generator=g).double(),
                       left=torch.randint(-1, 2, (3, 12, 2), generator=g).double(),
                       right=right, scale=0.5, anchor=1.0)
    full = scoring.scores(t, gallery)
    assert full[0].unique().numel() < 40  # there are ties to break
    ref = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :25]
    for chunk in (3, 7, 40):
        _, i = scoring.topk(t, gallery, 25, chunk_rows=chunk)
        assert torch.equal(i, ref)


def test_topk_query_blocks(monkeypatch):
    t = random_transform(7, 16, 4, "released")
    gallery = torch.randn(45, 16)
    whole = scoring.topk(t, gallery, 9, chunk_rows=10)
    monkeypatch.setattr(scoring, "BLOCK_ELEMENTS", 10 * 8 * 2)  # two queries per block
    blocked = scoring.topk(t, gallery, 9, chunk_rows=10)
    assert torch.equal(whole[1], blocked[1])
    torch.testing.assert_close(whole[0], blocked[0])


def test_topk_rejects_bad_input():
    t = random_transform(2, 8, 2, "released")
    with pytest.raises(ValueError, match="gallery"):
        scoring.topk(t, torch.randn(5, 9), 3)
    with pytest.raises(ValueError, match="k must"):
        scoring.topk(t, torch.randn(5, 8), 0)


def test_cosine_topk_matches_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((101, 10)).astype(np.float32)
    queries = torch.from_numpy(rng.standard_normal((4, 10)).astype(np.float32))
    s, i = scoring.cosine_topk(queries, gallery, 15, chunk_rows=17)
    q = queries.double().numpy()
    g = gallery.astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    ref_s, ref_i = brute_topk(torch.from_numpy(cos), 15)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(s.numpy(), ref_s, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rerank_sorts_by_dense_scores(variant):
    t = random_transform(3, 16, 4, variant)
    candidates = torch.randn(3, 12, 16, dtype=torch.float64)
    ids = torch.randint(0, 10_000, (3, 12))
    s, got_ids = scoring.rerank(t, candidates, ids)
    dense = scoring.dense_scores(t, candidates)
    order = torch.argsort(dense, dim=1, descending=True)
    assert torch.equal(got_ids, ids.gather(1, order))
    torch.testing.assert_close(s, dense.gather(1, order))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant):
    t = random_transform(2, 5, 2, variant)
    gallery = torch.randn(4, 5, dtype=torch.float64)
    candidates = torch.randn(2, 3, 5, dtype=torch.float64)
    inputs = tuple(x.clone().requires_grad_() for x in (t.query, t.left, t.right))

    def full(q, left, right):
        return scoring.scores(QueryTransform(q, left, right, t.scale, t.anchor), gallery)

    def per_query(q, left, right):
        return scoring.candidate_scores(QueryTransform(q, left, right, t.scale, t.anchor), candidates)

    assert torch.autograd.gradcheck(full, inputs)
    assert torch.autograd.gradcheck(per_query, inputs)


def test_gradients_match_dense():
    t = random_transform(2, 10, 3, "released")
    gallery = torch.randn(6, 10, dtype=torch.float64)
    grads = []
    for fn in (scoring.scores, scoring.dense_scores):
        leaves = [x.clone().requires_grad_() for x in (t.query, t.left, t.right)]
        fn(QueryTransform(*leaves, t.scale, t.anchor), gallery).sin().sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_topk_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    t = random_transform(4, 32, 8, "released", dtype=torch.float32)
    gallery = torch.randn(1000, 32).half()
    cpu = scoring.topk(t, gallery, 50, chunk_rows=300)
    gpu = scoring.topk(t, gallery, 50, chunk_rows=300, device="cuda")
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    assert (gpu[1].cpu() == cpu[1]).float().mean() > 0.95


def test_orthonormal_basis_full_and_deficient_rank():
    right = torch.randn(3, 20, 6, dtype=torch.float64)
    right[1, :, 2] = 0.0  # Cholesky fails: Householder fallback
    right[2, :, 4] = right[2, :, 5]
    q_basis, tri = scoring._orthonormal_basis(right)
    torch.testing.assert_close(q_basis @ tri, right)
    torch.testing.assert_close(q_basis.transpose(1, 2) @ q_basis,
                               torch.eye(6, dtype=torch.float64).expand(3, 6, 6))


def test_query_transform_validates_shapes():
    q = torch.randn(2, 8)
    with pytest.raises(ValueError, match="left"):
        QueryTransform(q, torch.randn(2, 7, 3), torch.randn(2, 8, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="rank"):
        QueryTransform(q, torch.randn(2, 8, 3), torch.randn(2, 8, 4), 1.0, 0.0)
    t = QueryTransform(q, torch.randn(2, 8, 3), torch.randn(2, 8, 3), 1.0, 0.0)
    assert (t.batch_size, t.dim, t.rank) == (2, 8, 3)
    assert torch.equal(t[1].query, q[1:2]) and torch.equal(t[-1].left, t.left[-1:])
