"""Evaluate a retrieval method on a task exactly as the benchmark's official code scores it.

The harness, not the method, ranks and times: full-gallery search (Tables 1-2), and re-ranking of
a fixed initial shortlist (Table 3, Figure 4), with the time per 1k (or 100) query-image pairs.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from quari import metrics
from quari.devices import synchronize
from quari.methods import RetrievalMethod, as_tensor
from quari.scoring import cosine_topk
from quari.store import EmbeddingSet, check_finite, find_rows

log = logging.getLogger(__name__)


@dataclass
class RetrievalTask:
    """Queries, a gallery and, for each query id, the set of its positive gallery ids.

    Rankings are scored on gallery row numbers against the rows of each query's positives,
    found once in one pass over the gallery's ids (:meth:`positive_rows`): a 100M-row gallery's
    ids (an :class:`quari.store.IdColumn`) are never all held in memory."""

    name: str
    queries: EmbeddingSet
    gallery: EmbeddingSet
    positives: dict[str, set[str]]
    _positive_rows: list[np.ndarray] | None = field(default=None, init=False, repr=False,
                                                    compare=False)

    def __post_init__(self):
        for what, rows in (("queries", self.queries), ("gallery", self.gallery)):
            if len(rows) == 0:
                where = f" {rows.source}" if rows.source else ""
                raise ValueError(f"task {self.name}: the {what}{where} is empty (every item "
                                 "skipped, see its skipped.tsv, or nothing was listed); check "
                                 "the data, then delete that folder and embed it again")
        check_finite(self.queries.embeddings, self.queries.ids,
                     f"task {self.name}: queries {self.queries.source or '(in memory)'}")
        missing = [q for q in self.queries.ids if q not in self.positives]
        if missing:
            raise ValueError(f"task {self.name}: {len(missing)} queries have no ground-truth entry, "
                             f"e.g. {missing[:3]}")

    def positives_of(self, query_ids: Sequence[str]) -> list[set[str]]:
        return [self.positives[q] for q in query_ids]

    def positive_rows(self) -> list[np.ndarray]:
        """Gallery rows of each query's positives, in query order (ids found in one pass over
        the gallery's ids, the first time this is asked)."""
        if self._positive_rows is None:
            query_ids = list(self.queries.ids)
            wanted = set().union(*(self.positives[q] for q in query_ids))
            rows = find_rows(self.gallery.ids, wanted)
            empty = np.zeros(0, dtype=np.int64)
            self._positive_rows = [
                np.sort(np.concatenate([rows.get(i, empty) for i in self.positives[q]] or [empty]))
                for q in query_ids]
        return self._positive_rows

    def num_positives(self) -> list[int]:
        """Each query's number of positive ids P (found in the gallery or not), in query order."""
        return [len(self.positives[q]) for q in self.queries.ids]

    def relevance(self, rankings: np.ndarray) -> list[np.ndarray]:
        """0/1 relevance of each query's ranking (gallery rows [Q, n], best first)."""
        return [np.isin(row, pos).astype(np.float64)
                for row, pos in zip(rankings, self.positive_rows())]


def hardware_name(device: torch.device | str) -> str:
    """A short description of the machine a timing was taken on (GPU name, or CPU model x threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def rank_gallery(method: RetrievalMethod, task: RetrievalTask, k: int, batch_size: int = 64,
                 chunk_rows: int = 65536, shortlist: int | str = "all"
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k gallery rows of every query: (indices [Q, k], scores [Q, k], seconds).

    ``shortlist="all"`` lets the method score the whole gallery; an integer first takes the
    backbone's cosine top-``shortlist`` and lets the method re-rank only those.
    """
    n_q = len(task.queries)
    k = min(k, len(task.gallery))
    out_i = np.zeros((n_q, k), dtype=np.int64)
    out_s = np.zeros((n_q, k), dtype=np.float32)
    seconds = 0.0
    for start in tqdm(range(0, n_q, batch_size), desc=f"rank {task.name}", disable=None):
        q = np.asarray(task.queries.embeddings[start:start + batch_size], dtype=np.float32)
        ids = task.queries.ids[start:start + batch_size]
        synchronize(method.device)
        t0 = time.perf_counter()
        if shortlist == "all":
            s, i = method.search(q, task.gallery.embeddings, k, chunk_rows=chunk_rows, query_ids=ids)
            s, i = s.numpy(), i.numpy()
        else:
            _, cand = cosine_shortlist(q, task.gallery.embeddings, int(shortlist), chunk_rows,
                                       method.device)
            s_all = method.rerank(q, task.gallery.embeddings, cand, query_ids=ids).numpy()
            order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
            i = np.take_along_axis(cand, order, 1)
            s = np.take_along_axis(s_all, order, 1)
            if i.shape[1] < k:  # rows beyond the shortlist keep the backbone order
                raise ValueError(f"shortlist {shortlist} is shorter than k={k}")
        synchronize(method.device)
        seconds += time.perf_counter() - t0
        out_i[start:start + len(ids)], out_s[start:start + len(ids)] = i, s
    return out_i, out_s, seconds


def cosine_shortlist(queries, gallery, k: int, chunk_rows: int = 65536,
                     device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The backbone's initial ranking: cosine top-k (scores, indices) as numpy arrays."""
    s, i = cosine_topk(as_tensor(queries, device), gallery, k, chunk_rows=chunk_rows, device=device)
    return s.cpu().numpy(), i.cpu().numpy()


def score_ranking(task: RetrievalTask, indices: np.ndarray, benchmark: str, k: int) -> dict[str, float]:
    """Official metrics of a ranking (gallery row indices, best first), scored on row numbers
    against the rows of each query's positives (the same as scoring the ranked ids)."""
    relevance = task.relevance(np.asarray(indices)[:, :k])
    if benchmark == "ilias":
        return {f"mAP@{k_label(k)}": metrics.ilias_map_of_relevance(
            relevance, task.num_positives(), k=k)}
    if benchmark == "inquire":
        m = metrics.inquire_metrics_of_relevance(relevance, task.num_positives(), k=k)
        return {f"mAP@{k}": m["mAP"], f"nDCG@{k}": m["nDCG"], "MRR": m["MRR"]}
    raise ValueError(f"unknown benchmark {benchmark!r}")


def k_label(k: int) -> str:
    """A cut-off as the papers write it: 1000 is "1k"."""
    return "1k" if k == 1000 else str(k)


def evaluate_search(method: RetrievalMethod, task: RetrievalTask, benchmark: str, k: int,
                    chunk_rows: int = 65536, shortlist: int | str = "all",
                    query_batch: int = 64) -> dict:
    """Full retrieval: rank the gallery and score the top k. Returns metrics and timing.

    Every batch of ``query_batch`` queries streams the whole gallery once (``chunk_rows`` rows at
    a time), so a larger batch means fewer passes over a gallery that does not fit in memory.
    """
    idx, _, seconds = rank_gallery(method, task, k, batch_size=query_batch, chunk_rows=chunk_rows,
                                   shortlist=shortlist)
    pairs = len(task.queries) * (len(task.gallery) if shortlist == "all"
                                 else min(int(shortlist), len(task.gallery)))
    return {
        "metrics": score_ranking(task, idx, benchmark, k),
        "seconds": seconds,
        "ms_per_query": 1000 * seconds / len(task.queries),
        "ms_per_1k_pairs": 1e6 * seconds / pairs,
        "shortlist": shortlist,
        "num_queries": len(task.queries),
        "gallery_size": len(task.gallery),
    }


def rerank_metrics(relevance: Sequence[np.ndarray], num_positives: Sequence[int], scoring: str,
                   k: int, query_ids: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics of re-ranked lists (each query's 0/1 relevance in its new order) as the
    benchmark scores them: of a method's re-ranking (:func:`evaluate_rerank`,
    :func:`quari.data.inquire.rerank_candidates`) and of the best possible one
    (:func:`quari.reporting.tables.best_possible_metrics`), so the two are always comparable.

    ``"ilias"`` (Table 3a): mAP@k, P = every positive of the query. ``"inquire"``
    (INQUIRE-Rerank's official scoring): AP, nDCG and MRR over the whole list, P = the relevant
    candidates (``num_positives`` unused), labelled @50 as the benchmark labels them.
    ``"inquire_full_pool"`` (the paper's Table 3b): AP@k, nDCG@k and MRR with P = every positive
    in the pool. ``query_ids`` only name queries in errors.
    """
    if scoring == "ilias":
        return {f"mAP@{k_label(k)}": metrics.ilias_map_of_relevance(relevance, num_positives, k)}
    if scoring == "inquire":
        m = metrics.inquire_rerank_metrics(relevance)
        return {"mAP@50": m["mAP"], "nDCG@50": m["nDCG"], "MRR": m["MRR"]}
    if scoring == "inquire_full_pool":
        m = metrics.inquire_rerank_fullpool_metrics(relevance, num_positives, k, query_ids)
        return {f"mAP@{k}": m["mAP"], f"nDCG@{k}": m["nDCG"], "MRR": m["MRR"]}
    raise ValueError(f"unknown re-ranking scoring {scoring!r}")


def rerank_timing(seconds: float, pairs: int) -> dict[str, float]:
    """A re-ranking's time in total and per 1k and per 100 (query, candidate) pairs (Table 3's
    columns)."""
    return {"seconds": seconds, "ms_per_1k_pairs": 1e6 * seconds / pairs,
            "ms_per_100_pairs": 1e5 * seconds / pairs}


def timed_reranks(method: RetrievalMethod, gallery, batches: Iterable[tuple]
                  ) -> Iterator[tuple[tuple, np.ndarray, float]]:
    """Re-rank each batch ``(queries [B, E], candidate gallery rows [B, n], query ids, ...)`` (the
    caller's own items may follow) with ``method.rerank`` and yield ``(batch, order, seconds)``: ``order`` [B, n] ranks each query's
    candidates best first (ties keep the list order), ``seconds`` is the time of the method's
    call alone, the device synchronised before and after. The first batch's first query is
    re-ranked once before it, outside the timer (a warm-up: lazy loading, kernel compilation).
    The one timed re-rank loop of the harness: shortlists of the backbone (:func:`evaluate_rerank`)
    and INQUIRE-Rerank's fixed lists (:func:`quari.data.inquire.rerank_candidates`) alike."""
    for n, batch in enumerate(batches):
        q, candidates, ids = batch[:3]
        if n == 0:
            method.rerank(q[:1], gallery, candidates[:1], query_ids=ids[:1])
        synchronize(method.device)
        t0 = time.perf_counter()
        s = method.rerank(q, gallery, candidates, query_ids=ids).numpy()
        synchronize(method.device)
        seconds = time.perf_counter() - t0
        yield batch, np.argsort(-s, axis=1, kind="stable"), seconds


def evaluate_rerank(method: RetrievalMethod, task: RetrievalTask, benchmark: str,
                    shortlist: int, k: int, chunk_rows: int = 65536, batch_size: int = 64) -> dict:
    """Re-rank the backbone's top-``shortlist`` of each query and score it.

    ILIAS (Table 3a): mAP@k of the re-ranked list, P = all positives. INQUIRE-Rerank (Table 3b):
    AP, nDCG and MRR over the whole shortlist with P = relevant ids inside it. Timing covers only
    the method's re-ranking (the shortlist is shared and given; :func:`timed_reranks`), per 1k
    pairs (ILIAS) and per 100 pairs (INQUIRE).
    """
    n_q = len(task.queries)
    reranked = np.zeros((n_q, min(shortlist, len(task.gallery))), dtype=np.int64)

    def batches():
        for start in tqdm(range(0, n_q, batch_size), desc=f"rerank {task.name}", disable=None):
            q = np.asarray(task.queries.embeddings[start:start + batch_size], dtype=np.float32)
            _, cand = cosine_shortlist(q, task.gallery.embeddings, shortlist, chunk_rows)
            yield q, cand, task.queries.ids[start:start + batch_size]

    seconds, start = 0.0, 0
    for (_, cand, _), order, batch_seconds in timed_reranks(method, task.gallery.embeddings,
                                                            batches()):
        seconds += batch_seconds
        reranked[start:start + len(cand)] = np.take_along_axis(cand, order, 1)
        start += len(cand)
    pairs = n_q * reranked.shape[1]
    result = {**rerank_timing(seconds, pairs), "shortlist": reranked.shape[1], "num_queries": n_q}
    rel = task.relevance(reranked)
    # what the best possible re-ranking of these shortlists scores (quari.reporting.tables)
    result["relevant_in_shortlist"] = [int(sum(r)) for r in rel]
    result["num_positives"] = task.num_positives()
    result["metrics"] = rerank_metrics(rel, result["num_positives"],
                                       "ilias" if benchmark == "ilias" else "inquire", k)
    return result
