"""The per-query output of the hypernetwork: an adapted query and the factors of its gallery map.

This is the one object the model hands to scoring, training and evaluation. It keeps the map in
factored form so that nothing downstream ever needs the E x E matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class _QueryBatch:
    """What both forms of a batch of maps share: B adapted queries of width E."""

    query: torch.Tensor  # [B, E]

    @property
    def batch_size(self) -> int:
        """Number of queries B."""
        return self.query.shape[0]

    @property
    def dim(self) -> int:
        """Embedding dimension E."""
        return self.query.shape[1]


@dataclass
class QueryTransform(_QueryBatch):
    """Per-query adapted query and the factors of its gallery map; the E x E matrix is never formed.

    Gallery row d (a row vector, shape [E]) is mapped to
        m(d) = anchor * d + scale * (d @ left) @ right.T
    and scored by cosine(query, m(d)) = query . m(d) / ||m(d)||  (query is unit norm).
    released variant: anchor=1, left=U', right=V' (Frobenius-normalised), scale=anchor_scale (0.8)
    paper variant:    anchor=0, left=V, right=U (T = sum_j u_j v_j^T, T d = U V^T d), scale=1.
    """

    query: torch.Tensor  # [B, E] adapted query q', unit norm
    left: torch.Tensor  # [B, E, r]
    right: torch.Tensor  # [B, E, r]
    scale: float  # scalar multiplying the low-rank part
    anchor: float  # 1.0 (identity-anchored, released) or 0.0 (pure low rank, paper)

    def __post_init__(self) -> None:
        if self.query.dim() != 2:
            raise ValueError(f"query must be [B, E], got shape {tuple(self.query.shape)}")
        batch, dim = self.query.shape
        for name in ("left", "right"):
            factor = getattr(self, name)
            if factor.dim() != 3 or factor.shape[:2] != (batch, dim):
                raise ValueError(f"{name} must be [B, E, r] = [{batch}, {dim}, r], "
                                 f"got shape {tuple(factor.shape)}")
        if self.left.shape[2] != self.right.shape[2]:
            raise ValueError(f"left and right must share the rank, got {self.left.shape[2]} "
                             f"and {self.right.shape[2]}")

    @property
    def rank(self) -> int:
        """Rank r of the low-rank part."""
        return self.left.shape[2]

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "QueryTransform":
        """The same transform with its tensors on another device and/or dtype."""
        return QueryTransform(query=self.query.to(device=device, dtype=dtype),
                              left=self.left.to(device=device, dtype=dtype),
                              right=self.right.to(device=device, dtype=dtype),
                              scale=self.scale, anchor=self.anchor)

    def __getitem__(self, index) -> "QueryTransform":
        """The transforms of a subset of the queries (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return QueryTransform(query=self.query[index], left=self.left[index],
                              right=self.right[index], scale=self.scale, anchor=self.anchor)

    def detach(self) -> "QueryTransform":
        """The same transform cut from the autograd graph (for evaluation)."""
        return QueryTransform(query=self.query.detach(), left=self.left.detach(),
                              right=self.right.detach(), scale=self.scale, anchor=self.anchor)


@dataclass
class BasisQueryTransform(_QueryBatch):
    """A :class:`QueryTransform` whose factors lie in column spaces shared by the whole batch.

    left = left_basis @ left_coef and right = right_basis @ right_coef, query by query: the
    factors of :meth:`expand`. QuARI's decoders end in one linear layer (weight W [E, d], bias b),
    so every decoded column is W a + b = [W | b] [a; 1]: a basis of k = d + 1 columns shared by
    the batch, and per query only k x r coefficients. Scoring a batch in this form
    (:func:`quari.scoring.scores`) projects each row onto the k basis columns once and then onto
    every query's coefficients: O(E k + B k r) per row instead of O(B E r), the cheaper one
    whenever k is well below E (the CPU-sized models: k = 65, E = 256 or 384). Training scores its
    batches this way; evaluation expands to a :class:`QueryTransform`.
    """

    query: torch.Tensor  # [B, E] adapted query q', unit norm
    left_basis: torch.Tensor  # [E, k]
    left_coef: torch.Tensor  # [B, k, r]
    right_basis: torch.Tensor  # [E, k']
    right_coef: torch.Tensor  # [B, k', r]
    scale: float
    anchor: float

    def __post_init__(self) -> None:
        if self.query.dim() != 2:
            raise ValueError(f"query must be [B, E], got shape {tuple(self.query.shape)}")
        batch, dim = self.query.shape
        for side in ("left", "right"):
            basis, coef = getattr(self, f"{side}_basis"), getattr(self, f"{side}_coef")
            if basis.dim() != 2 or basis.shape[0] != dim:
                raise ValueError(f"{side}_basis must be [E={dim}, k], got {tuple(basis.shape)}")
            if coef.dim() != 3 or coef.shape[:2] != (batch, basis.shape[1]):
                raise ValueError(f"{side}_coef must be [B={batch}, k={basis.shape[1]}, r], "
                                 f"got {tuple(coef.shape)}")
        if self.left_coef.shape[2] != self.right_coef.shape[2]:
            raise ValueError("left and right coefficients must share the rank")

    @property
    def rank(self) -> int:
        """Rank r of the low-rank part."""
        return self.left_coef.shape[2]

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "BasisQueryTransform":
        """The same transform with its tensors on another device and/or dtype."""
        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=dtype)

        return BasisQueryTransform(move(self.query), move(self.left_basis), move(self.left_coef),
                                   move(self.right_basis), move(self.right_coef),
                                   self.scale, self.anchor)

    def expand(self) -> QueryTransform:
        """The same maps with their factors formed in R^E: a :class:`QueryTransform`."""
        return QueryTransform(
            query=self.query,
            left=torch.einsum("ek,bkr->ber", self.left_basis, self.left_coef),
            right=torch.einsum("ek,bkr->ber", self.right_basis, self.right_coef),
            scale=self.scale, anchor=self.anchor)
