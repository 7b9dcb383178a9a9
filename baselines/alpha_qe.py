"""alpha-query expansion on global features (Radenovic et al., TPAMI 2019): Table 3a's alpha-QE rows.

The query is replaced by a weighted sum of itself and its top-n neighbours in the initial cosine
ranking, each neighbour d_i weighted by its cosine sim_i raised to the power alpha::

    q' = normalize(q + sum_{i<=n} max(sim_i, 0)^alpha * d_i)

and the gallery is ranked again by cosine to q'. The paper reports n = 1, 2 and 5 (config entries
``alpha_qe1: {type: alpha_qe, neighbours: 1}`` and so on). Nothing is learned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from quari.methods import RetrievalMethod, as_tensor, shortlist_rows


def _gather(gallery, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """Gallery rows at ``indices`` ([B, K]) as unit-norm tensor [B, K, E]."""
    return F.normalize(shortlist_rows(gallery, indices, device), dim=-1)


class AlphaQE(RetrievalMethod):
    """Cosine search, alpha-weighted expansion of the query with its top neighbours, cosine again.

    ``prepare``/``score`` are the first, plain cosine pass; the expansion needs the ranking, so
    ``search`` and ``rerank`` do it. A shortlist's scores depend on which rows it holds (the
    expansion uses its top-n), hence ``scores_rows_independently = False``.
    """

    name = "alpha_qe"
    label = "α-QE (n={neighbours})"
    trainable = False
    reranker = True  # the paper reports it re-ranking a shortlist (Table 3a)
    scores_rows_independently = False

    def __init__(self, neighbours: int = 1, alpha: float = 3.0, device: str | None = None):
        # neighbours: top-n of the initial ranking added to the query (1, 2, 5 in Table 3a)
        # alpha: exponent on each neighbour's cosine (3 as in Radenovic et al.)
        if neighbours < 0:
            raise ValueError("neighbours must be >= 0")
        super().__init__(neighbours=neighbours, alpha=alpha, device=device)

    def prepare(self, queries: torch.Tensor, query_ids: Sequence[str] | None = None) -> torch.Tensor:
        return F.normalize(queries, dim=-1)

    def score(self, state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return state @ F.normalize(rows, dim=-1).T

    def expand(self, queries: torch.Tensor, neighbours: torch.Tensor,
               similarities: torch.Tensor) -> torch.Tensor:
        """Expanded unit queries [B, E] from unit queries [B, E], their neighbours [B, n, E] and
        the neighbours' cosines [B, n]."""
        weights = similarities.clamp(min=0) ** self.params["alpha"]
        return F.normalize(queries + torch.einsum("bn,bne->be", weights, neighbours), dim=-1)

    def search(self, queries, gallery, k: int, chunk_rows: int = 65536,
               query_ids: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(as_tensor(queries, self.device), dim=-1)
        n = min(self.params["neighbours"], len(gallery))
        if n > 0:
            sims, idx = super().search(q, gallery, n, chunk_rows, query_ids)
            neighbours = _gather(gallery, idx.numpy(), self.device)
            q = self.expand(q, neighbours, sims.to(self.device))
        return super().search(q, gallery, k, chunk_rows, query_ids)

    def rerank(self, queries, gallery, shortlist: np.ndarray,
               query_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Expansion from the shortlist's own cosine top-n, then cosine of every candidate."""
        q = F.normalize(as_tensor(queries, self.device), dim=-1)
        candidates = _gather(gallery, np.asarray(shortlist), self.device)  # [B, K, E]
        with torch.no_grad():
            sims = torch.einsum("be,bke->bk", q, candidates)
            n = min(self.params["neighbours"], candidates.shape[1])
            if n > 0:
                top = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :n]
                neighbours = candidates.gather(1, top[:, :, None].expand(-1, -1, q.shape[1]))
                q = self.expand(q, neighbours, sims.gather(1, top))
            return torch.einsum("be,bke->bk", q, candidates).cpu()
