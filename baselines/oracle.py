"""Oracle (synthetic world only): rank in the query category's true instance-identity subspace.

An upper bound, not a method: it reads the generator's ground truth (each category's identity
basis in the backbone's space and every query's category), which no real method can see. It
shows how much headroom a query-adaptive projection has on the embedded benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quari.methods import TransformMethod
from quari.transform import QueryTransform


def oracle_transform(queries: torch.Tensor, bases: torch.Tensor) -> QueryTransform:
    """The oracle's map of each query: query and gallery projected onto the query's own
    subspace ``bases`` [B, E, K] (orthonormal columns: its category's true identity subspace),
    then cosine; scored as every :class:`~quari.transform.QueryTransform` is
    (:mod:`quari.scoring`)."""
    projected = torch.einsum("be,bek,bfk->bf", queries, bases, bases)
    return QueryTransform(query=torch.nn.functional.normalize(projected, dim=-1), left=bases,
                          right=bases, scale=1.0, anchor=0.0)


class Oracle(TransformMethod):
    """Projects query and gallery onto the query's category identity subspace, then cosine."""

    name = "oracle"
    label = "oracle (synthetic only)"
    fit_cost = 0  # fit only reads the synthetic world's file
    #: the synthetic world's true subspace of every query's category (synthetic data only)
    side_inputs = ("oracle_file",)

    def __init__(self, device: str | None = None):
        super().__init__(device=device)
        self.bases_: np.ndarray | None = None
        self.category_of_: dict[str, int] = {}

    def fit(self, train, valid=None, workdir=None, oracle_file=None, **context):
        if oracle_file is None:
            raise ValueError("the oracle needs the synthetic world's oracle file (synthetic data only)")
        self._read(Path(oracle_file))
        return self

    def _read(self, path: Path) -> None:
        with np.load(path) as f:
            self.bases_ = f["bases"].astype(np.float32)
            self.category_of_ = dict(zip(f["query_ids"].tolist(), f["query_categories"].tolist()))

    def transform(self, queries: torch.Tensor, query_ids=None) -> QueryTransform:
        if query_ids is None:
            raise ValueError("the oracle needs the query ids to look up their true category")
        missing = [q for q in query_ids if q not in self.category_of_]
        if missing:
            raise KeyError(f"no oracle category for queries {missing[:3]}")
        basis = torch.from_numpy(self.bases_[[self.category_of_[q] for q in query_ids]]).to(queries)
        return oracle_transform(queries, basis)

    def save_state(self, directory: Path) -> None:
        ids = np.array(list(self.category_of_), dtype=str)
        cats = np.array([self.category_of_[i] for i in ids], dtype=np.int64)
        with open(directory / "oracle.npz", "wb") as f:
            np.savez(f, bases=self.bases_, query_ids=ids, query_categories=cats)

    def load_state(self, directory: Path) -> None:
        self._read(directory / "oracle.npz")
