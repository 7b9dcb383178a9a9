"""Semi-positive mining: each training image's nearest other images in the backbone space.

For every image the ``k`` nearest *other* images by exact inner product (cosine, rows are
L2-normalised first) are found with faiss; a softmax over their similarities divided by
``temperature`` weights them, and the ``top_n`` best are kept as semi-positives with their
softmax weight (paper section 3.3: k = 100, temperature 0.07, top 2).

Training data holds one row per (image, caption) pair, so an image id can occur several times.
Mining runs on the images deduplicated by id: an image never finds copies of itself, which the
released pipeline did (it drops only the first hit of each search, and every other caption row of
the same image came back as a "semi-positive").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm.auto import tqdm

from quari.store import atomic_savez, l2_normalize

logger = logging.getLogger(__name__)

# faiss-cpu computes inner products with BLAS for searches of at least this many queries; set
# explicitly so that batched searches always take the BLAS path, whatever another module set.
BLAS_THRESHOLD = 20

# Rows sharing an id whose embeddings differ by more than this (max abs) trigger a warning: the
# first row stands for the image, which is only right when the copies are the same embedding.
DUPLICATE_TOLERANCE = 1e-3
# Rows compared at a time in that check (bounded memory for millions of caption rows).
CHUNK_ROWS = 65536


@dataclass
class DedupedImages:
    """Images deduplicated by id, in order of first occurrence, and how rows map onto them."""

    embeddings: np.ndarray  # [N, E] float32, L2-normalised, one row per distinct id
    ids: np.ndarray  # [N] the distinct ids
    source_rows: np.ndarray  # [N] int64: the input row each distinct image was taken from
    inverse: np.ndarray  # [M] int64: for every input row, its row in ``embeddings``


@dataclass
class SemiPositives:
    """Semi-positives of every distinct image, as rows of the deduplicated image array.

    ``image_ids``, ``source_rows`` and ``inverse`` describe the deduplication (see
    :class:`DedupedImages`); :meth:`per_pair` maps the result back to the input rows.
    """

    indices: np.ndarray  # [N, top_n] int64 rows into the deduplicated images, -1 where fewer exist
    weights: np.ndarray  # [N, top_n] float32 softmax weight over the k neighbours, 0 where absent
    image_ids: np.ndarray  # [N] the distinct image ids (row order of ``indices``)
    source_rows: np.ndarray  # [N] int64 input row each distinct image was taken from
    inverse: np.ndarray  # [M] int64 deduplicated row of every input row

    def per_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices [M, top_n], weights [M, top_n]) for every input row, e.g. every caption.

        Indices stay rows of the deduplicated image array (-1 where absent).
        """
        return self.indices[self.inverse], self.weights[self.inverse]

    def source_indices(self) -> np.ndarray:
        """``indices`` as rows of the input image array (the first row of each id), -1 kept."""
        out = np.full_like(self.indices, -1)
        valid = self.indices >= 0
        out[valid] = self.source_rows[self.indices[valid]]
        return out


def dedupe_images(image_embeddings: np.ndarray, image_ids: Sequence) -> DedupedImages:
    """One row per distinct image id (its first row), L2-normalised, with the row mappings."""
    ids = np.asarray(image_ids)
    if ids.ndim != 1 or len(ids) != len(image_embeddings):
        raise ValueError(f"{len(ids)} image ids for {len(image_embeddings)} embeddings")
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # distinct ids in order of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    source_rows = first[order].astype(np.int64)
    inverse = rank[inverse.reshape(-1)].astype(np.int64)
    if len(source_rows) == len(ids):
        embeddings = l2_normalize(image_embeddings)
    else:
        embeddings = l2_normalize(np.asarray(image_embeddings)[source_rows])
        gap = max(float(np.abs(l2_normalize(image_embeddings[start:start + CHUNK_ROWS])
                               - embeddings[inverse[start:start + CHUNK_ROWS]]).max())
                  for start in range(0, len(ids), CHUNK_ROWS))
        if gap > DUPLICATE_TOLERANCE:
            logger.warning("rows sharing an image id differ by up to %.3g; the first row of "
                           "each id is used", gap)
    return DedupedImages(embeddings=embeddings, ids=uniq[order], source_rows=source_rows,
                         inverse=inverse)


def _build_index(embeddings: np.ndarray, use_gpu: bool) -> faiss.Index:
    """Exact inner-product index over ``embeddings``, on a GPU when faiss has one."""
    index = faiss.IndexFlatIP(embeddings.shape[1])
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        logger.info("mining on GPU")
    index.add(embeddings)
    return index


def _neighbours(sims: np.ndarray, ids: np.ndarray,
                self_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hits of each row other than itself, ordered by (-similarity, row), as float64.

    faiss marks missing hits with -1; they and the query's own row become (-inf, -1) and sort
    last.
    """
    drop = (ids < 0) | (ids == self_rows[:, None])
    sims = np.where(drop, -np.inf, sims).astype(np.float64)
    ids = np.where(drop, -1, ids)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -sims), axis=1)
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def _search(index: faiss.Index, queries: np.ndarray, self_rows: np.ndarray, k: int, top_n: int,
            search_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows (sims [B, k], rows [B, k]), ties broken by the lower row.

    faiss returns an arbitrary subset of hits tied at its last returned similarity. The k best
    similarities are exact either way; the kept top_n rows are only exact when every hit tied
    with the top_n-th one was returned, so rows where the tie may continue past the returned
    hits are searched again with twice as many hits.
    """
    n = index.ntotal
    raw_sims, raw_ids = index.search(queries, search_k)
    sims, ids = _neighbours(raw_sims, raw_ids.astype(np.int64), self_rows)
    if search_k < n:
        redo = np.flatnonzero(raw_sims[:, -1] >= sims[:, top_n - 1])
        if len(redo):
            more = _search(index, queries[redo], self_rows[redo], k, top_n,
                           min(2 * search_k, n))
            sims, ids = sims[:, :k].copy(), ids[:, :k].copy()
            sims[redo], ids[redo] = more
    return sims[:, :k], ids[:, :k]


def mine_semipositives(image_embeddings: np.ndarray, image_ids: Sequence, k: int = 100,
                       top_n: int = 2, temperature: float = 0.07, batch_size: int = 16384,
                       use_gpu: bool = True, progress: bool = True) -> SemiPositives:
    """Semi-positives of every distinct image among ``image_embeddings`` [M, E].

    ``image_ids`` [M] may repeat (one row per caption); rows are deduplicated by id first and an
    image never finds itself. The ``k`` nearest other images (fewer when fewer exist) get weights
    softmax(sim / temperature) over those neighbours; the ``top_n`` best are kept, with -1 and
    weight 0 padding when fewer than ``top_n`` exist. Neighbours are exact (``IndexFlatIP``);
    queries run ``batch_size`` at a time, on a GPU when ``use_gpu`` and faiss has one.
    """
    if k < 1 or top_n < 1 or top_n > k:
        raise ValueError(f"need 1 <= top_n <= k, got k={k}, top_n={top_n}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    images = dedupe_images(image_embeddings, image_ids)
    n = len(images.ids)
    logger.info("mining %d semi-positives among %d distinct images (%d rows), k=%d",
                top_n, n, len(images.inverse), k)
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    indices = np.full((n, top_n), -1, dtype=np.int64)
    weights = np.zeros((n, top_n), dtype=np.float32)
    if n < 2:
        return SemiPositives(indices, weights, images.ids, images.source_rows, images.inverse)
    index = _build_index(images.embeddings, use_gpu)
    # one extra hit stands in for the query itself, which is dropped
    search_k = min(k + 1, n)
    for start in tqdm(range(0, n, batch_size), desc="mining semi-positives", unit="batch",
                      disable=not progress):
        stop = min(start + batch_size, n)
        sims, ids = _search(index, images.embeddings[start:stop], np.arange(start, stop), k,
                            top_n, search_k)
        logits = sims / temperature
        logits -= logits[:, :1]  # the best hit is finite whenever n >= 2
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        keep = ids[:, :top_n] >= 0
        indices[start:stop] = np.where(keep, ids[:, :top_n], -1)
        weights[start:stop] = np.where(keep, probs[:, :top_n], 0.0)
    return SemiPositives(indices, weights, images.ids, images.source_rows, images.inverse)


class StaleCacheError(ValueError):
    """A cached result was computed from other inputs than the ones now given."""


def save_semipositives(path: str | os.PathLike, semipositives: SemiPositives,
                       source: dict | None = None) -> None:
    """Write ``semipositives`` to an ``.npz`` file atomically (ids as a plain array, no pickle).

    ``source`` records what they were mined from (the images' :func:`quari.store.
    embedding_fingerprint` under ``"images"``, the mining settings), as JSON in the file."""
    ids = semipositives.image_ids
    if ids.dtype == object:
        ids = ids.astype(str)
    atomic_savez(path, indices=semipositives.indices, weights=semipositives.weights,
                 image_ids=ids, source_rows=semipositives.source_rows,
                 inverse=semipositives.inverse,
                 source=np.array(json.dumps(source or {}, sort_keys=True)))


def load_semipositives(path: str | os.PathLike, images_fingerprint: str | None = None
                       ) -> SemiPositives:
    """Read what :func:`save_semipositives` wrote. With ``images_fingerprint`` (of the training
    images about to be used), a file mined from other images, or recording none, raises
    StaleCacheError naming the file to delete."""
    with np.load(path, allow_pickle=False) as f:
        source = json.loads(str(f["source"])) if "source" in f.files else {}
        if images_fingerprint is not None and source.get("images") != images_fingerprint:
            raise StaleCacheError(
                f"{path} was mined from other training images (fingerprint "
                f"{source.get('images')}, the training images now are {images_fingerprint}); "
                f"delete it and mine again (snakemake --forcerun mine_semipositives)")
        return SemiPositives(indices=f["indices"], weights=f["weights"], image_ids=f["image_ids"],
                             source_rows=f["source_rows"], inverse=f["inverse"])
