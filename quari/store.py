"""On-disk formats shared by every stage: embedding sets, training collections, ground truth.

An *embedding set* is a folder of shards::

    manifest.json          written last; lists the complete shards (its presence = complete set)
    shard-00000.npy        float16 [rows, E], L2-normalised
    shard-00000.ids.txt    one id per row

Every file is written to a temporary name and moved into place with ``os.replace``, so a killed
process never leaves a file that looks complete. Loading memory-maps the shards.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temporary file beside ``path``, flush it to disk, then move
    it into place with ``os.replace``: readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _save_with(save, *args, **kwargs) -> Callable[[str], None]:
    """A writer for :func:`atomic_write` that calls ``save(file_object, ...)``."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            save(f, *args, **kwargs)
    return write


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    atomic_write(path, _save_with(np.save, array))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclass
class EmbeddingSet:
    """Rows of L2-normalised embeddings with their ids (``embeddings[i]`` belongs to ``ids[i]``)."""

    embeddings: np.ndarray  # [N, E], float16 on disk, memory-mapped when loaded
    ids: list[str]

    def __post_init__(self):
        if len(self.ids) != len(self.embeddings):
            raise ValueError(f"{len(self.ids)} ids for {len(self.embeddings)} embeddings")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def index_of(self) -> dict[str, int]:
        return {i: n for n, i in enumerate(self.ids)}


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a complete embedding set (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported embedding-set format {manifest.get('format')}")
    return manifest


class EmbeddingSetWriter:
    """Writes an embedding set shard by shard; ``close()`` writes the manifest.

    Shards already complete in ``directory`` (listed in a partial manifest) are kept, so a
    restarted job can resume with ``completed_shards`` and skip the rows they hold.
    """

    def __init__(self, directory: str | os.PathLike, dim: int, dtype: str = "float16"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dim, self.dtype = dim, dtype
        self._partial = self.directory / ".partial-manifest.json"
        self.shards: list[dict] = []
        if self._partial.exists():
            state = json.loads(self._partial.read_text())
            if state["dim"] == dim and state["dtype"] == dtype:
                self.shards = [s for s in state["shards"]
                               if (self.directory / s["file"]).exists()
                               and (self.directory / s["ids"]).exists()]

    @property
    def completed_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def add_shard(self, embeddings: np.ndarray, ids: Sequence[str]) -> None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"shard of shape {embeddings.shape}, expected [rows, {self.dim}]")
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids for {len(embeddings)} rows")
        if any(("\n" in i) for i in ids):
            raise ValueError("ids must not contain newlines")
        n = len(self.shards)
        name = f"shard-{n:05d}"
        atomic_save_npy(self.directory / f"{name}.npy", embeddings.astype(self.dtype))
        atomic_write_text(self.directory / f"{name}.ids.txt", "".join(f"{i}\n" for i in ids))
        self.shards.append({"file": f"{name}.npy", "ids": f"{name}.ids.txt", "rows": len(ids)})
        atomic_write_json(self._partial, {"dim": self.dim, "dtype": self.dtype, "shards": self.shards})

    def close(self, meta: dict | None = None) -> None:
        atomic_write_json(self.directory / MANIFEST, {
            "format": FORMAT_VERSION, "dim": self.dim, "dtype": self.dtype,
            "rows": self.completed_rows, "shards": self.shards, "meta": meta or {},
        })
        if self._partial.exists():
            self._partial.unlink()


def save_embedding_set(directory: str | os.PathLike, embeddings: np.ndarray, ids: Sequence[str],
                       shard_rows: int = 1_000_000, meta: dict | None = None) -> None:
    """Save an embedding set in one go (fp16, sharded every ``shard_rows`` rows)."""
    embeddings = np.asarray(embeddings)
    writer = EmbeddingSetWriter(directory, embeddings.shape[1])
    if writer.shards:
        raise FileExistsError(f"{directory} holds a partial embedding set; remove it first")
    for start in range(0, max(len(ids), 1), shard_rows):
        if len(ids) == 0:
            break
        writer.add_shard(embeddings[start:start + shard_rows], list(ids[start:start + shard_rows]))
    writer.close(meta)


def iter_shards(directory: str | os.PathLike) -> Iterator[EmbeddingSet]:
    """Yield the shards of an embedding set one at a time (memory-mapped)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    for shard in manifest["shards"]:
        emb = np.load(directory / shard["file"], mmap_mode="r")
        ids = (directory / shard["ids"]).read_text().splitlines()
        yield EmbeddingSet(emb, ids)


class ShardedRows:
    """The rows of several memory-mapped shards seen as one [N, E] array, never concatenated.

    A 100M x 1024 fp16 gallery is 205 GB: concatenating its shards would need that much memory.
    This view reads only what is asked: ``rows[a:b]`` (a contiguous chunk, what the streaming
    searches read), ``rows[i]`` and ``rows[indices]`` for integer arrays of any shape (shortlist
    gathers). ``np.asarray(rows)`` materialises everything, for small sets only.
    """

    def __init__(self, shards: Sequence[np.ndarray]):
        if not shards:
            raise ValueError("ShardedRows needs at least one shard")
        dims = {s.shape[1] for s in shards}
        if len(dims) != 1:
            raise ValueError(f"shards of different widths: {sorted(dims)}")
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.shape = (int(self.starts[-1]), dims.pop())
        self.dtype = shards[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.shards)
        return out if dtype is None else out.astype(dtype)

    def _take(self, flat: np.ndarray) -> np.ndarray:
        n = self.shape[0]
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        flat = np.where(flat < 0, flat + n, flat)
        out = np.empty((len(flat), self.shape[1]), dtype=self.dtype)
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        for k in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == k)
            out[sel] = self.shards[k][flat[sel] - self.starts[k]]
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                return self._take(np.arange(start, stop, step))
            parts = []
            for k, shard in enumerate(self.shards):
                lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
                if lo < hi:
                    parts.append(shard[lo - self.starts[k]:hi - self.starts[k]])
            return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.dtype)
        if isinstance(index, (int, np.integer)):
            return self._take(np.array([index]))[0]
        index = np.asarray(index)
        if index.dtype == bool or not np.issubdtype(index.dtype, np.integer):
            raise TypeError("ShardedRows takes slices and integer row indices")
        return self._take(index.reshape(-1)).reshape(*index.shape, self.shape[1])


def load_embedding_set(directory: str | os.PathLike, mmap: bool = True) -> EmbeddingSet:
    """Load a complete embedding set. Memory-mapped by default: one shard is its memmap, several
    are a :class:`ShardedRows` view (nothing is concatenated). ``mmap=False`` reads it all."""
    shards = list(iter_shards(directory))
    manifest = _read_manifest(Path(directory))
    if not shards:
        return EmbeddingSet(np.zeros((0, manifest["dim"]), dtype=np.float16), [])
    ids = [i for s in shards for i in s.ids]
    if not mmap:
        return EmbeddingSet(np.concatenate([s.embeddings for s in shards]), ids)
    if len(shards) == 1:
        return EmbeddingSet(shards[0].embeddings, ids)
    return EmbeddingSet(ShardedRows([s.embeddings for s in shards]), ids)


def embedding_set_meta(directory: str | os.PathLike) -> dict:
    return _read_manifest(Path(directory)).get("meta", {})


# --------------------------------------------------------------------------------------------
# Training collections: images with instance/class labels and captions pointing at images.


@dataclass
class TrainingCollection:
    """Image-caption training data of one backbone.

    ``image_labels`` are instance (or class) labels used by classifier-style baselines, -1 where
    unknown; ``caption_image[c]`` is the row in ``images`` that caption c describes. Several
    captions may share an image, and several images may share a label (views of one instance).
    """

    images: EmbeddingSet
    image_labels: np.ndarray  # [Ni] int64
    captions: EmbeddingSet
    caption_image: np.ndarray  # [Nc] int64
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.image_labels = np.asarray(self.image_labels, dtype=np.int64)
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.image_labels) != len(self.images):
            raise ValueError("one label per image is required")
        if len(self.caption_image) != len(self.captions):
            raise ValueError("one image row per caption is required")
        if len(self.caption_image) and (self.caption_image.min() < 0
                                        or self.caption_image.max() >= len(self.images)):
            raise ValueError("caption_image points outside the images")

    @property
    def dim(self) -> int:
        return self.images.dim


def save_training_collection(directory: str | os.PathLike, collection: TrainingCollection) -> None:
    directory = Path(directory)
    save_embedding_set(directory / "images", collection.images.embeddings, collection.images.ids)
    save_embedding_set(directory / "captions", collection.captions.embeddings, collection.captions.ids)
    atomic_save_npy(directory / "image_labels.npy", collection.image_labels)
    atomic_save_npy(directory / "caption_image.npy", collection.caption_image)
    atomic_write_json(directory / "collection.json", {"name": collection.name, "meta": collection.meta})


def load_training_collection(directory: str | os.PathLike) -> TrainingCollection:
    directory = Path(directory)
    info = json.loads((directory / "collection.json").read_text())
    return TrainingCollection(
        images=load_embedding_set(directory / "images", mmap=False),
        image_labels=np.load(directory / "image_labels.npy"),
        captions=load_embedding_set(directory / "captions", mmap=False),
        caption_image=np.load(directory / "caption_image.npy"),
        name=info.get("name", ""), meta=info.get("meta", {}),
    )


# --------------------------------------------------------------------------------------------
# Ground truth


def save_positives(path: str | os.PathLike, positives: dict[str, Sequence[str]]) -> None:
    """Ground truth as JSON: query id -> list of positive database ids."""
    atomic_write_json(path, {q: sorted(p) for q, p in positives.items()})


def load_positives(path: str | os.PathLike) -> dict[str, set[str]]:
    return {q: set(p) for q, p in json.loads(Path(path).read_text()).items()}


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` through :func:`atomic_write`."""
    atomic_write(path, _save_with(np.savez, **arrays))
