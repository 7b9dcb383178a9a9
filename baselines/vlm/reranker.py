"""Vision-language-model re-rankers of Table 3b (INQUIRE-Rerank): BLIP-2, InstructBLIP,
PaliGemma and LLaVA score each shortlisted image by P(Yes) / (P(Yes) + P(No)) for the
benchmark's question "Does this picture show {query}?" (:mod:`.scorer`).

They read the candidate *images* and the query *text*, not embeddings, so they are re-rankers
only (``search`` raises NotImplementedError). Inputs, given to ``fit`` as context (nothing is
learned)::

    gallery_images   image of every gallery id: a TSV path (id<TAB>image path, relative paths
                     from the TSV's folder) or a mapping id -> path / encoded bytes
    query_texts      text of every query id: a TSV path (id<TAB>text) or a mapping id -> text
    gallery_ids      id of every gallery row, in row order (or call ``set_gallery``)

``rerank`` maps each shortlisted gallery row to its id and image, and each query to its text
through ``query_ids``. An image that cannot be read is logged and scored -inf (ranked last).
The model is loaded on first use, so fitting and saving the method costs nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from quari.embedding_cache import ImageSource, open_image, read_items_tsv
from quari.methods import RetrievalMethod
from quari.store import IdColumn, atomic_write_text, ids_at
from baselines.vlm.scorer import INQUIRE_TEMPERATURE, YesNoScorer, get_vlm

log = logging.getLogger(__name__)

_IMAGES = "gallery_images.tsv"
_TEXTS = "query_texts.tsv"
_GALLERY = "gallery_ids.txt"


def _as_mapping(value, what: str, paths: bool) -> dict[str, ImageSource]:
    """A mapping given directly, or read from an id<TAB>value TSV file."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, (str, Path)):
        items = read_items_tsv(value, paths=paths)
        return {k: os.path.abspath(v) if paths else v for k, v in items}
    raise TypeError(f"{what} must be a TSV path or a mapping id -> value, not {type(value).__name__}")


def _tsv(items: Mapping[str, str], what: str) -> str:
    for key, value in items.items():
        if not isinstance(value, (str, Path)):
            raise ValueError(f"cannot save {what}: {key!r} is a {type(value).__name__}, not a path")
        if any(c in f"{key}{value}" for c in "\t\r\n"):
            raise ValueError(f"cannot save {what}: {key!r} has a tab or newline")
    return "".join(f"{k}\t{v}\n" for k, v in items.items())


class VLMReranker(RetrievalMethod):
    """Re-ranks each query's shortlist by a vision-language model's P(Yes) / (P(Yes) + P(No))."""

    name = "vlm_reranker"
    label = "VLM re-ranker ({model})"
    trainable = False
    reranker = reranker_only = True
    #: INQUIRE-Rerank's candidate images and query texts: text queries, INQUIRE-Rerank only
    side_inputs = ("gallery_images", "query_texts")
    benchmarks = ("inquire_rerank",)
    query_types = ("text",)
    evaluation_mem_mb = 96000

    def __init__(self, model: str, path: str | None = None, batch_size: int = 8,
                 temperature: float = INQUIRE_TEMPERATURE, device: str | None = None):
        # model: entry of .scorer.VLMS (e.g. "llava_1.5_13b"): hub id, prompt, answer tokens
        # path: local directory with the same model (default: download the hub id)
        # batch_size: candidate images per forward pass (one query's candidates at a time)
        # temperature: softmax temperature of the two probabilities (INQUIRE's 0.5; no effect on
        #   the ranking)
        get_vlm(model)  # an unknown name fails here, not at the first query
        super().__init__(model=model, path=path, batch_size=batch_size, temperature=temperature,
                         device=device)
        self.images_: dict[str, ImageSource] | None = None
        self.texts_: dict[str, str] | None = None
        self.gallery_ids_: Sequence[str] | None = None
        self.scorer_: YesNoScorer | None = None

    def fit(self, train, valid=None, workdir=None, gallery_images=None, query_texts=None,
            gallery_ids: Sequence[str] | None = None, **context) -> "VLMReranker":
        if gallery_images is None or query_texts is None:
            raise ValueError(f"{self.name} needs the images and the query texts: fit(..., "
                             "gallery_images=TSV or mapping, query_texts=TSV or mapping)")
        self.images_ = _as_mapping(gallery_images, "gallery_images", paths=True)
        self.texts_ = _as_mapping(query_texts, "query_texts", paths=False)
        if gallery_ids is not None:
            self.set_gallery(gallery_ids)
        return self

    def set_gallery(self, ids: Sequence[str]) -> None:
        """Declare the id of every gallery row (row order) that ``rerank`` will receive. A
        memory-mapped id column is kept as it is: only the shortlisted rows are translated."""
        self.gallery_ids_ = ids if isinstance(ids, IdColumn) else list(ids)

    def scorer(self) -> YesNoScorer:
        """The loaded model (loaded on first use)."""
        if self.scorer_ is None:
            p = self.params
            self.scorer_ = YesNoScorer(get_vlm(p["model"]), path=p["path"], device=self.device,
                                       temperature=p["temperature"])
        return self.scorer_

    # -- ranking --------------------------------------------------------------------------
    def prepare(self, queries: torch.Tensor, query_ids: Sequence[str] | None = None) -> list[str]:
        """The text of each query, looked up by its id."""
        if self.texts_ is None:
            raise RuntimeError(f"{self.name} is not fitted (no query texts)")
        if query_ids is None:
            raise ValueError(f"{self.name} needs the query ids to find the query texts")
        missing = [q for q in query_ids if q not in self.texts_]
        if missing:
            raise KeyError(f"no text for {len(missing)} query ids, e.g. {missing[:3]}")
        return [self.texts_[q] for q in query_ids]

    def score(self, state, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} scores shortlisted gallery images by id; use rerank")

    def search(self, queries, gallery, k: int, chunk_rows: int = 65536,
               query_ids: Sequence[str] | None = None):
        raise NotImplementedError(f"{self.name} is a re-ranker only: it reads each candidate's "
                                  "image, so rank a shortlist with rerank")

    def score_images(self, query: str, image_ids: Sequence[str]) -> np.ndarray:
        """P(Yes) / (P(Yes) + P(No)) of each image for the query text, in batches; -inf for an
        image that cannot be read."""
        missing = [i for i in image_ids if i not in self.images_]
        if missing:
            raise KeyError(f"no image for {len(missing)} gallery ids, e.g. {missing[:3]}")
        scores = np.full(len(image_ids), -np.inf)
        step = self.params["batch_size"]
        for start in range(0, len(image_ids), step):
            readable, images = [], []
            for j in range(start, min(start + step, len(image_ids))):
                try:
                    images.append(open_image(self.images_[image_ids[j]]))
                    readable.append(j)
                except Exception as err:  # one unreadable image is ranked last, not fatal
                    log.warning("%s: cannot read image %s (%s: %s); it is ranked last",
                                self.name, image_ids[j], type(err).__name__, err)
            scores[readable] = self.scorer().score(images, query)
        return scores

    def rerank(self, queries, gallery, shortlist: np.ndarray,
               query_ids: Sequence[str] | None = None) -> torch.Tensor:
        self.check_gallery_ids(gallery)
        if self.images_ is None:
            raise RuntimeError(f"{self.name} is not fitted (no gallery images)")
        shortlist = np.asarray(shortlist)
        texts = self.prepare(torch.empty(0), query_ids)
        out = [self.score_images(text, ids_at(self.gallery_ids_, rows))
               for text, rows in tqdm(list(zip(texts, shortlist)), desc=f"{self.name} rerank",
                                      unit="query", disable=None)]
        return torch.from_numpy(np.stack(out)).float()

    # -- persistence ----------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        if self.images_ is not None:
            atomic_write_text(directory / _IMAGES, _tsv(self.images_, "gallery_images"))
            atomic_write_text(directory / _TEXTS, _tsv(self.texts_, "query_texts"))
        if self.gallery_ids_ is not None:
            atomic_write_text(directory / _GALLERY, "".join(f"{i}\n" for i in self.gallery_ids_))

    def load_state(self, directory: Path) -> None:
        if (directory / _IMAGES).exists():
            self.images_ = dict(read_items_tsv(directory / _IMAGES, paths=False))
            self.texts_ = dict(read_items_tsv(directory / _TEXTS, paths=False))
        if (directory / _GALLERY).exists():
            self.set_gallery((directory / _GALLERY).read_text().splitlines())
