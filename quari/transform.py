"""The per-query output of the hypernetwork: an adapted query and the factors of its gallery map.

This is the one object the model hands to scoring, training and evaluation. It keeps the map in
factored form so that nothing downstream ever needs the E x E matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QueryTransform:
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
    def batch_size(self) -> int:
        """Number of queries B."""
        return self.query.shape[0]

    @property
    def dim(self) -> int:
        """Embedding dimension E."""
        return self.query.shape[1]

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
