"""Image similarity from local descriptors: Chamfer similarity and spatial verification.

These are the local-feature re-rankers of Table 3a (DINOv2 patch descriptors, 100 per database
image and 600 per query in the paper). The functions here are pure: they take the descriptors
(and patch positions) of one query and its candidates and return a score; the re-ranking methods
in ``baselines/local_features/rerankers.py`` look the descriptors up by image id.

Local descriptors on disk are one ``.npz`` per image set (see :func:`save_local_descriptors`)::

    ids          str   [N]        image (or query) ids
    descriptors  float [N, M, D]  descriptors of each image, padded to M rows (float16 from the
                                  extractor)
    xy           float [N, M, 2]  patch centre (x, y) of each descriptor, in normalised image
                                  coordinates ([0, 1], so thresholds do not depend on image size)
    counts       int   [N]        valid rows of image i are descriptors[i, :counts[i]]

Descriptors need not be normalised: both scores compare them by cosine.

Scale: ILIAS's Table 3a needs the descriptors of every image in the union of the image queries'
top-1k shortlists, up to about 1.2M images x 100 x 768, 185 GB in float16. The file is therefore
an uncompressed ``.npz`` written in row blocks (:class:`quari.store.NpzWriter`), and
:func:`load_local_descriptors` memory-maps ``descriptors`` and ``xy`` in their stored dtype; a
re-ranker copies out only each query's candidates (:meth:`LocalDescriptors.gather`) and converts
those to float32. Every ``.npz`` with these keys loads, old and compressed ones included.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from quari.store import (NpzFormatError, NpzWriter, atomic_write_npz, load_npz_array,
                         read_npz_arrays)

#: RANSAC hypotheses whose sample spans (twice) less area than this are degenerate and skipped
_DEGENERATE = 1e-9


@dataclass
class LocalDescriptors:
    """Padded local descriptors of a set of images, found by id.

    ``descriptors`` and ``xy`` may be read-only memory maps in the stored dtype (what
    :func:`load_local_descriptors` returns by default): read rows with :meth:`gather` or
    :meth:`image`, never the whole array.
    """

    ids: list[str]
    descriptors: np.ndarray  # [N, M, D], float16 memmap as loaded by default
    xy: np.ndarray           # [N, M, 2]
    counts: np.ndarray       # [N] int

    def __post_init__(self):
        if not (len(self.ids) == len(self.descriptors) == len(self.xy) == len(self.counts)):
            raise ValueError(f"{len(self.ids)} ids, {len(self.descriptors)} descriptor rows, "
                             f"{len(self.xy)} xy rows and {len(self.counts)} counts: one each "
                             "per image is required")
        self.row_of = {i: r for r, i in enumerate(self.ids)}
        if len(self.row_of) != len(self.ids):
            raise ValueError("local descriptor ids are not unique")

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id; a missing id is a KeyError naming a few of them."""
        missing = [i for i in ids if i not in self.row_of]
        if missing:
            raise KeyError(f"no local descriptors for {len(missing)} ids, e.g. {missing[:3]}")
        return np.array([self.row_of[i] for i in ids], dtype=np.int64)

    def image(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors [m, D], xy [m, 2]) of one image, padding removed (views, stored dtype)."""
        m = int(self.counts[row])
        return self.descriptors[row, :m], self.xy[row, :m]

    def gather(self, rows: Sequence[int] | np.ndarray, width: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (descriptors [K, w, D], xy [K, w, 2], counts [K]) of ``rows``, in the stored
        dtype, with w = ``width`` leading descriptor rows of each image (default: the longest
        of these images, at least 1: past it there is only padding).

        The rows are read in increasing order, so a memory-mapped file is read front to back
        whatever the order of ``rows``; only these K images are read.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        counts = np.asarray(self.counts)[rows]
        w = max(1, int(counts.max(initial=0))) if width is None else int(width)
        desc = np.empty((len(rows), w, self.descriptors.shape[2]), dtype=self.descriptors.dtype)
        xy = np.empty((len(rows), w, 2), dtype=self.xy.dtype)
        for k in np.argsort(rows, kind="stable"):
            desc[k] = self.descriptors[rows[k], :w]
            xy[k] = self.xy[rows[k], :w]
        return desc, xy, counts


def save_local_descriptors(path: str | os.PathLike, ids: Sequence[str], descriptors: np.ndarray,
                           xy: np.ndarray, counts: np.ndarray | None = None,
                           extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Write the ``.npz`` layout described in the module docstring, atomically and streamed.

    ``descriptors`` keep their dtype and, like ``xy`` (stored as float32), are copied in blocks
    (a memory-mapped input is never read whole); ``counts`` (default: every row valid) is
    stored as int64. ``extra`` holds further per-image arrays stored beside them (the
    extractor's ``image_sizes``).
    """
    descriptors, xy = np.asanyarray(descriptors), np.asanyarray(xy)
    counts = np.full(len(ids), descriptors.shape[1]) if counts is None else np.asarray(counts)
    extra = {k: np.asarray(v) for k, v in (extra or {}).items()}
    if not (len(ids) == len(descriptors) == len(xy) == len(counts)
            and all(len(v) == len(ids) for v in extra.values())):
        raise ValueError("ids, descriptors, xy, counts and extra arrays must have one entry per "
                         "image")
    reserved = {"ids", "descriptors", "xy", "counts"} & set(extra)
    if reserved:
        raise ValueError(f"extra arrays may not be called {sorted(reserved)}")

    def fill(npz: NpzWriter) -> None:
        npz.write("ids", np.asarray(list(ids), dtype=str))
        npz.write("counts", counts, np.int64)
        for name, array in extra.items():
            npz.write(name, array)
        npz.write("descriptors", descriptors)
        npz.write("xy", xy, np.float32)

    atomic_write_npz(path, fill)


def load_local_descriptors(path: str | os.PathLike, mmap: bool = True) -> LocalDescriptors:
    """Read a file written by :func:`save_local_descriptors` (or the extractor).

    ``mmap=True`` (default): ``descriptors`` and ``xy`` are read-only memory maps onto the
    file, in the stored dtype (float16 from the extractor); only ``ids`` and ``counts`` are
    read. A file whose arrays are compressed (``np.savez_compressed``) cannot be mapped and is
    read into memory instead (logged). ``mmap=False``: everything in memory as float32.
    A truncated or corrupt file raises :class:`quari.store.NpzFormatError` naming it.
    """
    small = read_npz_arrays(path, ["ids", "counts"])
    if mmap:
        descriptors = load_npz_array(path, "descriptors")
        xy = load_npz_array(path, "xy")
    else:
        big = read_npz_arrays(path, ["descriptors", "xy"])
        descriptors = big["descriptors"].astype(np.float32, copy=False)
        xy = big["xy"].astype(np.float32, copy=False)
    try:
        return LocalDescriptors(ids=small["ids"].tolist(), descriptors=descriptors, xy=xy,
                                counts=small["counts"].astype(np.int64))
    except ValueError as err:
        raise NpzFormatError(f"{path}: {err}") from err


# -- Chamfer similarity --------------------------------------------------------------------------
def chamfer_similarities(query_desc: torch.Tensor, db_desc: torch.Tensor,
                         db_counts: torch.Tensor | None = None, chunk_elements: int = 1 << 26
                         ) -> torch.Tensor:
    """Chamfer similarity of one query to K candidate images: a tensor [K].

    With unit-normalised query descriptors q_1..q_Nq and database descriptors x_1..x_m::

        CS(q, x) = (1 / Nq) * sum_i max_j  q_i . x_j

    the mean over the *query's* descriptors of the cosine to its most similar database
    descriptor (so it is not symmetric). ``db_desc`` is [K, M, D] padded; only the first
    ``db_counts[k]`` rows of candidate k count. A candidate with no descriptors scores -1, the
    lowest possible cosine. Candidates are processed in chunks of about ``chunk_elements``
    similarities to bound memory; ``db_desc`` may be float16 (as stored) and on the CPU: each
    chunk is moved to the query's device and converted to float32 on its own.
    """
    q = torch.nn.functional.normalize(torch.as_tensor(query_desc, dtype=torch.float32), dim=-1)
    db = torch.as_tensor(db_desc)
    k, m = db.shape[:2]
    counts = (torch.full((k,), m, device=q.device) if db_counts is None
              else torch.as_tensor(db_counts, device=q.device))
    if q.shape[0] == 0:
        raise ValueError("the query has no local descriptors")
    step = max(1, chunk_elements // max(1, m * q.shape[0]))
    out = []
    for start in range(0, k, step):
        x = torch.nn.functional.normalize(db[start:start + step].to(q.device, torch.float32),
                                          dim=-1)
        sim = torch.einsum("kmd,nd->kmn", x, q)  # [k, M, Nq]
        pad = torch.arange(m, device=q.device)[None, :] >= counts[start:start + step, None]
        sim = sim.masked_fill(pad[:, :, None], -float("inf"))
        best = sim.max(dim=1).values  # [k, Nq]: each query descriptor's nearest database one
        out.append(torch.where(torch.isinf(best), -1.0, best).mean(dim=1))
    return torch.cat(out) if out else torch.zeros(0, device=q.device)


def chamfer_similarity(query_desc, db_desc) -> float:
    """Chamfer similarity of one query [Nq, D] to one database image [Nd, D] (see
    :func:`chamfer_similarities` for the definition)."""
    db = torch.from_numpy(np.array(db_desc, dtype=np.float32))  # a copy: inputs may be memmaps
    query = torch.from_numpy(np.array(query_desc, dtype=np.float32))
    return float(chamfer_similarities(query, db[None])[0])


# -- spatial verification -------------------------------------------------------------------------
def tentative_matches(query_desc: np.ndarray, db_desc: np.ndarray,
                      min_similarity: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours by cosine: (query rows, database rows) of the matched pairs.

    Pair (i, j) is kept when j is the most similar database descriptor to query descriptor i
    and i the most similar query descriptor to j (first index on ties), and, if given, their
    cosine is at least ``min_similarity``.
    """
    if len(query_desc) == 0 or len(db_desc) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    q = query_desc / np.maximum(np.linalg.norm(query_desc, axis=1, keepdims=True), 1e-12)
    d = db_desc / np.maximum(np.linalg.norm(db_desc, axis=1, keepdims=True), 1e-12)
    sim = q @ d.T
    forward, backward = sim.argmax(1), sim.argmax(0)
    qi = np.arange(len(q))
    keep = backward[forward] == qi
    if min_similarity is not None:
        keep &= sim[qi, forward] >= min_similarity
    return qi[keep], forward[keep]


def ransac_inliers(src: np.ndarray, dst: np.ndarray, model: str = "affine", threshold: float = 0.05,
                   iterations: int = 500, seed: int = 0) -> int:
    """Largest number of correspondences src[i] -> dst[i] that one transform maps within
    ``threshold`` (Euclidean, in the units of the points), over RANSAC hypotheses.

    ``model`` is "affine" (6 degrees of freedom, from 3 correspondences) or "similarity"
    (rotation, uniform scale and translation, from 2). ``iterations`` minimal samples are drawn
    with ``numpy.random.default_rng(seed)``, so the result is deterministic; degenerate samples
    (collinear or coincident points) are skipped. Fewer correspondences than a minimal sample
    give 0.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    size = {"affine": 3, "similarity": 2}.get(model)
    if size is None:
        raise ValueError(f"unknown transform model {model!r}; use 'affine' or 'similarity'")
    n = len(src)
    if n < size:
        return 0
    rng = np.random.default_rng(seed)
    samples = np.argsort(rng.random((iterations, n)), axis=1)[:, :size]  # without replacement
    if model == "affine":
        # rows [x, y, 1] @ A (3 x 2) = [x', y'] for the 3 sampled correspondences
        x = np.concatenate([src[samples], np.ones((iterations, 3, 1))], axis=2)
        valid = np.abs(np.linalg.det(x)) > _DEGENERATE
        x[~valid] = np.eye(3)
        a = np.linalg.solve(x, dst[samples])  # [T, 3, 2]
        predicted = np.concatenate([src, np.ones((n, 1))], axis=1) @ a  # [T, n, 2]
    else:
        # as complex numbers a similarity is z -> s * z + t
        z, w = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
        zs, ws = z[samples], w[samples]
        dz = zs[:, 1] - zs[:, 0]
        valid = np.abs(dz) > _DEGENERATE
        s = (ws[:, 1] - ws[:, 0]) / np.where(valid, dz, 1.0)
        t = ws[:, 0] - s * zs[:, 0]
        pz = s[:, None] * z[None, :] + t[:, None]
        predicted = np.stack([pz.real, pz.imag], axis=-1)
    inliers = (np.linalg.norm(predicted - dst[None], axis=-1) < threshold).sum(axis=1)
    return int(np.where(valid, inliers, 0).max())


def spatial_verification(query_desc: np.ndarray, query_xy: np.ndarray, db_desc: np.ndarray,
                         db_xy: np.ndarray, model: str = "affine", threshold: float = 0.05,
                         iterations: int = 500, seed: int = 0,
                         min_similarity: float | None = None) -> int:
    """Number of geometrically consistent local matches between a query and a database image.

    Tentative matches are mutual nearest neighbours of the descriptors
    (:func:`tentative_matches`); the score is the inlier count of the best transform mapping the
    query positions onto the database positions (:func:`ransac_inliers`, fixed seed).
    """
    qi, dj = tentative_matches(np.asarray(query_desc, dtype=np.float32),
                               np.asarray(db_desc, dtype=np.float32), min_similarity)
    return ransac_inliers(np.asarray(query_xy)[qi], np.asarray(db_xy)[dj], model=model,
                          threshold=threshold, iterations=iterations, seed=seed)
