"""Factored low-rank scoring against dense E x E matrices and brute-force sorts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quari import scoring
from quari.transform import QueryTransform
from tests.builders import VARIANTS, random_transform


def assert_same_topk(got, want, atol):
    """Top-k (scores, rows) as torch tensors equal a reference's numpy arrays: the same rows, the
    scores within ``atol``."""
    (s, i), (ref_s, ref_i) = got, want
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(s.numpy(), ref_s, atol=atol)


def fp16_memmap(path, data):
    """``data`` written to a float16 file and opened read-only as a memory map, as galleries are."""
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=data.shape)
    mm[:] = data
    mm.flush()
    return np.memmap(path, dtype=np.float16, mode="r", shape=data.shape)


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
    assert_same_topk((s, i), (ref_s, ref_i), atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_topk_float32_and_rank_deficient_factors(variant):
    t = random_transform(4, 16, 5, variant)
    t.right[:, :, 1] = t.right[:, :, 0]  # repeated column
    t.right[:, :, 3] = 0.0  # zero column
    gallery = torch.randn(80, 16)
    s, i = scoring.topk(t.to(dtype=torch.float32), gallery, 12, chunk_rows=30)
    ref_s, ref_i = brute_topk(scoring.dense_scores(t, gallery.double()), 12)
    assert_same_topk((s, i), (ref_s, ref_i), atol=1e-5)


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
    mm = fp16_memmap(tmp_path / "g.f16", data)
    t = random_transform(3, 16, 4, "released")
    s, i = scoring.topk(t, mm, 20, chunk_rows=50)
    ref_s, ref_i = brute_topk(scoring.dense_scores(t, torch.from_numpy(data).double()), 20)
    assert_same_topk((s, i), (ref_s, ref_i), atol=1e-6)
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
    assert_same_topk((s, i), (ref_s, ref_i), atol=1e-6)


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


def test_orthonormal_basis_ill_conditioned_factors():
    # condition ~1e6, as trained QuARI's factors: one Cholesky QR pass loses orthogonality
    # (~1e-4), the second restores it
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(4, 40, 8, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(4, 8, 8, generator=g, dtype=torch.float64))[0]
    right = u @ torch.diag_embed(torch.logspace(0, -6, 8, dtype=torch.float64).expand(4, 8)) @ v
    q_basis, tri = scoring._orthonormal_basis(right)
    eye = torch.eye(8, dtype=torch.float64).expand(4, 8, 8)
    assert (q_basis.transpose(1, 2) @ q_basis - eye).abs().max() < 1e-12
    assert (q_basis @ tri - right).abs().max() < 1e-12 * right.abs().max()
    assert torch.equal(tri, torch.triu(tri))


def test_read_rows_never_shares_the_map(tmp_path):
    from quari.store import ShardedRows
    data = np.arange(60, dtype=np.float32).reshape(12, 5)
    np.save(tmp_path / "g.npy", data)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    rows = scoring.read_rows(mm, 2, 6, torch.device("cpu"), torch.float32)
    rows += 1  # writable, and a copy
    assert torch.equal(rows - 1, torch.from_numpy(data[2:6])) and np.array_equal(mm, data)
    index = torch.tensor([0, 3, 4, 11])
    for gallery in (mm, ShardedRows([mm[:4], mm[4:]]), torch.from_numpy(data)):
        got = scoring.read_rows_at(gallery, index, torch.device("cpu"), torch.float64)
        assert got.dtype == torch.float64 and torch.equal(got, torch.from_numpy(data[[0, 3, 4, 11]]).double())


def test_query_transform_validates_shapes():
    q = torch.randn(2, 8)
    with pytest.raises(ValueError, match="left"):
        QueryTransform(q, torch.randn(2, 7, 3), torch.randn(2, 8, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="rank"):
        QueryTransform(q, torch.randn(2, 8, 3), torch.randn(2, 8, 4), 1.0, 0.0)
    t = QueryTransform(q, torch.randn(2, 8, 3), torch.randn(2, 8, 3), 1.0, 0.0)
    assert (t.batch_size, t.dim, t.rank) == (2, 8, 3)
    assert torch.equal(t[1].query, q[1:2]) and torch.equal(t[-1].left, t.left[-1:])


# --------------------------------------------------------------------------------------------
# Pruned exact search (identity-anchored maps)


def spiky_transform(batch, dim, rank, dtype=torch.float32, seed=0, spike=3.0):
    """Released-variant maps whose U'V'^T is dominated by one rank-1 term plus small noise, the
    shape of trained QuARI maps (a few large eigenvalues of W W^T - I, the rest near 0)."""
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    u, v = (torch.randn(batch, dim, 1, generator=g, dtype=dtype) for _ in range(2))
    left = spike * u + torch.randn(batch, dim, rank, generator=g, dtype=dtype) / dim ** 0.5
    right = spike * v + torch.randn(batch, dim, rank, generator=g, dtype=dtype) / dim ** 0.5
    left = left / torch.linalg.matrix_norm(left, keepdim=True)
    right = right / torch.linalg.matrix_norm(right, keepdim=True)
    return QueryTransform(query, left, right, scale=0.8, anchor=1.0)


def model_transform(batch, dim, rank, seed=0):
    """The maps of an untrained released QuARI (its spectra are concentrated, as trained ones)."""
    from quari.model import QuARI, QuARIConfig
    torch.manual_seed(seed)
    model = QuARI(QuARIConfig(embedding_dim=dim, hidden_dim=32, nhead=2, num_layers=1,
                              num_steps=2, rank=rank, dropout=0.0)).eval()
    with torch.no_grad():
        return model(F.normalize(torch.randn(batch, dim), dim=-1))


def flat_transform(batch, dim, rank, dtype=torch.float32, seed=0):
    """Adversarial maps: U'V'^T = P S P^T for an orthonormal basis P of 20 > 2 x
    PRUNE_MAX_DIRECTIONS directions and signs S = +-1, so W W^T - I has ten eigenvalues 2.61 and
    ten -0.99: whatever directions are kept, the others leave the bounds far apart."""
    rank = max(rank, 20)
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    basis = torch.linalg.qr(torch.randn(batch, dim, rank, generator=g, dtype=dtype))[0]
    signs = torch.where(torch.arange(rank) % 2 == 0, 1.0, -1.0).to(dtype)
    return QueryTransform(query, basis * signs, basis, scale=0.9, anchor=1.0)


MAPS = {"random": lambda b, d, r: random_transform(b, d, r, "released", dtype=torch.float32),
        "spiky": spiky_transform, "model": model_transform, "flat": flat_transform}


def full_scores(t, gallery):
    """The full path's score of every row [B, N], in row order."""
    s, i = scoring.topk(t, gallery, gallery.shape[0], chunk_rows=37, method="full")
    return torch.empty_like(s).scatter_(1, i, s)


def test_map_spectrum_is_that_of_the_dense_map():
    for t in (random_transform(3, 12, 4, "released"), spiky_transform(2, 10, 3, torch.float64),
              random_transform(2, 6, 4, "released")):  # 2r > E
        values, vectors = scoring.map_spectrum(t)
        eye = torch.eye(t.dim, dtype=torch.float64)
        w = t.anchor * eye + t.scale * t.left.double() @ t.right.double().transpose(1, 2)
        dense = torch.linalg.eigvalsh(w @ w.transpose(1, 2) - t.anchor ** 2 * eye)
        m = values.shape[1]
        # the m eigenvalues, and zeros for the other E - m directions
        padded = torch.sort(torch.cat([values, values.new_zeros(t.batch_size, t.dim - m)], 1))
        torch.testing.assert_close(padded.values, dense, atol=1e-10, rtol=0)
        rebuilt = vectors @ torch.diag_embed(values) @ vectors.transpose(1, 2)
        torch.testing.assert_close(rebuilt, w @ w.transpose(1, 2) - t.anchor ** 2 * eye,
                                   atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("directions", [None, 0, 1, 2, 5])
def test_bounds_hold_for_every_row(kind, directions):
    t = MAPS[kind](6, 48, 8)
    rng = np.random.default_rng(1)
    gallery = torch.from_numpy(rng.standard_normal((400, 48)).astype(np.float16))
    gallery[7] = 0  # a degenerate row
    gallery[8] = gallery[9]  # a duplicate
    exact = full_scores(t, gallery)
    plan = scoring.prune_plan(t, 400, 10, directions=directions)
    num, lower, upper = scoring.score_bounds(plan, gallery.float())
    assert torch.all(lower <= exact) and torch.all(exact <= upper)
    # the numerators are the map's (d W) . q'
    eye = torch.eye(48)
    w = t.anchor * eye + t.scale * t.left @ t.right.transpose(1, 2)
    torch.testing.assert_close(num, torch.einsum("ne,bef,bf->bn", gallery.float(), w, t.query),
                               atol=1e-5, rtol=1e-5)
    if directions is None and kind == "flat":
        assert not plan.bounded.any()  # a spread spectrum: every row is scored exactly
    if directions is None and kind == "spiky":
        assert plan.bounded.all() and (plan.directions >= 2).all()
    # queries without bounds are scored on every row
    assert torch.isfinite(upper[plan.bounded]).all() and torch.isinf(upper[~plan.bounded]).all()
    if directions == 5 and kind == "spiky":
        assert (upper - lower).max() < 0.05


@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("directions", [None, 0, 2])
def test_screening_and_seed_values_bound_every_row(kind, directions):
    t = MAPS[kind](6, 48, 8)
    rng = np.random.default_rng(4)
    gallery = torch.from_numpy(rng.standard_normal((400, 48)).astype(np.float16))
    gallery[7] = 0
    exact = full_scores(t, gallery)
    plan = scoring.prune_plan(t, 400, 10, directions=directions)
    seed, screen = scoring.screen_bounds(plan, gallery.float())
    margin = plan.score_margin
    rows = plan.bounded  # the search screens only bounded queries
    assert torch.all(exact[rows] <= screen[rows].clamp_min(0) * (1 + margin))
    finite = torch.isfinite(seed) & rows[:, None]
    assert torch.all(exact[finite] >= seed[finite] * (1 - margin))
    assert (finite.any() or not rows.any()) and torch.all(seed[torch.isfinite(seed)] >= 0)


def test_approximate_spectrum_is_certified():
    for t in (spiky_transform(3, 30, 5, torch.float64), random_transform(2, 24, 6, "released"),
              flat_transform(2, 48, 20, torch.float64)):
        values, vectors, basis, off = scoring._spectrum(t, exact=False)
        eye = torch.eye(t.dim, dtype=torch.float64)
        w = t.anchor * eye + t.scale * t.left.double() @ t.right.double().transpose(1, 2)
        m_dense = w @ w.transpose(1, 2) - t.anchor ** 2 * eye
        e = basis @ vectors
        torch.testing.assert_close(e.transpose(1, 2) @ e, torch.eye(e.shape[2], dtype=torch.float64)
                                   .expand_as(e.transpose(1, 2) @ e), atol=1e-12, rtol=0)
        # what the float32 eigensolver left off the diagonal is within off (Frobenius norm)
        rest = m_dense - e @ torch.diag_embed(values) @ e.transpose(1, 2)
        assert torch.all(torch.linalg.matrix_norm(rest) <= off + 1e-9)
        # so every eigenvalue is within off of its Rayleigh quotient (Weyl)
        dense = torch.linalg.eigvalsh(m_dense)
        m = values.shape[1]
        padded = torch.sort(torch.cat([values, values.new_zeros(t.batch_size, t.dim - m)], 1))
        assert torch.all((padded.values - dense).abs() <= off[:, None] + 1e-9)
        assert torch.all(off < 1e-4)


def test_pruned_topk_rescores_a_full_pool_early(monkeypatch):
    # a pool larger than its cap is read again and rescored before the end: same results
    t = spiky_transform(5, 32, 6)
    gallery = F.normalize(torch.randn(3000, 32), dim=-1).half()
    ref = scoring.topk(t, gallery, 30, chunk_rows=256, method="full")
    monkeypatch.setattr(scoring, "POOL_FACTOR", 1)
    monkeypatch.setattr(scoring, "POOL_MIN_ROWS", 1)
    calls = []
    original = scoring._rescore_pool
    monkeypatch.setattr(scoring, "_rescore_pool",
                        lambda *a, **kw: calls.append(len(a[2])) or original(*a, **kw))
    s, i = scoring.topk(t, gallery, 30, chunk_rows=256)
    assert len(calls) > 1  # early rescoring, then the final one
    assert torch.equal(i, ref[1])
    torch.testing.assert_close(s, ref[0], atol=1e-6, rtol=0)


def test_bounds_with_every_direction_are_tight():
    t = spiky_transform(3, 24, 4)
    gallery = torch.randn(200, 24)
    plan = scoring.prune_plan(t, 200, 10, directions=8)  # 2r = 8: M entirely kept
    assert torch.equal(plan.lam_lo, torch.zeros(3)) and torch.equal(plan.lam_hi, torch.zeros(3))
    _, lower, upper = scoring.score_bounds(plan, gallery)
    exact = full_scores(t, gallery)
    assert torch.all(lower <= exact) and torch.all(exact <= upper)
    assert (upper - lower).max() < 1e-3


@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("chunk_rows,k", [(64, 10), (50, 1), (1000, 57), (33, 150)])
def test_pruned_topk_equals_full_path_and_dense_reference(kind, chunk_rows, k):
    t = MAPS[kind](5, 32, 6)
    gallery = F.normalize(torch.randn(700, 32), dim=-1).half()
    stats = {}
    s, i = scoring.topk(t, gallery, k, chunk_rows=chunk_rows, stats=stats)
    fs, fi = scoring.topk(t, gallery, k, chunk_rows=chunk_rows, method="full")
    ref_s, ref_i = brute_topk(scoring.dense_scores(t, gallery.double()), k)
    assert s.shape == (5, k) and s.dtype == torch.float32 and i.dtype == torch.int64
    assert torch.equal(i, fi)
    torch.testing.assert_close(s, fs, atol=1e-6, rtol=0)
    assert_same_topk((s, i), (ref_s, ref_i), atol=1e-5)
    assert stats["pairs"] == 700 * 5 and 0 < stats["rescored"] <= stats["pairs"]
    if kind == "flat":
        assert stats["directions"] == [-1] * 5  # today's path, no bounds to pay for


def test_pruned_topk_rescores_few_rows_of_concentrated_spectra():
    t = spiky_transform(4, 64, 8)
    gallery = F.normalize(torch.randn(20000, 64), dim=-1).half()
    stats = {}
    s, i = scoring.topk(t, gallery, 20, chunk_rows=4096, stats=stats)
    fs, fi = scoring.topk(t, gallery, 20, chunk_rows=4096, method="full")
    assert torch.equal(i, fi)
    assert all(0 <= j <= scoring.PRUNE_MAX_DIRECTIONS for j in stats["directions"])
    assert stats["rescored"] < 0.05 * stats["pairs"]


def test_pruned_topk_float64_map_matches_dense():
    t = spiky_transform(3, 20, 4, dtype=torch.float64)
    gallery = torch.randn(300, 20, dtype=torch.float64)
    s, i = scoring.topk(t, gallery, 25, chunk_rows=70)
    ref_s, ref_i = brute_topk(scoring.dense_scores(t, gallery), 25)
    assert_same_topk((s, i), (ref_s, ref_i), atol=1e-6)


@pytest.mark.parametrize("method", scoring.TOPK_METHODS)
def test_topk_methods_break_ties_by_lower_index(method):
    # integer data and orthonormal basis vectors make every product exact, so duplicated rows
    # score exactly alike, in the bounds as in the exact scores
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-3, 4, (5, 16), generator=g).float()
    gallery = base[torch.randint(0, 5, (90,), generator=g)]
    right = torch.eye(16)[:, [3, 11]].expand(4, 16, 2)
    t = QueryTransform(query=torch.randint(-2, 3, (4, 16), generator=g).float(),
                       left=torch.randint(-1, 2, (4, 16, 2), generator=g).float(),
                       right=right, scale=0.5, anchor=1.0)
    full = scoring.scores(t, gallery)
    ref = torch.sort(full, dim=1, descending=True, stable=True).indices
    for k, chunk in ((30, 7), (5, 90), (90, 13)):
        _, i = scoring.topk(t, gallery, k, chunk_rows=chunk, method=method)
        assert torch.equal(i, ref[:, :k])


def test_pruned_topk_k_larger_than_gallery():
    t = spiky_transform(2, 8, 2)
    gallery = torch.randn(9, 8)
    s, i = scoring.topk(t, gallery, 100, chunk_rows=4)
    fs, fi = scoring.topk(t, gallery, 100, chunk_rows=4, method="full")
    assert s.shape == (2, 9) and torch.equal(i, fi)
    assert sorted(i[0].tolist()) == list(range(9))


def test_pruned_topk_fp16_memmap_and_sharded_gallery(tmp_path):
    from quari.store import ShardedRows
    rng = np.random.default_rng(2)
    data = rng.standard_normal((1203, 32)).astype(np.float16)
    mm = fp16_memmap(tmp_path / "g.f16", data)
    sharded = ShardedRows([mm[:500], mm[500:501], mm[501:]])
    t = model_transform(4, 32, 4)
    ref_s, ref_i = brute_topk(scoring.dense_scores(t, torch.from_numpy(data).double()), 40)
    for gallery in (mm, sharded):
        s, i = scoring.topk(t, gallery, 40, chunk_rows=256)
        assert_same_topk((s, i), (ref_s, ref_i), atol=1e-5)


def test_pruned_topk_query_blocks(monkeypatch):
    t = spiky_transform(7, 16, 4)
    gallery = torch.randn(300, 16)
    whole = scoring.topk(t, gallery, 9, chunk_rows=40)
    monkeypatch.setattr(scoring, "BLOCK_ELEMENTS", 40 * 12 * 2)  # a few queries per block
    blocked = scoring.topk(t, gallery, 9, chunk_rows=40)
    assert torch.equal(whole[1], blocked[1])
    torch.testing.assert_close(whole[0], blocked[0])


def test_pruned_topk_paper_variant_keeps_its_path():
    t = random_transform(3, 16, 4, "paper", dtype=torch.float32)
    gallery = torch.randn(100, 16)
    stats = {}
    s, i = scoring.topk(t, gallery, 10, chunk_rows=30, stats=stats)
    fs, fi = scoring.topk(t, gallery, 10, chunk_rows=30, method="full")
    assert torch.equal(i, fi) and torch.equal(s, fs)
    assert stats["directions"] == [-1] * 3
    with pytest.raises(ValueError, match="anchor"):
        scoring.prune_plan(t, 100, 10)
    with pytest.raises(ValueError, match="method"):
        scoring.topk(t, gallery, 10, method="fast")
