"""Local-feature re-rankers of Table 3a: Chamfer similarity and spatial verification.

They score a shortlist with local descriptors (DINOv2 patch descriptors in the paper, 100 per
database image and 600 per query), which the global embeddings the harness passes do not hold,
so they are re-rankers only: ``search`` over a whole gallery raises NotImplementedError.

Inputs, all given to ``fit`` as context (nothing is learned)::

    local_descriptors         path of the database images' descriptors, keyed by image id
    query_local_descriptors   path of the queries' descriptors, keyed by query id
    gallery_ids               id of every gallery row, in row order (or call ``set_gallery``)

Both files use the layout of :mod:`.matching` and are memory-mapped (ILIAS's
shortlisted images hold about 185 GB of float16 descriptors). ``rerank`` maps each shortlisted
gallery row to its id, and each query to its descriptors through ``query_ids``; per query it
copies out only that query's candidates (:meth:`~.matching.LocalDescriptors.gather`)
and converts them to float32, so memory grows with the shortlist, not with the file.
"""

from __future__ import annotations

import json
import logging
import math
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from baselines.local_features import matching as local_matching
from quari.methods import RetrievalMethod
from quari.store import IdColumn, ids_at

_STATE = "local_features.json"
log = logging.getLogger(__name__)


class LocalFeatureReranker(RetrievalMethod):
    """Shared plumbing: descriptor look-up by id; subclasses score one query's candidates."""

    trainable = False
    reranker = reranker_only = True
    #: DINOv2 local descriptors of ILIAS images: image queries only, ILIAS only
    side_inputs = ("local_descriptors", "query_local_descriptors")
    benchmarks = ("ilias",)
    query_types = ("image",)

    def __init__(self, device: str | None = None, **params):
        super().__init__(device=device, **params)
        self.files_: dict[str, str] = {}
        self.database_: local_matching.LocalDescriptors | None = None
        self.queries_: local_matching.LocalDescriptors | None = None
        self.gallery_ids_: Sequence[str] | None = None

    def fit(self, train, valid=None, workdir=None, local_descriptors=None,
            query_local_descriptors=None, gallery_ids: Sequence[str] | None = None, **context):
        if local_descriptors is None or query_local_descriptors is None:
            raise ValueError(f"{self.name} needs local descriptors: fit(..., local_descriptors=PATH, "
                             "query_local_descriptors=PATH)")
        self._read(str(local_descriptors), str(query_local_descriptors))
        if gallery_ids is not None:
            self.set_gallery(gallery_ids)
        return self

    def _read(self, database: str, queries: str) -> None:
        self.files_ = {"local_descriptors": database, "query_local_descriptors": queries}
        self.database_ = local_matching.load_local_descriptors(database)
        self.queries_ = local_matching.load_local_descriptors(queries)

    def set_gallery(self, ids: Sequence[str]) -> None:
        """Declare the id of every gallery row (row order) that ``rerank`` will receive. A
        memory-mapped id column is kept as it is: only the shortlisted rows are translated."""
        self.gallery_ids_ = ids if isinstance(ids, IdColumn) else list(ids)

    # -- ranking --------------------------------------------------------------------------
    def prepare(self, queries: torch.Tensor, query_ids: Sequence[str] | None = None
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each query's (descriptors, positions), looked up by its id (views of the file, in
        the stored dtype; ``rerank`` converts one query at a time)."""
        if self.queries_ is None:
            raise RuntimeError(f"{self.name} is not fitted (no local descriptors)")
        if query_ids is None:
            raise ValueError(f"{self.name} needs the query ids to find their local descriptors")
        return [self.queries_.image(r) for r in self.queries_.rows(query_ids)]

    def score(self, state, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} scores shortlisted gallery rows by id; "
                                  "use rerank")

    def search(self, queries, gallery, k: int, chunk_rows: int = 65536,
               query_ids: Sequence[str] | None = None):
        raise NotImplementedError(f"{self.name} is a re-ranker only: it needs local descriptors of "
                                  "each candidate, so rank a shortlist with rerank")

    def rerank(self, queries, gallery, shortlist: np.ndarray,
               query_ids: Sequence[str] | None = None) -> torch.Tensor:
        self.check_gallery_ids(gallery)
        shortlist = np.asarray(shortlist)
        state = self.prepare(torch.empty(0), query_ids)
        known = self.database_.row_of
        out = torch.full(shortlist.shape, -math.inf)
        missing: set[str] = set()
        with torch.no_grad():
            for b, row in enumerate(shortlist):
                ids = ids_at(self.gallery_ids_, row)
                have = [j for j, i in enumerate(ids) if i in known]
                missing.update(i for i in ids if i not in known)
                if have:
                    query = tuple(np.array(a, dtype=np.float32) for a in state[b])  # a copy
                    out[b, have] = self.score_images(
                        query, self.database_.rows([ids[j] for j in have])).cpu().float()
        if missing:  # e.g. images the descriptor extraction could not read (its skip list)
            log.warning("%s: %d shortlisted images have no local descriptors and are ranked last, "
                        "e.g. %s", self.name, len(missing), sorted(missing)[:3])
        return out

    @abstractmethod
    def score_images(self, query: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> torch.Tensor:
        """Scores [K] of one query (float32 descriptors, positions) against database rows [K]
        (read them with ``self.database_.gather``)."""

    # -- persistence ----------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        ids = None if self.gallery_ids_ is None else list(self.gallery_ids_)
        (directory / _STATE).write_text(json.dumps({**self.files_, "gallery_ids": ids}))

    def load_state(self, directory: Path) -> None:
        state = json.loads((directory / _STATE).read_text())
        self._read(state["local_descriptors"], state["query_local_descriptors"])
        if state["gallery_ids"] is not None:
            self.set_gallery(state["gallery_ids"])


class ChamferReranker(LocalFeatureReranker):
    """Mean over the query's descriptors of the best cosine to the candidate's descriptors."""

    name = "chamfer"
    label = "Chamfer similarity"

    def __init__(self, device: str | None = None):
        # no settings: an explicit signature so that a typo in its config entry is refused
        super().__init__(device=device)

    def score_images(self, query, rows):
        desc, _, counts = self.database_.gather(rows)  # stored dtype: converted by chunk
        return local_matching.chamfer_similarities(
            torch.from_numpy(query[0]).to(self.device), torch.from_numpy(desc),
            torch.from_numpy(counts))


class SpatialVerificationReranker(LocalFeatureReranker):
    """Inlier count of a RANSAC-fitted transform over mutual-nearest-neighbour matches."""

    name = "spatial_verification"
    label = "spatial verification"

    def __init__(self, model: str = "affine", threshold: float = 0.05, iterations: int = 500,
                 seed: int = 0, min_similarity: float | None = None, device: str | None = None):
        # model: "affine" (3-point samples) or "similarity" (2-point samples)
        # threshold: inlier distance in normalised image coordinates (0.05 ~ 1-2 DINOv2 patches)
        # iterations: RANSAC hypotheses per image pair
        # seed: RANSAC sampling seed (the same for every pair, so scores are deterministic)
        # min_similarity: cosine a mutual nearest neighbour needs to count as a match (None: any)
        super().__init__(model=model, threshold=threshold, iterations=iterations, seed=seed,
                         min_similarity=min_similarity, device=device)

    def score_images(self, query, rows):
        p = {k: v for k, v in self.params.items() if k != "device"}
        desc, xy, counts = self.database_.gather(rows)
        inliers = [local_matching.spatial_verification(query[0], query[1], desc[k, :m], xy[k, :m],
                                                       **p)
                   for k, m in enumerate(counts)]
        return torch.tensor(inliers, dtype=torch.float32)
