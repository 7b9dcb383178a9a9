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
import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from quari.transform import BasisQueryTransform, QueryTransform

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


def _query_terms(transform: QueryTransform | BasisQueryTransform
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """c = R^T q ([B, r]) and the Gram matrix G = R^T R ([B, r, r]), shared by every row."""
    if isinstance(transform, BasisQueryTransform):  # R = basis @ coef, per query
        basis, coef = transform.right_basis, transform.right_coef
        c = torch.einsum("bk,bkr->br", transform.query @ basis, coef)
        return c, coef.transpose(1, 2) @ (basis.T @ basis) @ coef
    right = transform.right
    return (torch.einsum("ber,be->br", right, transform.query),
            torch.bmm(right.transpose(1, 2), right))


def _basis_sides(transform: BasisQueryTransform) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(basis, coefficients) of the left factor, then of the right one when the map is anchored."""
    sides = [(transform.left_basis, transform.left_coef)]
    if transform.anchor != 0:
        sides.append((transform.right_basis, transform.right_coef))
    return sides


def _project(transform: QueryTransform | BasisQueryTransform,
             gallery: torch.Tensor) -> torch.Tensor:
    """d [L | R] for every query and gallery row: [B, N, c] (c = r, or 2r when anchored)."""
    n = gallery.shape[0]
    if isinstance(transform, BasisQueryTransform):
        parts = []
        for basis, coef in _basis_sides(transform):  # rows onto the shared basis once
            batch, k, r = coef.shape
            proj = (gallery @ basis) @ coef.permute(1, 0, 2).reshape(k, batch * r)
            parts.append(proj.view(n, batch, r).transpose(0, 1))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    factors = _factors(transform)
    batch, dim, width = factors.shape
    proj = gallery @ factors.permute(1, 0, 2).reshape(dim, batch * width)
    return proj.view(n, batch, width).transpose(0, 1)


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


def scores(transform: QueryTransform | BasisQueryTransform,
           gallery: torch.Tensor) -> torch.Tensor:
    """Cosine of every query against every row of ``gallery`` [N, E] under its own map: [B, N].

    The projection of the whole gallery onto every query's factors is one matrix product;
    memory is O(B N r), so use :func:`topk` for large galleries.
    """
    dtype = _compute_dtype(transform.query.dtype, gallery.dtype)
    t = transform.to(dtype=dtype)
    g = gallery.to(device=t.query.device, dtype=dtype)
    proj = _project(t, g)
    c, gram = _query_terms(t)
    qd = (t.query @ g.T) if t.anchor != 0 else None
    dd = (g * g).sum(-1) if t.anchor != 0 else None
    return _combine(t, proj, qd, dd, c, gram)


def candidate_scores(transform: QueryTransform | BasisQueryTransform,
                     candidates: torch.Tensor) -> torch.Tensor:
    """Scores [B, M] of candidates [B, M, E], row b of them under query b's own map."""
    if candidates.dim() != 3 or candidates.shape[0] != transform.batch_size:
        raise ValueError(f"candidates must be [B={transform.batch_size}, M, E], "
                         f"got shape {tuple(candidates.shape)}")
    dtype = _compute_dtype(transform.query.dtype, candidates.dtype)
    t = transform.to(dtype=dtype)
    cand = candidates.to(device=t.query.device, dtype=dtype)
    if isinstance(t, BasisQueryTransform):
        proj = torch.cat([torch.bmm(cand @ basis, coef) for basis, coef in _basis_sides(t)],
                         dim=2)
    else:
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

    The streaming searches read the gallery through this, one chunk at a time. A memory-mapped
    chunk is converted straight from the map's pages (no intermediate copy); the result never
    shares memory with the map.
    """
    chunk = gallery[start:stop]
    if isinstance(chunk, torch.Tensor):
        return chunk.to(device=device, dtype=dtype)
    return _from_array(np.asarray(chunk), device, dtype)


def read_rows_at(gallery: Gallery, index: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """Rows ``index`` (int64 [m], increasing) of a tensor, array, memmap or
    :class:`quari.store.ShardedRows` as a tensor [m, E] of ``dtype`` on ``device``."""
    if isinstance(gallery, torch.Tensor):
        return gallery[index.to(gallery.device)].to(device=device, dtype=dtype)
    return _from_array(np.asarray(gallery[index.cpu().numpy()]), device, dtype)


def _from_array(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` on ``device`` with the values of ``array``, owning its memory."""
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        tensor = torch.from_numpy(array)
    else:
        # a read-only memmap: only read here (the .to below copies), so torch's warning about
        # writing through a non-writable array does not apply
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
    shared = isinstance(array, np.memmap) or not array.flags.owndata or not array.flags.writeable
    return tensor.to(device=device, dtype=dtype, copy=shared)


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

    Cholesky QR done twice in float64 (CholeskyQR2: the second pass restores the orthogonality
    the first loses on ill-conditioned factors, as trained QuARI's are, condition ~1e6), each
    pass one Gram product, a Cholesky factorisation and one product with the inverse of the
    small triangular factor (BLAS-3 only: LAPACK's batched Householder QR and triangular
    solves with E right-hand sides can take seconds on busy CPUs). Both |Q^T Q - I| and
    |Q T - right| (relative) are checked against ORTHONORMAL_TOL; queries whose R is rank
    deficient or too ill-conditioned take Householder QR.
    """
    r64 = right.double()
    batch, dim, rank = r64.shape
    if rank > dim:
        q_basis, tri = torch.linalg.qr(r64)
        return q_basis.to(right.dtype), tri.to(right.dtype)
    eye = torch.eye(rank, dtype=torch.float64, device=right.device)
    q_basis, tri = r64, None
    ok = torch.ones(batch, dtype=torch.bool, device=right.device)
    for _ in range(2):
        step, info = torch.linalg.cholesky_ex(q_basis.transpose(1, 2) @ q_basis, upper=True)
        ok &= info == 0
        step = torch.where(ok[:, None, None], step, eye)  # failed queries: redone below
        inverse = torch.linalg.solve_triangular(step, eye.expand_as(step), upper=True)
        q_basis = q_basis @ inverse
        tri = step if tri is None else step @ tri
    error = (q_basis.transpose(1, 2) @ q_basis - eye).abs().amax(dim=(1, 2))
    scale = r64.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
    residual = (q_basis @ tri - r64).abs().amax(dim=(1, 2)) / scale
    bad = ~ok | ~(error <= ORTHONORMAL_TOL) | ~(residual <= ORTHONORMAL_TOL)
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
# whose upper bound is below the k-th best lower bound seen so far (exact scores included)
# cannot enter the top k. The search screens every row of a chunk with a cheap upper bound (one
# more small matrix product and four passes over the [n, B] scores), computes both bounds for
# the rows that pass, and keeps in a per-query pool those whose upper bound reaches the running
# threshold; only the rows still in the pool after the last chunk (those that can beat the
# final threshold) are read again and rescored with the exact formula.

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
BOUND_TEMPORARIES = 4
#: a query's pool of rows awaiting their exact score is rescored early (its rows read again)
#: once it holds more than POOL_FACTOR * k rows (and at least POOL_MIN_ROWS), so memory stays
#: bounded however loose the bounds
POOL_FACTOR = 4
POOL_MIN_ROWS = 4096


def map_spectrum(transform: QueryTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [B, m] (ascending) and orthonormal eigenvectors [B, E, m] of each query's
    M = W W^T - a^2 I, m = min(E, 2r), computed in float64.

    W = a I + s L R^T gives M = [L|R] C [L|R]^T with C = [[s^2 R^T R, a s I], [a s I, 0]]; with
    [L|R] = Q T (Q orthonormal) M = Q (T C T^T) Q^T, so the eigen-problem is m x m. Every other
    direction of R^E has eigenvalue 0.
    """
    values, vectors, basis, _ = _spectrum(transform, exact=True)
    return values, basis @ vectors


def _spectrum(transform: QueryTransform, exact: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [B, m] ascending, V [B, m, m] orthonormal, Q [B, E, m], off [B]) with
    M = Q V (diag(values) + F) V^T Q^T and ||F||_F <= off, in float64 (see :func:`map_spectrum`).

    ``exact``: V from a float64 eigensolver (off = 0). Otherwise V comes from a float32 one
    (several times faster on CPU), orthonormalised in float64, and the values are the Rayleigh
    quotients of its columns; F is what is left off the diagonal, whose norm the pruned
    search's margins absorb (so its bounds stay rigorous whatever the float32 solver's error).
    """
    t = transform.detach().to(dtype=torch.float64)
    a, s, r = t.anchor, t.scale, t.rank
    basis, tri = _orthonormal_basis(torch.cat([t.left, t.right], dim=2))
    gram = t.right.transpose(1, 2) @ t.right
    eye = torch.eye(r, dtype=torch.float64, device=gram.device).expand_as(gram)
    core = torch.cat([torch.cat([s * s * gram, a * s * eye], dim=2),
                      torch.cat([a * s * eye, torch.zeros_like(gram)], dim=2)], dim=1)
    small = tri @ core @ tri.transpose(1, 2)
    small = (small + small.transpose(1, 2)) / 2
    if exact:
        values, vectors = torch.linalg.eigh(small)
        return values, vectors, basis, values.new_zeros(values.shape[0])
    vectors, _ = _orthonormal_basis(torch.linalg.eigh(small.float())[1].double())
    quotients = vectors.transpose(1, 2) @ small @ vectors
    values = quotients.diagonal(dim1=1, dim2=2)
    off = torch.linalg.matrix_norm(quotients - torch.diag_embed(values))
    values, order = torch.sort(values, dim=1)
    return values, vectors.gather(2, order[:, None, :].expand_as(vectors)), basis, off


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
    mat: torch.Tensor  # [E, B + J + 1]: numerator vectors w_1..w_B, every kept direction, 0
    screen: torch.Tensor  # [J + 1, B]: the screening bound's ||dW||^2 >= [x_J^2, ||d||^2] . this
    screen_hi: torch.Tensor  # [J + 1, B]: and ||dW||^2 <= [x_J^2, ||d||^2] . this
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
        cols = torch.cat([self.mat[:, sl], self.mat[:, batch + first:batch + first + count],
                          self.mat[:, -1:]], 1)
        screen, screen_hi = (torch.cat([m[first:first + count, sl], m[-1:, sl]])
                             for m in (self.screen, self.screen_hi))
        return PrunePlan(self.anchor, self.columns[sl], cols, screen, screen_hi,
                         self.owner[first:first + count] - sl.start,
                         self.lam[first:first + count], self.lam_lo[sl], self.lam_hi[sl],
                         self.margin[sl], self.num_margin[sl], self.score_margin,
                         self.bounded[sl], self.directions[sl])


def _rounding_margins(t: QueryTransform, columns: torch.Tensor, w: torch.Tensor,
                      values: torch.Tensor, kept: torch.Tensor, off: torch.Tensor
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
    the float64 bases (at most ORTHONORMAL_TOL) adds 8 ORTHONORMAL_TOL (a^2 + ||M||). The
    screening bound sums the same j + 1 terms (each at most (a^2 + 3 ||M||) ||d||^2 in size,
    from float32 coefficients) in one more matrix product of length J + 1 whose other entries
    are exact zeros: (PRUNE_MAX_DIRECTIONS + 3) u (a^2 + 3 ||M||) more covers it. An
    approximate eigen-decomposition (:func:`_spectrum`) adds its off-diagonal norm ``off``:
    |y^T F y| <= ||F||_2 ||y||^2 <= off ||d||^2.
    """
    dim, r = t.dim, t.rank
    u = _matmul_roundoff(t.query.dtype)
    gamma = dim * u / (1 - dim * u)
    a2 = t.anchor * t.anchor
    norm_m = values.abs().amax(dim=1) + off  # ||M||, with an approximate spectrum's error
    a_spec = (a2 + norm_m).sqrt()
    a_fro = torch.linalg.vector_norm(columns[..., :r].double(), dim=(1, 2))
    q_fro = torch.linalg.vector_norm(columns[..., r:].double(), dim=(1, 2))
    exact_path = 2 * a_spec * a_fro + 2 * a2 * q_fro + a_spec ** 2 + a2
    bounds = 4 * kept.double().sqrt() * norm_m + a2 + norm_m
    margin = (gamma * (exact_path + bounds) + 8 * ORTHONORMAL_TOL * (a2 + norm_m)
              + (PRUNE_MAX_DIRECTIONS + 3) * max(u, 2.0 ** -24) * (a2 + 3 * norm_m)
              + off * (1 + 8 * ORTHONORMAL_TOL))
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
    values, vectors, basis, off = _spectrum(t, exact=False)
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
        kept.append(basis[b] @ vectors[b][:, index])
        lam.append(values[b, index])
        owner += [b] * len(index)
    count = len(owner)
    lam = torch.cat(lam) if lam else values.new_zeros(0)
    owner_t = torch.tensor(owner, dtype=torch.int64, device=device)
    mat = torch.cat([w.T.to(torch.float64)] + kept + [values.new_zeros(dim, 1)], dim=1)
    lam_lo = torch.stack([options[o][2][b] for b, o in enumerate(choice.tolist())])
    lam_hi = torch.stack([options[o][3][b] for b, o in enumerate(choice.tolist())])
    directions_kept = torch.bincount(owner_t, minlength=batch) if count else torch.zeros(
        batch, dtype=torch.int64, device=device)
    margin, num_margin = _rounding_margins(t, columns, w, values, directions_kept, off)
    # ||dW||^2 >= (a^2 - margin + lam_lo) ||d||^2 + sum_J (lam_i - lam_lo) x_i^2: the lower
    # bound of the norm (rho not clamped at 0; the margin covers its rounding) as one product
    # (and <= (a^2 + margin + lam_hi) ||d||^2 + sum_J (lam_i - lam_hi) x_i^2)
    screen, screen_hi = values.new_zeros(2, count + 1, batch)
    screen[torch.arange(count, device=device), owner_t] = lam - lam_lo[owner_t]
    screen[count] = a * a - margin + lam_lo
    screen_hi[torch.arange(count, device=device), owner_t] = lam - lam_hi[owner_t]
    screen_hi[count] = a * a + margin + lam_hi
    return PrunePlan(anchor=a, columns=columns, mat=mat.to(dtype), screen=screen.to(dtype),
                     screen_hi=screen_hi.to(dtype),
                     owner=owner_t, lam=lam.to(dtype),
                     lam_lo=lam_lo.to(dtype), lam_hi=lam_hi.to(dtype), margin=margin.to(dtype),
                     num_margin=num_margin.to(dtype),
                     score_margin=SCORE_MARGIN_ULPS * torch.finfo(torch.float32).eps / 2,
                     bounded=bounded, directions=directions_kept)


def _products(plan: PrunePlan, rows: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """x [n, B + J + 1] = rows [n, E] @ plan.mat, in one product: the numerators d . w_b, then
    the squares x_i^2 of the kept directions' products, then ||d||^2 (``dd`` [n])."""
    batch = plan.batch_size
    x = rows @ plan.mat
    x[:, batch:-1].square_()
    x[:, -1] = dd
    return x


def _bound_terms(plan: PrunePlan, x: torch.Tensor, index: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
    """(num, sq_lo, sq_hi, shift), each [B, w]: the numerators, the bounds of ||dW||^2 (margins
    included) and the numerators' margin of rows ``index`` [B, w] (row b: query b's rows) of a
    chunk whose products are ``x`` (:func:`_products`)."""
    batch = plan.batch_size
    num = x[:, :batch].T.gather(1, index)
    dd = x[:, -1][index]
    a2 = plan.anchor * plan.anchor
    sq_lo = (a2 - plan.margin)[:, None] * dd
    sq_hi = (a2 + plan.margin)[:, None] * dd
    rest = dd
    if plan.owner.numel():
        kept = x[:, batch:-1].T.gather(1, index[plan.owner])  # [J, w]: x_i^2
        seen = torch.zeros_like(num).index_add_(0, plan.owner, kept)  # sum_J x_i^2
        exact = torch.zeros_like(num).index_add_(0, plan.owner, kept.mul_(plan.lam[:, None]))
        sq_lo += exact
        sq_hi += exact
        rest = (dd - seen).clamp_min_(0)
    sq_lo.addcmul_(plan.lam_lo[:, None], rest)
    sq_hi.addcmul_(plan.lam_hi[:, None], rest)
    shift = plan.num_margin[:, None] * dd.sqrt()
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


def _screen(plan: PrunePlan, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Screening values [n, B] of a chunk with products ``x`` and row norms ``norms`` [n]: the
    numerator at the top of its margin over the lower bound of ||dW|| (the plan's ``screen``
    product). For every row, the exact score is at most max(value, 0) (1 + score_margin): a row
    whose value is below tau (1 - 2 score_margin), tau > 0, cannot score tau."""
    batch = plan.batch_size
    value = torch.addr(x[:, :batch], norms, plan.num_margin)
    return value.mul_((x[:, batch:] @ plan.screen).clamp_min_(NORM_EPS ** 2).rsqrt_())


def _seed(plan: PrunePlan, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Lower bounds [n, B] of a chunk's exact scores, -inf where the numerator may be negative,
    from the products ``x`` alone (the plan's ``screen_hi`` product): for every row, the exact
    score is at least value (1 - score_margin). They give a first threshold to a query that has
    none yet, so that its screening keeps about k rows of the chunk rather than all."""
    batch = plan.batch_size
    bottom = torch.addr(x[:, :batch], norms, plan.num_margin, alpha=-1)
    negative = bottom < 0
    value = bottom.mul_((x[:, batch:] @ plan.screen_hi).clamp_min_(NORM_EPS ** 2).rsqrt_())
    return value.masked_fill_(negative, float("-inf"))


def score_bounds(plan: PrunePlan, rows: torch.Tensor, dd: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(numerators, lower bounds, upper bounds), each [B, n], of the exact scores of ``rows``
    [n, E] (in the plan's dtype and device) for every query of ``plan``; ``dd`` = ||d||^2 [n].

    Valid for the scores either exact path computes (rounding included, through the plan's
    margins). A query scored on every row gets bounds -inf and +inf.
    """
    if dd is None:
        dd = torch.linalg.vector_norm(rows, dim=1).square()
    x = _products(plan, rows, dd)
    index = torch.arange(rows.shape[0], device=rows.device).expand(plan.batch_size, -1)
    terms = _bound_terms(plan, x, index)
    upper = _upper_bound(*terms, plan.score_margin)
    lower = _lower_bound(*terms, plan.score_margin)
    if not bool(plan.bounded.all()):
        upper[~plan.bounded] = float("inf")
        lower[~plan.bounded] = float("-inf")
    return terms[0], lower, upper


def screen_bounds(plan: PrunePlan, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed and screening values [B, n] of ``rows`` [n, E] (:func:`_seed`,
    :func:`_screen`), for tests."""
    dd = torch.linalg.vector_norm(rows, dim=1).square()
    x = _products(plan, rows, dd)
    return _seed(plan, x, dd.sqrt()).T, _screen(plan, x, dd.sqrt()).T


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


def _compact_columns(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_compact` of ``mask.T`` for a mask [n, b] (rows x queries), from one pass over
    it: (row indices [b, width] of each query's True entries, in order, padded with 0; mask
    [b, width] of the real ones)."""
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: rows increase
    batch = mask.shape[1]
    counts = torch.bincount(cols, minlength=batch)
    width = int(counts.max()) if rows.numel() else 0
    order = torch.sort(cols, stable=True).indices  # by query, rows still increasing
    rows, cols = rows[order], cols[order]
    pos = torch.arange(rows.shape[0], device=mask.device) - (torch.cumsum(counts, 0) - counts)[cols]
    index = torch.zeros(batch, width, dtype=torch.int64, device=mask.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=mask.device)
    index[cols, pos] = rows
    valid[cols, pos] = True
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
    """Exact scores [len(queries), n] of every row for some queries of the plan (``num``
    [B, n]: the numerators)."""
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


def _merge_any(best_s: torch.Tensor, best_i: torch.Tensor, new_s: torch.Tensor,
               new_i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k ([B, k], sorted, ties to the lower index) of two sets of (score, distinct index)
    entries in any order; ``best_s`` has k columns (padding: score -inf)."""
    s = torch.cat([best_s, new_s], dim=1)
    i = torch.cat([best_i, new_i], dim=1)
    order = torch.sort(i, dim=1, stable=True).indices
    s, i = s.gather(1, order), i.gather(1, order)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), i.gather(1, order)


def _kth(k: int, *scores: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the k-th largest entry of each row of the concatenated ``scores`` (>= k columns)."""
    pool = torch.cat(scores, dim=1)
    return torch.topk(pool, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)


@dataclass
class _Pool:
    """Per query, the rows whose bounds leave them a chance to enter the top k: lower and upper
    bounds (float32) and global row indices (-1: padding), each [b, width]."""

    lower: torch.Tensor
    upper: torch.Tensor
    index: torch.Tensor

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> "_Pool":
        s, i = _empty(batch, device)
        return cls(s, s.clone(), i)

    def add(self, lower, upper, index, keep: torch.Tensor, tau: torch.Tensor) -> None:
        """Adds the entries ``keep`` of (lower, upper, index) [b, w]; then keeps only the rows
        whose upper bound reaches ``tau`` [b, 1]."""
        lower = torch.cat([self.lower, lower], dim=1)
        upper = torch.cat([self.upper, upper], dim=1)
        index = torch.cat([self.index, index], dim=1)
        keep = torch.cat([self.index >= 0, keep], dim=1) & (upper >= tau)
        where, valid = _compact(keep)
        self.lower = lower.gather(1, where).masked_fill_(~valid, float("-inf"))
        self.upper = upper.gather(1, where).masked_fill_(~valid, float("-inf"))
        self.index = index.gather(1, where).masked_fill_(~valid, -1)

    def sizes(self) -> torch.Tensor:
        return (self.index >= 0).sum(dim=1)

    def clear(self, queries: torch.Tensor) -> None:
        self.lower[queries] = float("-inf")
        self.upper[queries] = float("-inf")
        self.index[queries] = -1


def _rescore_pool(plan: PrunePlan, pool: _Pool, queries: list[int], gallery: Gallery,
                  n_rows: int, best: tuple[torch.Tensor, torch.Tensor], k: int
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """Reads the pooled rows of ``queries`` (of ``plan``) again, scores them exactly and merges
    them into their running top k ``best`` ([b, k] each). Returns (best, pairs scored)."""
    best_s, best_i = best
    device, dtype = plan.mat.device, plan.mat.dtype
    dim = plan.columns.shape[1]
    c = plan.columns.shape[2]
    sizes = pool.sizes()
    counts = [int(sizes[q]) for q in queries]
    scored = 0
    for group in _groups(counts, dim + c + 1):
        width = max(counts[i] for i in group)
        if width == 0:
            continue
        q = torch.tensor([queries[i] for i in group], device=device)
        index = pool.index[q, :width]
        valid = index >= 0
        wanted, where = torch.unique(index[valid], sorted=True, return_inverse=True)
        rows = read_rows_at(gallery, wanted, device, dtype)
        at = torch.zeros_like(index)
        at[valid] = where
        columns = torch.cat([plan.columns[q], plan.mat[:, q].T[:, :, None]], dim=2)
        proj = torch.bmm(rows[at], columns)  # [g, width, c + 1]: [A | Q] and the numerator
        dd = torch.linalg.vector_norm(rows, dim=1).square()[at]
        s = _search_scores(proj[..., -1], proj[..., :-1], plan.anchor, dd).float()
        s = s.masked_fill_(~valid, float("-inf"))
        ids = torch.where(valid, index, n_rows)
        best_s[q], best_i[q] = _merge_any(best_s[q], best_i[q], s, ids, k)
        scored += int(valid.sum())
    return (best_s, best_i), scored


def _topk_pruned(t: QueryTransform, gallery: Gallery, k: int, chunk_rows: int, n_rows: int,
                 stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk` with pruning (identity-anchored maps)."""
    device, dtype = t.query.device, t.query.dtype
    plan = prune_plan(t, n_rows, k, chunk_rows)
    batch, dim, c = plan.columns.shape
    n_chunk = max(1, min(chunk_rows, n_rows))
    # query blocks: the products and the screening temporaries stay under BLOCK_ELEMENTS
    per_query = (2 + plan.directions + BOUND_TEMPORARIES).tolist()
    blocks, begin, used = [], 0, 0
    for b, size in enumerate(per_query):
        if b > begin and (used + size) * n_chunk > BLOCK_ELEMENTS:
            blocks.append(slice(begin, b))
            begin, used = b, 0
        used += size
    blocks.append(slice(begin, batch))
    plans = [plan[sl] for sl in blocks]
    pools = [_Pool.empty(p.batch_size, device) for p in plans]
    bests = [(torch.full((p.batch_size, k), float("-inf"), dtype=torch.float32, device=device),
              torch.full((p.batch_size, k), -1, dtype=torch.int64, device=device))
             for p in plans]
    margin = plan.score_margin
    pool_cap = max(POOL_FACTOR * k, POOL_MIN_ROWS)
    taus: list[torch.Tensor | None] = [None] * len(plans)  # running thresholds, while unchanged
    rescored = 0
    for start in range(0, n_rows, chunk_rows):
        rows = read_rows(gallery, start, min(start + chunk_rows, n_rows), device, dtype)
        n = rows.shape[0]
        dd = torch.linalg.vector_norm(rows, dim=1).square()
        norms = dd.sqrt()
        for j, (p, pool) in enumerate(zip(plans, pools)):
            best_s, best_i = bests[j]
            all_bounded = bool(p.bounded.all())
            x = _products(p, rows, dd)
            if not bool(p.bounded.any()):  # spread spectra only: the full path's scores
                every = list(range(p.batch_size))
                s = _rescore_dense(p, every, rows, x[:, :p.batch_size].T, dd).float()
                ids = torch.arange(start, start + n, device=device).expand(len(every), -1)
                bests[j] = merge_topk(best_s, best_i, s, ids, k)
                rescored += n * len(every)
                continue
            # screen every row against the running threshold (a query without a positive one
            # takes every row; one without bounds is scored on every row below)
            if taus[j] is None:
                taus[j] = _kth(k, best_s, pool.lower)[:, 0]
            tau = taus[j]
            if bool(((tau <= 0) & p.bounded).any()):
                seeded = _kth(k, best_s, pool.lower, _seed(p, x, norms).T.float())[:, 0]
                tau = torch.maximum(tau, seeded * (1 - 2 * margin))
            thr = torch.where(tau > 0, tau * (1 - 2 * margin), float("-inf"))
            cand = _screen(p, x, norms) >= thr.to(x.dtype)
            if not all_bounded:
                cand[:, ~p.bounded] = False
            index, valid = _compact_columns(cand)
            if index.shape[1] == 0 and all_bounded:
                continue  # no row of this chunk can enter any query's top k
            taus[j] = None
            terms = _bound_terms(p, x, index)
            # compared as the exact scores are merged, in float32 (rounding is monotone, so
            # the float32 bounds still bound the float32 scores)
            lower = _lower_bound(*terms, margin).float().masked_fill_(~valid, float("-inf"))
            upper = _upper_bound(*terms, margin).float()
            # k-th best of (exact scores, pooled and new lower bounds): k distinct rows score at
            # least this, so a row whose upper bound is below it cannot enter the top k
            tau = _kth(k, best_s, pool.lower, lower)
            keep = valid & (upper >= tau)
            counts = keep.sum(dim=1)
            dense = ((counts > DENSE_FRACTION * n) | ~p.bounded).nonzero()[:, 0]
            if dense.numel():
                s = _rescore_dense(p, dense.tolist(), rows, x[:, :p.batch_size].T, dd).float()
                ids = torch.arange(start, start + n, device=device).expand(len(dense), -1)
                best_s[dense], best_i[dense] = merge_topk(best_s[dense], best_i[dense], s, ids, k)
                rescored += n * len(dense)
                keep[dense] = False
            if index.shape[1]:
                pool.add(lower, upper, torch.where(valid, index + start, -1), keep, tau)
            full = (pool.sizes() > pool_cap).nonzero()[:, 0].tolist()
            if full:
                bests[j], scored = _rescore_pool(p, pool, full, gallery, n_rows, bests[j], k)
                pool.clear(torch.tensor(full, device=device))
                rescored += scored
    for j, (p, pool) in enumerate(zip(plans, pools)):
        waiting = (pool.sizes() > 0).nonzero()[:, 0].tolist()
        if waiting:
            bests[j], scored = _rescore_pool(p, pool, waiting, gallery, n_rows, bests[j], k)
            rescored += scored
    if stats is not None:
        stats.update(rescored=rescored, pairs=n_rows * batch,
                     directions=torch.where(plan.bounded, plan.directions, -1).tolist())
    kk = min(k, n_rows)
    best_s = torch.cat([b[0] for b in bests])
    best_i = torch.cat([b[1] for b in bests])
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
