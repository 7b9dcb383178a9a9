"""AMES re-ranking (Suma et al., ECCV 2024): Table 3a's learned local-descriptor re-ranker.

Each shortlisted (query, database image) pair is scored by the published AMES network
(:mod:`.ames_network`) from the two images' local descriptors, and the logit is combined with the
pair's global similarity as the official evaluation does::

    score = lamb * cosine(query, candidate) + (1 - lamb) * sigmoid(temp * AMES logit)

The global similarity is the cosine of the embeddings the harness passes, i.e. the initial
ranking's score that the shortlist was taken from. Like Chamfer similarity it is a re-ranker only
and reads its descriptors by image id (``fit`` context ``local_descriptors``,
``query_local_descriptors``, ``gallery_ids``; see :mod:`.rerankers`); a candidate
without descriptors is ranked last. The descriptors must be those the published networks are
evaluated with: DINOv2 ViT-B/14 with registers, selected and transformed by the AMES detector
(``saliency: ames_detector`` in :mod:`.descriptors`); their width must equal the
network's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baselines.local_features.rerankers import LocalFeatureReranker
from baselines.local_features.ames_network import (DINOV2_AMES_URL, TUNED_HYPERPARAMETERS,
                                                   combine_scores, load_ames, resolve_checkpoint)
from quari.data.downloads import file_digest
from quari.methods import as_tensor, shortlist_rows
from quari.store import atomic_write_json

_STATE = "ames.json"


class AMESReranker(LocalFeatureReranker):
    """The AMES network on each shortlisted pair, combined with the global cosine."""

    name = "ames"
    label = "AMES"

    def __init__(self, checkpoint: str = DINOV2_AMES_URL, binarized: bool = False,
                 lamb: float | None = None, temp: float | None = None, nhead: int = 2,
                 batch_size: int = 300, cache_dir: str | None = None,
                 checkpoint_sha256: str | None = None, device: str | None = None):
        # checkpoint: path or URL of a published AMES network (default: DINOv2, full precision)
        # binarized: True for a "dist" (binary-descriptor) network; must match the checkpoint
        # lamb: weight of the global similarity (None: the tuned value of the variant, 0.55 / 0.35)
        # temp: scale of the AMES logit in the sigmoid (None: the tuned value, 0.30 / 0.10)
        # nhead: attention heads of the network (2 in every published model)
        # batch_size: pairs per forward pass (the official evaluation uses 300)
        # cache_dir: where a downloaded checkpoint is kept (None: ~/.cache/quari/ames)
        # checkpoint_sha256: expected digest of the checkpoint file (None: not checked)
        tuned_lamb, tuned_temp = TUNED_HYPERPARAMETERS[bool(binarized)]
        lamb = tuned_lamb if lamb is None else float(lamb)
        temp = tuned_temp if temp is None else float(temp)
        if not 0.0 <= lamb <= 1.0:
            raise ValueError(f"lamb must be in [0, 1], got {lamb}")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        super().__init__(checkpoint=str(checkpoint), binarized=bool(binarized), lamb=lamb,
                         temp=temp, nhead=nhead, batch_size=batch_size, cache_dir=cache_dir,
                         checkpoint_sha256=checkpoint_sha256, device=device)
        self.model_ = None
        self.checkpoint_digest_: str | None = None

    # -- loading --------------------------------------------------------------------------
    def fit(self, train, valid=None, workdir=None, **context):
        super().fit(train, valid, workdir, **context)
        self._load_model()
        return self

    def _load_model(self) -> None:
        p = self.params
        path = resolve_checkpoint(p["checkpoint"], p["cache_dir"], p["checkpoint_sha256"])
        self.model_ = load_ames(path, binarized=p["binarized"], nhead=p["nhead"],
                                device=self.device)
        dim = self.model_.config.local_dim
        for what, descriptors in (("local_descriptors", self.database_),
                                  ("query_local_descriptors", self.queries_)):
            if descriptors.descriptors.shape[-1] != dim:
                raise ValueError(f"{self.files_[what]} holds {descriptors.descriptors.shape[-1]}-"
                                 f"dimensional descriptors; the AMES network {p['checkpoint']} "
                                 f"takes {dim}")
        self.checkpoint_digest_ = file_digest(path, "sha256")

    # -- ranking --------------------------------------------------------------------------
    def score_images(self, query, rows: np.ndarray) -> torch.Tensor:
        """AMES logits [K] of one query's descriptors against database rows [K]."""
        if self.model_ is None:
            raise RuntimeError("ames is not fitted (no network loaded)")
        db = self.database_
        q = torch.from_numpy(np.ascontiguousarray(query[0])).to(self.device)[None]
        out = []
        for start in range(0, len(rows), self.params["batch_size"]):
            chunk = rows[start:start + self.params["batch_size"]]
            desc, _, counts = db.gather(chunk)  # only this batch, in the stored dtype
            desc = torch.from_numpy(desc).to(self.device, torch.float32)
            counts = torch.from_numpy(counts).to(self.device)
            padding = torch.arange(desc.shape[1], device=self.device)[None] >= counts[:, None]
            out.append(self.model_(q.expand(len(chunk), -1, -1), desc, database_padding=padding))
        return torch.cat(out) if out else torch.zeros(0)

    def rerank(self, queries, gallery, shortlist: np.ndarray, query_ids=None) -> torch.Tensor:
        """Official AMES scores [B, K] of each query's shortlist (-inf where a candidate has no
        local descriptors)."""
        logits = super().rerank(queries, gallery, shortlist, query_ids)
        q = F.normalize(as_tensor(queries), dim=-1)
        cosine = torch.einsum("be,bke->bk", q, F.normalize(shortlist_rows(gallery, shortlist), dim=-1))
        scores = combine_scores(cosine, logits, self.params["lamb"], self.params["temp"])
        return torch.where(torch.isinf(logits), -math.inf, scores)

    # -- persistence ----------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        super().save_state(directory)
        atomic_write_json(directory / _STATE, {"checkpoint_sha256": self.checkpoint_digest_})

    def load_state(self, directory: Path) -> None:
        super().load_state(directory)
        self._load_model()
        saved = json.loads((directory / _STATE).read_text())["checkpoint_sha256"]
        if saved != self.checkpoint_digest_:
            raise ValueError(f"{directory} was fitted with an AMES checkpoint of sha256 {saved}, "
                             f"but {self.params['checkpoint']} now has {self.checkpoint_digest_}")
