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

Everything here except the streaming searches is differentiable and used by training.
"""

from __future__ import annotations

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
    """Cosines [n, b] from num = d . w ([n, b]), proj = d [A | Q] ([n, b, c]), ||d||^2 ([n])."""
    if anchor == 0:
        sq = torch.linalg.vector_norm(proj, dim=-1).square()
    else:
        width = proj.shape[-1] // 2
        sq = (torch.linalg.vector_norm(proj[..., :width], dim=-1).square()
              + anchor * anchor * (dd[:, None]
                                   - torch.linalg.vector_norm(proj[..., width:], dim=-1).square()))
    return num / sq.clamp_min(NORM_EPS ** 2).sqrt()


@torch.no_grad()
def topk(transform: QueryTransform, gallery: Gallery, k: int, chunk_rows: int = 65536,
         device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows of ``gallery`` [N, E] for every query, streaming the gallery in chunks.

    ``gallery`` may be a tensor, a numpy array or an ``np.memmap`` (fp16 or fp32); each chunk of
    ``chunk_rows`` rows is read once and converted to float32 (float64 for a float64 transform)
    on ``device`` (default: the transform's). Queries are processed in blocks so one projected
    block stays under ``BLOCK_ELEMENTS`` values: memory is bounded for any N. ``k`` larger than
    N returns N. Ties go to the lower row index.

    Returns (scores [B, k] float32, indices [B, k] int64 global row indices) on ``device``.
    """
    n_rows = _check_gallery(gallery, transform.dim, k)
    device = torch.device(device) if device is not None else transform.query.device
    dtype = _compute_dtype(transform.query.dtype)
    t = transform.detach().to(device=device, dtype=dtype)
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
            s = _search_scores(num[:, sl], proj, t.anchor, dd).T.float()
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
