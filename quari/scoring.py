"""Scoring gallery rows under each query's own low-rank map, without forming E x E matrices.

For a :class:`~quari.transform.QueryTransform` with adapted query q, factors L (left) and
R (right), anchor a and scale s, a gallery row d is mapped to m(d) = a*d + s*(d L) R^T and scored
by q . m(d) / ||m(d)||. With P = d L and S = d R (both 1 x r), G = R^T R (r x r) and c = R^T q:

    q . m(d)   = a (q . d) + s P . c
    ||m(d)||^2 = a^2 ||d||^2 + 2 a s P . S + s^2 P G P^T

so one pass computing d [L | R] costs O(E r) per row and query, against O(E^2) for applying the
dense matrix (what the released code does, and what :func:`dense_scores` keeps as the reference).
When a = 0 (the paper's pure low-rank map) only P is needed.

The streaming search (:func:`topk`, no gradients) first orthonormalises R = Q T (QR) so
that m(d) = a d_perp + (d A) Q^T with A = a Q + s L T^T and d_perp = d - d Q Q^T. Then

    q . m(d)   = d . w                    with w = a q + s L (R^T q)
    ||m(d)||^2 = a^2 (||d||^2 - ||d Q||^2) + ||d A||^2

and every per-row quantity comes out of the matrix products d [A | Q] and d w followed by two
squared norms: still O(E r) per row and query, with no r x r product per row.

For identity-anchored maps :func:`topk` prunes (exactly): see the section "Pruned exact search"
below; ``method="full"`` scores every row as above.

Everything here except the streaming searches is differentiable and used by training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from quari.transform import QueryTransform

# Floor of ||m(d)||, the same as torch.nn.functional.normalize uses, so a degenerate row
# scores 0 rather than NaN.
NORM_EPS = 1e-12

# Largest number of elements of one projected block (rows x queries x factor columns) that
# topk materialises at once; 2**25 float32 values are 128 MiB.
BLOCK_ELEMENTS = 2 ** 25

# Largest |Q^T Q - I| accepted from Cholesky QR before falling back to Householder QR.
ORTHONORMAL_TOL = 1e-8

Gallery = torch.Tensor | np.ndarray


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64 (gradient checks), float32 otherwise."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _factors(transform: QueryTransform) -> torch.Tensor:
    """[B, E, c]: the left factor, followed by the right one when the map is anchored."""
    if transform.anchor == 0:
        return transform.left
    return torch.cat([transform.left, transform.right], dim=2)


def _query_terms(transform: QueryTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """c = R^T q ([B, r]) and the Gram matrix G = R^T R ([B, r, r]), shared by every row."""
    right = transform.right
    return (torch.einsum("ber,be->br", right, transform.query),
            torch.bmm(right.transpose(1, 2), right))


def _combine(transform: QueryTransform, proj: torch.Tensor, qd: torch.Tensor | None,
             dd: torch.Tensor | None, c: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Cosines [B, N] from the projections proj = d [L | R] ([B, N, c]), q . d and ||d||^2."""
    r = transform.rank
    p = proj[..., :r]
    num = transform.scale * torch.einsum("bnr,br->bn", p, c)
    sq = transform.scale ** 2 * (torch.matmul(p, gram) * p).sum(-1)
    if transform.anchor != 0:
        a = transform.anchor
        num = num + a * qd
        sq = sq + a * a * dd + 2.0 * a * transform.scale * (p * proj[..., r:]).sum(-1)
    return num / sq.clamp_min(NORM_EPS ** 2).sqrt()


def scores(transform: QueryTransform, gallery: torch.Tensor) -> torch.Tensor:
    """Cosine of every query against every row of ``gallery`` [N, E] under its own map: [B, N].

    The projection of the whole gallery onto every query's factors is one matrix product;
    memory is O(B N r), so use :func:`topk` for large galleries.
    """
    dtype = _compute_dtype(transform.query.dtype, gallery.dtype)
    t = transform.to(dtype=dtype)
    g = gallery.to(device=t.query.device, dtype=dtype)
    factors = _factors(t)
    batch, dim, width = factors.shape
    proj = (g @ factors.permute(1, 0, 2).reshape(dim, batch * width))
    proj = proj.view(g.shape[0], batch, width).transpose(0, 1)
    c, gram = _query_terms(t)
    qd = (t.query @ g.T) if t.anchor != 0 else None
    dd = (g * g).sum(-1) if t.anchor != 0 else None
    return _combine(t, proj, qd, dd, c, gram)


def candidate_scores(transform: QueryTransform, candidates: torch.Tensor) -> torch.Tensor:
    """Scores [B, M] of candidates [B, M, E], row b of them under query b's own map."""
    if candidates.dim() != 3 or candidates.shape[0] != transform.batch_size:
        raise ValueError(f"candidates must be [B={transform.batch_size}, M, E], "
                         f"got shape {tuple(candidates.shape)}")
    dtype = _compute_dtype(transform.query.dtype, candidates.dtype)
    t = transform.to(dtype=dtype)
    cand = candidates.to(device=t.query.device, dtype=dtype)
    proj = torch.bmm(cand, _factors(t))
    c, gram = _query_terms(t)
    qd = torch.einsum("bme,be->bm", cand, t.query) if t.anchor != 0 else None
    dd = (cand * cand).sum(-1) if t.anchor != 0 else None
    return _combine(t, proj, qd, dd, c, gram)


def dense_scores(transform: QueryTransform, gallery: torch.Tensor) -> torch.Tensor:
    """Reference scores that form each query's E x E matrix W: [B, N] (slow; for tests).

    ``gallery`` is [N, E] (shared by all queries) or [B, M, E] (one set per query). Rows are
    mapped as d W with W = anchor*I + scale * left right^T, then normalised.
    """
    dtype = _compute_dtype(transform.query.dtype, gallery.dtype)
    t = transform.to(dtype=dtype)
    g = gallery.to(device=t.query.device, dtype=dtype)
    eye = torch.eye(t.dim, dtype=dtype, device=g.device)
    w = t.anchor * eye + t.scale * torch.bmm(t.left, t.right.transpose(1, 2))
    mapped = torch.matmul(g, w) if g.dim() == 2 else torch.bmm(g, w)
    return torch.einsum("be,bne->bn", t.query, F.normalize(mapped, dim=-1))


def read_rows(gallery: Gallery, start: int, stop: int, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of a tensor, array or memmap as a tensor of ``dtype`` on ``device``.

    The streaming searches read the gallery through this, one chunk at a time.
    """
    chunk = gallery[start:stop]
    if not isinstance(chunk, torch.Tensor):
        # a copy: a read-only memmap cannot back a tensor
        chunk = torch.from_numpy(np.array(chunk, order="C", copy=True))
    return chunk.to(device=device, dtype=dtype)


def merge_topk(best_s: torch.Tensor, best_i: torch.Tensor, new_s: torch.Tensor,
               new_i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of the union of a running top-k and a new chunk, ties broken by lower index.

    ``best_s``/``best_i`` [B, <=k] are the running scores and indices (sorted as this returns
    them, possibly empty), ``new_s``/``new_i`` [B, n] a chunk whose indices are increasing and
    all larger than the running ones. Returns the merged (scores, indices), sorted descending.
    Invariant that makes ties exact: among equal scores, position in the concatenation
    [running, chunk] follows the global index (the running list is sorted with ties by index
    and every chunk index is larger than every running one).
    """
    s = torch.cat([best_s, new_s], dim=1)
    i = torch.cat([best_i, new_i], dim=1)
    kk = min(k, s.shape[1])
    if s.shape[1] > kk:
        kth = torch.topk(s, kk, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
        above = s > kth
        tied = s == kth
        room = kk - above.sum(dim=1, keepdim=True)
        keep = above | (tied & (tied.cumsum(dim=1) <= room))
        pos = keep.nonzero()[:, 1].view(s.shape[0], kk)
        s, i = s.gather(1, pos), i.gather(1, pos)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    return s.gather(1, order), i.gather(1, order)


def _empty(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(batch, 0, dtype=torch.float32, device=device),
            torch.empty(batch, 0, dtype=torch.int64, device=device))


def _check_gallery(gallery: Gallery, dim: int, k: int) -> int:
    if len(gallery.shape) != 2 or gallery.shape[1] != dim:
        raise ValueError(f"gallery must be [N, E={dim}], got shape {tuple(gallery.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return gallery.shape[0]


def _orthonormal_basis(right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q [B, E, k] with orthonormal columns and T [B, k, r] such that right = Q T.

    Cholesky QR in float64 (two small BLAS-3 steps; LAPACK's batched QR can be orders of
    magnitude slower on busy CPUs), with Householder QR for the queries whose R is rank
    deficient or too ill-conditioned for it.
    """
    r64 = right.double()
    batch, dim, rank = r64.shape
    if rank > dim:
        q_basis, tri = torch.linalg.qr(r64)
        return q_basis.to(right.dtype), tri.to(right.dtype)
    tri, info = torch.linalg.cholesky_ex(r64.transpose(1, 2) @ r64, upper=True)
    q_basis = torch.linalg.solve_triangular(tri, r64, upper=True, left=False)
    eye = torch.eye(rank, dtype=torch.float64, device=right.device)
    error = (q_basis.transpose(1, 2) @ q_basis - eye).abs().amax(dim=(1, 2))
    bad = (info != 0) | ~(error <= ORTHONORMAL_TOL)
    if bad.any():
        q_basis[bad], tri[bad] = torch.linalg.qr(r64[bad])
    return q_basis.to(right.dtype), tri.to(right.dtype)


def _search_columns(transform: QueryTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query columns [B, E, c] = [A | Q] (just A when unanchored) and w [B, E]."""
    a, s = transform.anchor, transform.scale
    q_basis, tri = _orthonormal_basis(transform.right)  # R = Q T, Q orthonormal
    mixed = s * transform.left @ tri.transpose(1, 2)
    w = a * transform.query + s * torch.einsum(
        "ber,br->be", transform.left, torch.einsum("ber,be->br", transform.right, transform.query))
    if a == 0:
        return mixed, w
    return torch.cat([mixed + a * q_basis, q_basis], dim=2), w


def _search_scores(num: torch.Tensor, proj: torch.Tensor, anchor: float,
                   dd: torch.Tensor | None) -> torch.Tensor:
    """Cosines [n, b] from num = d . w ([n, b]), proj = d [A | Q] ([n, b, c]) and ||d||^2
    (broadcastable to [n, b]). The one formula of every exact streaming score."""
    if anchor == 0:
        sq = torch.linalg.vector_norm(proj, dim=-1).square()
    else:
        width = proj.shape[-1] // 2
        sq = (torch.linalg.vector_norm(proj[..., :width], dim=-1).square()
              + anchor * anchor * (dd
                                   - torch.linalg.vector_norm(proj[..., width:], dim=-1).square()))
    return num / sq.clamp_min(NORM_EPS ** 2).sqrt()


# ------------------------------------------------------------------------------------------
# Pruned exact search for identity-anchored maps
#
# With W = a I + s L R^T (rows mapped as d W), the numerator is d . w with w = W q, and
# ||dW||^2 = a^2 ||d||^2 + d M d^T with M = W W^T - a^2 I = [L|R] C [L|R]^T, of rank <= 2r.
# With the eigen-decomposition M = sum_i lam_i e_i e_i^T (a 2r x 2r problem, map_spectrum),
# keeping a set J of j directions exactly and bounding the others by the extreme remaining
# eigenvalues lam_lo <= 0 <= lam_hi (0 stands for every direction outside [L|R]):
#
#     a^2 ||d||^2 + sum_J lam_i x_i^2 + lam_lo rho  <=  ||dW||^2  <=  ... + lam_hi rho,
#     x_i = d . e_i,  rho = ||d||^2 - sum_J x_i^2,
#
# so 1 + j dot products per row and query bound the row's exact score from both sides. A row
# whose upper bound is below the k-th best lower bound seen so far (exact scores of the running
# top k included) cannot enter the top k; the others are rescored with the exact formula.

#: most eigen-directions of M a query keeps exactly in its bounds
PRUNE_MAX_DIRECTIONS = 8
#: cost of rescoring one (query, row) pair, in dot products per factor column (the gather, the
#: bookkeeping), used only to choose j
RESCORE_COST = 2.0
#: a query whose expected (or, in a chunk, actual) share of rows to rescore exceeds this is scored
#: on every row with the full path's one matrix product per block (no bounds, no gather): with
#: RESCORE_COST = 2 the bounds would save at most half of today's cost, and the share is a
#: rough estimate
DENSE_FRACTION = 0.25
#: relative margin of each score bound for the final square root and division (in units of
#: float32's unit roundoff: scores are compared and merged in float32)
SCORE_MARGIN_ULPS = 8.0
#: per-query [B, n] temporaries of the bounds, counted against BLOCK_ELEMENTS
BOUND_TEMPORARIES = 8


def map_spectrum(transform: QueryTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [B, m] (ascending) and orthonormal eigenvectors [B, E, m] of each query's
    M = W W^T - a^2 I, m = min(E, 2r), computed in float64.

    W = a I + s L R^T gives M = [L|R] C [L|R]^T with C = [[s^2 R^T R, a s I], [a s I, 0]]; with
    [L|R] = Q T (Q orthonormal) M = Q (T C T^T) Q^T, so the eigen-problem is m x m. Every other
    direction of R^E has eigenvalue 0.
    """
    t = transform.detach().to(dtype=torch.float64)
    a, s, r = t.anchor, t.scale, t.rank
    basis, tri = _orthonormal_basis(torch.cat([t.left, t.right], dim=2))
    gram = t.right.transpose(1, 2) @ t.right
    eye = torch.eye(r, dtype=torch.float64, device=gram.device).expand_as(gram)
    core = torch.cat([torch.cat([s * s * gram, a * s * eye], dim=2),
                      torch.cat([a * s * eye, torch.zeros_like(gram)], dim=2)], dim=1)
    values, vectors = torch.linalg.eigh(tri @ core @ tri.transpose(1, 2))
    return values, basis @ vectors


def _matmul_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of float matrix products in ``dtype`` under torch's matmul precision."""
    if dtype == torch.float64:
        return 2.0 ** -53
    if torch.backends.cuda.matmul.allow_tf32:
        return 2.0 ** -11
    return {"highest": 2.0 ** -24, "high": 2.0 ** -11}.get(
        torch.get_float32_matmul_precision(), 2.0 ** -8)


def _expected_share(lam_lo: torch.Tensor, lam_hi: torch.Tensor, anchor: float, n_rows: int,
                    k: int, chunk_rows: int) -> torch.Tensor:
    """A rough share of rows to rescore when the directions not kept have eigenvalues in
    [lam_lo, lam_hi]; only used to choose j (and whether to bound at all).

    A Gaussian model of the scores: the k-th best sits at the standard score z of k/N; a row's
    upper bound exceeds its score by at most the factor f = sqrt((a^2 + lam_hi) /
    (a^2 + lam_lo)) and a lower bound falls short of it by as much, so rows scoring above
    about z / f^2 survive; plus the k/N (ln chunks) rows that enter the running top k of
    later chunks. (On the demo's trained maps this predicts 32% of rows for j = 0 and 1.9% for
    j = 2 where 31% and 1.8% were measured.)"""
    p = min(1.0, k / max(1, n_rows))
    z = NormalDist().inv_cdf(1.0 - p) if p < 1.0 else -math.inf
    a2 = anchor * anchor
    ratio = (a2 + lam_hi) / (a2 + lam_lo).clamp_min(1e-300)
    beyond = torch.special.ndtr(-z / ratio) if math.isfinite(z) else torch.ones_like(ratio)
    entering = p * math.log(max(1.0, n_rows / chunk_rows))
    return (beyond + entering).clamp(max=1.0)


@dataclass
class PrunePlan:
    """Per-query pieces of the pruned search (see :func:`prune_plan`)."""

    anchor: float
    columns: torch.Tensor  # [B, E, c]: the exact path's factor columns [A | Q]
    mat: torch.Tensor  # [E, B + J]: numerator vectors w_1..w_B, then every kept direction
    owner: torch.Tensor  # [J] int64: the query of each kept direction (ascending)
    lam: torch.Tensor  # [J]: its eigenvalue
    lam_lo: torch.Tensor  # [B] smallest eigenvalue bound of the directions not kept (<= 0)
    lam_hi: torch.Tensor  # [B] largest (>= 0)
    margin: torch.Tensor  # [B] margin of ||dW||^2, in units of ||d||^2
    num_margin: torch.Tensor  # [B] margin of the numerator, in units of ||d||
    score_margin: float  # relative margin of each score bound
    bounded: torch.Tensor  # [B] bool; False: scored on every row (spectrum too spread)
    directions: torch.Tensor  # [B] int64: j, the directions kept per query

    @property
    def batch_size(self) -> int:
        return self.columns.shape[0]

    def __getitem__(self, sl: slice) -> "PrunePlan":
        """The plan of queries ``sl`` (a slice of consecutive queries)."""
        first = int(self.directions[:sl.start].sum())
        count = int(self.directions[sl].sum())
        batch = self.batch_size
        cols = torch.cat([self.mat[:, sl], self.mat[:, batch + first:batch + first + count]], 1)
        return PrunePlan(self.anchor, self.columns[sl], cols,
                         self.owner[first:first + count] - sl.start,
                         self.lam[first:first + count], self.lam_lo[sl], self.lam_hi[sl],
                         self.margin[sl], self.num_margin[sl], self.score_margin,
                         self.bounded[sl], self.directions[sl])


def _rounding_margins(t: QueryTransform, columns: torch.Tensor, w: torch.Tensor,
                      values: torch.Tensor, kept: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins [B] of ||dW||^2 (in units of ||d||^2) and of the numerator (in units of ||d||)
    under which the bounds hold for the scores either exact path computes, rounding included.

    With gamma = E u / (1 - E u) (u: the matrix products' unit roundoff), a computed dot product
    d . v is within gamma ||d|| ||v|| of the exact one, whatever the summation order. Hence:
    the two paths' numerators (one product each, same w) differ by at most 2 gamma ||w|| ||d||;
    the exact path's ||dA||^2 + a^2 (||d||^2 - ||dQ||^2) is within
    gamma (2 ||A||_2 ||A||_F + 2 a^2 ||Q||_F + ||A||_2^2 + a^2) ||d||^2 of ||dW||^2
    (||A||_2^2 <= a^2 + ||M||); the bounds' a^2 ||d||^2 + sum_J (lam_i - lam_b) x_i^2 + lam_b
    ||d||^2 within gamma (4 sqrt(j) ||M|| + a^2 + ||M||) ||d||^2. The non-orthonormality of
    the float64 bases (at most ORTHONORMAL_TOL) adds 8 ORTHONORMAL_TOL (a^2 + ||M||).
    """
    dim, r = t.dim, t.rank
    u = _matmul_roundoff(t.query.dtype)
    gamma = dim * u / (1 - dim * u)
    a2 = t.anchor * t.anchor
    norm_m = values.abs().amax(dim=1)
    a_spec = (a2 + norm_m).sqrt()
    a_fro = torch.linalg.vector_norm(columns[..., :r].double(), dim=(1, 2))
    q_fro = torch.linalg.vector_norm(columns[..., r:].double(), dim=(1, 2))
    exact_path = 2 * a_spec * a_fro + 2 * a2 * q_fro + a_spec ** 2 + a2
    bounds = 4 * kept.double().sqrt() * norm_m + a2 + norm_m
    margin = gamma * (exact_path + bounds) + 8 * ORTHONORMAL_TOL * (a2 + norm_m)
    return margin, 2 * gamma * torch.linalg.vector_norm(w.double(), dim=1)


def prune_plan(transform: QueryTransform, n_rows: int, k: int, chunk_rows: int = 65536,
               directions: int | None = None) -> PrunePlan:
    """What the pruned search needs per query: the kept eigen-directions of M, the bounds of the
    others, the margins and the exact path's columns.

    Each query keeps the j <= ``PRUNE_MAX_DIRECTIONS`` directions (the largest positive and
    most negative eigenvalues, split to leave the narrowest interval [lam_lo, lam_hi]) that
    minimise j + RESCORE_COST * 2r * (expected share of rows to rescore); a query whose best
    expected share exceeds ``DENSE_FRACTION`` is scored on every row (today's path, no bounds).
    ``directions`` forces j for every query (tests, benchmarks). ``transform`` must be
    anchored and on the device and dtype of the search.
    """
    if transform.anchor == 0:
        raise ValueError("the pruned search needs an identity-anchored map (anchor != 0)")
    t = transform
    a, dtype, device = t.anchor, t.query.dtype, t.query.device
    batch, dim = t.batch_size, t.dim
    columns, w = _search_columns(t)
    values, vectors = map_spectrum(t)
    m = values.shape[1]
    top = min(PRUNE_MAX_DIRECTIONS if directions is None else directions, m)
    zero = values.new_zeros(batch)
    options = []  # (j_pos, j_neg, lam_lo, lam_hi)
    for j in range(top + 1) if directions is None else [top]:
        for jp in range(j + 1):
            jn = j - jp
            hi = values[:, m - 1 - jp].clamp_min(0) if jp < m else zero
            lo = values[:, jn].clamp_max(0) if jn < m else zero
            options.append((jp, jn, lo, hi))
    share = _expected_share(torch.stack([lo for _, _, lo, _ in options], dim=1),
                            torch.stack([hi for _, _, _, hi in options], dim=1),
                            a, n_rows, k, chunk_rows)  # [B, options]
    cost = (torch.tensor([jp + jn for jp, jn, _, _ in options], dtype=torch.float64,
                         device=device) + RESCORE_COST * columns.shape[2] * share)
    choice = cost.argmin(dim=1)
    best_share = share.gather(1, choice[:, None])[:, 0]
    bounded = (best_share <= DENSE_FRACTION) if directions is None else torch.ones_like(
        best_share, dtype=torch.bool)
    kept, lam, owner = [], [], []
    for b, o in enumerate(choice.tolist()):
        jp, jn = options[o][:2]
        if not bounded[b]:
            continue
        index = list(range(jn)) + list(range(m - 1, m - 1 - jp, -1))
        kept.append(vectors[b][:, index])
        lam.append(values[b, index])
        owner += [b] * len(index)
    count = len(owner)
    lam = torch.cat(lam) if lam else values.new_zeros(0)
    owner_t = torch.tensor(owner, dtype=torch.int64, device=device)
    mat = torch.cat([w.T.to(torch.float64)] + kept, dim=1) if kept else w.T.to(torch.float64)
    lam_lo = torch.stack([options[o][2][b] for b, o in enumerate(choice.tolist())])
    lam_hi = torch.stack([options[o][3][b] for b, o in enumerate(choice.tolist())])
    directions_kept = torch.bincount(owner_t, minlength=batch) if count else torch.zeros(
        batch, dtype=torch.int64, device=device)
    margin, num_margin = _rounding_margins(t, columns, w, values, directions_kept)
    return PrunePlan(anchor=a, columns=columns, mat=mat.to(dtype), owner=owner_t,
                     lam=lam.to(dtype),
                     lam_lo=lam_lo.to(dtype), lam_hi=lam_hi.to(dtype), margin=margin.to(dtype),
                     num_margin=num_margin.to(dtype),
                     score_margin=SCORE_MARGIN_ULPS * torch.finfo(torch.float32).eps / 2,
                     bounded=bounded, directions=directions_kept)


def _bound_terms(plan: PrunePlan, rows: torch.Tensor, dd: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
    """(num, sq_lo, sq_hi, shift), each [B, n]: numerators, the bounds of ||dW||^2 (margins
    included) and the numerators' margin, for every query of ``plan`` and row of ``rows``."""
    batch = plan.batch_size
    x = (rows @ plan.mat).T  # [B + J, n]: one product for numerators and kept directions
    num = x[:batch]
    a2 = plan.anchor * plan.anchor
    sq_lo = (a2 - plan.margin)[:, None] * dd[None]
    sq_hi = (a2 + plan.margin)[:, None] * dd[None]
    rest = dd[None].expand(batch, -1)
    if plan.owner.numel():
        kept = x[batch:].square_()
        seen = torch.zeros_like(num).index_add_(0, plan.owner, kept)  # sum_J x_i^2
        exact = torch.zeros_like(num).index_add_(0, plan.owner, kept.mul_(plan.lam[:, None]))
        sq_lo += exact
        sq_hi += exact
        rest = (rest - seen).clamp_min_(0)
    sq_lo.addcmul_(plan.lam_lo[:, None], rest)
    sq_hi.addcmul_(plan.lam_hi[:, None], rest)
    shift = plan.num_margin[:, None] * dd.sqrt()[None]
    return num, sq_lo, sq_hi, shift


def _upper_bound(num, sq_lo, sq_hi, shift, score_margin: float) -> torch.Tensor:
    """Upper bounds of num / sqrt(max(||dW||^2, eps^2)): a positive numerator over the smallest
    norm, a negative one over the largest (the numerator at the top of its margin)."""
    top = num + shift
    floor = NORM_EPS ** 2
    upper = top * torch.where(top >= 0, sq_lo, sq_hi).clamp_min_(floor).rsqrt_()
    return upper.add_(upper.abs(), alpha=score_margin)


def _lower_bound(num, sq_lo, sq_hi, shift, score_margin: float) -> torch.Tensor:
    """Lower bounds, as :func:`_upper_bound` (the numerator at the bottom of its margin)."""
    bottom = num - shift
    floor = NORM_EPS ** 2
    lower = bottom * torch.where(bottom >= 0, sq_hi, sq_lo).clamp_min_(floor).rsqrt_()
    return lower.sub_(lower.abs(), alpha=score_margin)


def score_bounds(plan: PrunePlan, rows: torch.Tensor, dd: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(numerators, lower bounds, upper bounds), each [B, n], of the exact scores of ``rows``
    [n, E] (in the plan's dtype and device) for every query of ``plan``; ``dd`` = ||d||^2 [n].

    Valid for the scores either exact path computes (rounding included, through the plan's
    margins). A query scored on every row gets bounds -inf and +inf.
    """
    if dd is None:
        dd = torch.linalg.vector_norm(rows, dim=1).square()
    terms = _bound_terms(plan, rows, dd)
    upper = _upper_bound(*terms, plan.score_margin)
    lower = _lower_bound(*terms, plan.score_margin)
    if not bool(plan.bounded.all()):
        upper[~plan.bounded] = float("inf")
        lower[~plan.bounded] = float("-inf")
    return terms[0], lower, upper


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices [b, width] of each row's True entries, in order, padded with 0, and the
    mask [b, width] of the real ones (width = the most True entries of a row)."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    which, cols = mask.nonzero(as_tuple=True)
    offsets = torch.cumsum(counts, 0) - counts
    pos = torch.arange(which.shape[0], device=mask.device) - offsets[which]
    index = torch.zeros(mask.shape[0], width, dtype=torch.int64, device=mask.device)
    valid = torch.zeros(mask.shape[0], width, dtype=torch.bool, device=mask.device)
    index[which, pos] = cols
    valid[which, pos] = True
    return index, valid


def _groups(sizes: list[int], per_item: int) -> list[list[int]]:
    """Consecutive groups of items (sorted by size) whose padded size x count x ``per_item``
    stays under BLOCK_ELEMENTS (at least one item per group)."""
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * sizes[i] * per_item > BLOCK_ELEMENTS:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _rescore_dense(plan: PrunePlan, queries: list[int], rows: torch.Tensor, num: torch.Tensor,
                   dd: torch.Tensor) -> torch.Tensor:
    """Exact scores [len(queries), n] of every row for some queries of the plan."""
    n, dim = rows.shape
    c = plan.columns.shape[2]
    out = []
    step = max(1, BLOCK_ELEMENTS // max(1, n * c))
    for g in range(0, len(queries), step):
        sel = torch.tensor(queries[g:g + step], device=rows.device)
        mat = plan.columns[sel].permute(1, 0, 2).reshape(dim, -1)
        proj = (rows @ mat).view(n, -1, c)
        out.append(_search_scores(num[sel].T, proj, plan.anchor, dd[:, None]).T)
    return torch.cat(out)


def _rescore_sparse(plan: PrunePlan, queries: torch.Tensor, index: torch.Tensor,
                    rows: torch.Tensor, num: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """Exact scores [b, s] of rows ``index`` [b, s] (padded) for queries ``queries`` [b]."""
    proj = torch.bmm(rows[index], plan.columns[queries])  # [b, s, c]
    return _search_scores(num[queries].gather(1, index), proj, plan.anchor, dd[index])


def _topk_pruned(t: QueryTransform, gallery: Gallery, k: int, chunk_rows: int, n_rows: int,
                 stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk` with pruning (identity-anchored maps)."""
    device, dtype = t.query.device, t.query.dtype
    plan = prune_plan(t, n_rows, k, chunk_rows)
    batch, dim, c = plan.columns.shape
    n_chunk = max(1, min(chunk_rows, n_rows))
    # query blocks: the bounds' matrix product and temporaries stay under BLOCK_ELEMENTS
    per_query = (1 + plan.directions + BOUND_TEMPORARIES).tolist()
    blocks, begin, used = [], 0, 0
    for b, size in enumerate(per_query):
        if b > begin and (used + size) * n_chunk > BLOCK_ELEMENTS:
            blocks.append(slice(begin, b))
            begin, used = b, 0
        used += size
    blocks.append(slice(begin, batch))
    plans = [plan[sl] for sl in blocks]
    all_bounded = {sl.start: bool(p.bounded.all()) for sl, p in zip(blocks, plans)}
    best_s = torch.full((batch, k), float("-inf"), dtype=torch.float32, device=device)
    best_i = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    rescored = 0
    for start in range(0, n_rows, chunk_rows):
        rows = read_rows(gallery, start, min(start + chunk_rows, n_rows), device, dtype)
        n = rows.shape[0]
        dd = torch.linalg.vector_norm(rows, dim=1).square()
        for sl, p in zip(blocks, plans):
            terms = _bound_terms(p, rows, dd)
            num = terms[0]
            # compared as the exact scores are merged, in float32 (rounding is monotone, so
            # the float32 bounds still bound the float32 scores)
            upper = _upper_bound(*terms, p.score_margin).float()
            if not all_bounded[sl.start]:
                upper[~p.bounded] = float("inf")
            # rows that may beat the k-th best exact score so far
            cand = upper >= best_s[sl, k - 1:k]
            index, valid = _compact(cand)
            if index.shape[1] == 0:
                continue
            lower = _lower_bound(*(x.gather(1, index) for x in terms), p.score_margin).float()
            lower = lower.masked_fill_(~(valid & p.bounded[:, None]), float("-inf"))
            # k-th best of (running exact scores, candidates' lower bounds): k distinct rows
            # score at least this, so a row whose upper bound is below it cannot enter
            pool = torch.cat([best_s[sl], lower], dim=1)
            tau = torch.topk(pool, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
            keep = valid & (upper.gather(1, index) >= tau)
            counts = keep.sum(dim=1)
            dense = [b for b, cnt in enumerate(counts.tolist()) if cnt > DENSE_FRACTION * n]
            sparse = [b for b, cnt in enumerate(counts.tolist())
                      if 0 < cnt <= DENSE_FRACTION * n]
            if dense:
                s = _rescore_dense(p, dense, rows, num, dd).float()
                ids = torch.arange(start, start + n, device=device).expand(len(dense), -1)
                q = torch.tensor(dense, device=device) + sl.start
                best_s[q], best_i[q] = merge_topk(best_s[q], best_i[q], s, ids, k)
                rescored += n * len(dense)
            if sparse:
                sel = torch.tensor(sparse, device=device)
                kidx, kvalid = _compact(keep[sel])
                rows_idx = index[sel].gather(1, kidx)
                sizes = kvalid.sum(dim=1).tolist()
                rescored += sum(sizes)
                for group in _groups(sizes, dim + c):
                    g = torch.tensor(group, device=device)
                    width = max(sizes[i] for i in group)
                    gi, gv = rows_idx[g, :width], kvalid[g, :width]
                    s = _rescore_sparse(p, sel[g], gi, rows, num, dd).float()
                    s = s.masked_fill(~gv, float("-inf"))
                    ids = torch.where(gv, gi + start, start + n)
                    q = sel[g] + sl.start
                    best_s[q], best_i[q] = merge_topk(best_s[q], best_i[q], s, ids, k)
    if stats is not None:
        stats.update(rescored=rescored, pairs=n_rows * batch,
                     directions=torch.where(plan.bounded, plan.directions, -1).tolist())
    kk = min(k, n_rows)
    return best_s[:, :kk], best_i[:, :kk]


TOPK_METHODS = ("pruned", "full")


@torch.no_grad()
def topk(transform: QueryTransform, gallery: Gallery, k: int, chunk_rows: int = 65536,
         device: torch.device | str | None = None, method: str = "pruned",
         stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows of ``gallery`` [N, E] for every query, streaming the gallery in chunks.

    ``gallery`` may be a tensor, a numpy array, an ``np.memmap`` (fp16 or fp32) or a
    :class:`quari.store.ShardedRows`; each chunk of ``chunk_rows`` rows is read once and
    converted to float32 (float64 for a float64 transform) on ``device`` (default: the
    transform's). Queries are processed in blocks so one projected block stays under
    ``BLOCK_ELEMENTS`` values: memory is bounded for any N. ``k`` larger than N returns N. Ties
    go to the lower row index.

    ``method="pruned"`` (default): for identity-anchored maps, the exact search that bounds every
    row's score from 1 + j dot products and rescores only the rows that can still enter the top k
    (:func:`prune_plan`, :func:`score_bounds`); maps without an anchor (the paper variant) use
    their r-column path. ``method="full"``: every row scored on all factor columns (the
    reference). Both return the same rows; scores agree to float rounding. ``stats``, if given,
    receives the number of (query, row) pairs scored exactly (``"rescored"``) and in all
    (``"pairs"``), and the directions kept per query (``"directions"``, -1 for a query scored
    on every row).

    Returns (scores [B, k] float32, indices [B, k] int64 global row indices) on ``device``.
    """
    if method not in TOPK_METHODS:
        raise ValueError(f"method must be one of {TOPK_METHODS}, got {method!r}")
    n_rows = _check_gallery(gallery, transform.dim, k)
    device = torch.device(device) if device is not None else transform.query.device
    dtype = _compute_dtype(transform.query.dtype)
    t = transform.detach().to(device=device, dtype=dtype)
    if method == "pruned" and t.anchor != 0:
        return _topk_pruned(t, gallery, k, chunk_rows, n_rows, stats)
    if stats is not None:
        stats.update(rescored=n_rows * t.batch_size, pairs=n_rows * t.batch_size,
                     directions=[-1] * t.batch_size)
    return _topk_full(t, gallery, k, chunk_rows, n_rows)


def _topk_full(t: QueryTransform, gallery: Gallery, k: int, chunk_rows: int, n_rows: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk` scoring every row on all factor columns of its query."""
    device, dtype = t.query.device, t.query.dtype
    columns, w = _search_columns(t)
    batch, dim, c = columns.shape
    block = max(1, min(batch, BLOCK_ELEMENTS // max(1, min(chunk_rows, n_rows) * c)))
    blocks = [slice(b, min(b + block, batch)) for b in range(0, batch, block)]
    # [E, b*c] per block: the projection of a chunk onto a block's columns is one matmul
    mats = [columns[sl].permute(1, 0, 2).reshape(dim, -1) for sl in blocks]
    best = [_empty(sl.stop - sl.start, device) for sl in blocks]
    for start in range(0, n_rows, chunk_rows):
        rows = read_rows(gallery, start, min(start + chunk_rows, n_rows), device, dtype)
        ids = torch.arange(start, start + rows.shape[0], device=device)
        num = rows @ w.T  # [n, B]: every numerator in one product
        dd = (rows * rows).sum(-1) if t.anchor != 0 else None
        for j, (sl, mat) in enumerate(zip(blocks, mats)):
            proj = (rows @ mat).view(rows.shape[0], -1, c)
            s = _search_scores(num[:, sl], proj, t.anchor,
                               None if dd is None else dd[:, None]).T.float()
            best[j] = merge_topk(*best[j], s, ids.expand(s.shape[0], -1), k)
    return torch.cat([b[0] for b in best]), torch.cat([b[1] for b in best])


@torch.no_grad()
def cosine_topk(queries: torch.Tensor, gallery: Gallery, k: int, chunk_rows: int = 65536,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows by plain cosine similarity (the frozen-backbone baseline), streaming.

    Same inputs, chunking, tie rule and outputs as :func:`topk`; queries and rows are
    normalised, so unnormalised inputs give true cosines.
    """
    n_rows = _check_gallery(gallery, queries.shape[1], k)
    device = torch.device(device) if device is not None else queries.device
    dtype = _compute_dtype(queries.dtype)
    q = F.normalize(queries.detach().to(device=device, dtype=dtype), dim=-1)
    best = _empty(q.shape[0], device)
    for start in range(0, n_rows, chunk_rows):
        rows = read_rows(gallery, start, min(start + chunk_rows, n_rows), device, dtype)
        ids = torch.arange(start, start + rows.shape[0], device=device)
        s = q @ F.normalize(rows, dim=-1).T
        best = merge_topk(*best, s.float(), ids.expand(s.shape[0], -1), k)
    return best


def rerank(transform: QueryTransform, candidates: torch.Tensor,
           candidate_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-order each query's shortlist by its own map: (scores [B, K], ids [B, K]), descending.

    ``candidates`` [B, K, E] are the shortlisted rows, ``candidate_ids`` [B, K] their ids; ties
    keep the shortlist order.
    """
    if candidate_ids.shape != candidates.shape[:2]:
        raise ValueError(f"candidate_ids must be [B, K] = {tuple(candidates.shape[:2])}, "
                         f"got shape {tuple(candidate_ids.shape)}")
    s = candidate_scores(transform, candidates)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    return s.gather(1, order), candidate_ids.to(s.device).gather(1, order)
