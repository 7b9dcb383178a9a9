"""On-disk formats shared by every stage: embedding sets, training collections, ground truth.

An *embedding set* is a folder of shards::

    manifest.json          written last; lists the complete shards (its presence = complete set)
    shard-00000.npy        float16 [rows, E], L2-normalised
    shard-00000.ids.txt    one id per row
    shard-00000.ids.npy    the same ids as fixed-width UTF-8 bytes (numpy ``S<w>``), for
                           memory-mapping (manifest key ``id_array``; sets written before it
                           existed have only the text file and still load)

Every file is written to a temporary name and moved into place with ``os.replace``, so a killed
process never leaves a file that looks complete. Loading memory-maps the shards and their ids
(:class:`IdColumn`): a 100M-row gallery never becomes 100M Python strings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def current_umask() -> int:
    """The process's file-creation mask (read from /proc where it is, so that no other thread
    ever sees a changed mask; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temporary file beside ``path``, flush it to disk, then move
    it into place with ``os.replace``: readers see the old file or the complete new one. The
    file gets the permissions an ordinary ``open(path, "w")`` would give (0666 less the user's
    umask), not the owner-only 0600 of the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
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


class NonFiniteRowsError(ValueError):
    """Embedding rows holding NaN or infinite values."""


def check_finite(embeddings, ids: Sequence[str], where: str, block_rows: int = 1 << 16) -> None:
    """Raise NonFiniteRowsError naming ``where``, how many rows and the first ids whose
    embeddings hold NaN or infinite values (read in blocks of ``block_rows``)."""
    bad: list[int] = []
    for start in range(0, len(embeddings), block_rows):
        block = np.asarray(embeddings[start:start + block_rows])
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        bad += (rows + start).tolist()
    if bad:
        shown = ", ".join(repr(str(ids[i])) for i in bad[:10])
        raise NonFiniteRowsError(
            f"{where}: {len(bad)} of {len(embeddings)} embeddings hold NaN or infinite values, "
            f"ids {shown}{' ...' if len(bad) > 10 else ''}; the model or its input is broken "
            "for these items (check them, or the model's precision settings)")


def embedding_fingerprint(ids: Sequence[str], embeddings) -> str:
    """A digest of rows and their ids (dtype, shape, every byte, read in blocks): what a cache
    derived from them (mined semi-positives) records, to be checked before it is used."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{np.dtype(embeddings.dtype).str}{tuple(embeddings.shape)}".encode())
    digest.update("\n".join(map(str, ids)).encode("utf-8"))
    for start in range(0, len(embeddings), 1 << 16):
        digest.update(np.ascontiguousarray(embeddings[start:start + (1 << 16)]))
    return digest.hexdigest()


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


#: ids decoded or searched per block of an :class:`IdColumn` part
ID_BLOCK_ROWS = 1 << 20


def encode_ids(ids: Sequence[str]) -> np.ndarray:
    """Ids as a fixed-width UTF-8 bytes array (numpy ``S<w>``, w = the longest id's bytes)."""
    encoded = [i.encode("utf-8") for i in ids]
    if any(e.endswith(b"\0") for e in encoded):
        raise ValueError("ids must not end with a NUL character")
    width = max((len(e) for e in encoded), default=1) or 1
    return np.array(encoded, dtype=f"S{width}")


class IdColumn(Sequence):
    """The ids of an embedding set's rows as fixed-width UTF-8 bytes, one array per shard
    (memory-mapped when loaded), read as ``str`` only where asked.

    It is a read-only sequence of ``str`` (``len``, ``ids[i]``, ``ids[a:b]`` as a list,
    iteration, ``==`` with a list); :meth:`take` translates row numbers (e.g. a top k) to ids and
    :meth:`find` maps ids to row numbers in one streamed pass. Memory: one block of
    ``ID_BLOCK_ROWS`` ids at a time, whatever the number of rows.
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        for part in parts:
            if part.ndim != 1 or part.dtype.kind != "S":
                raise ValueError(f"an id part must be a 1-D bytes array, got {part.dtype} "
                                 f"of shape {part.shape}")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    @classmethod
    def from_strings(cls, ids: Sequence[str]) -> "IdColumn":
        return cls([encode_ids(ids)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return f"IdColumn({len(self)} ids in {len(self.parts)} parts)"

    def _bytes(self, rows: np.ndarray) -> list[bytes]:
        """The ids of row numbers ``rows`` (1-D, in range) as bytes, in order."""
        out: list[bytes] = [b""] * len(rows)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(part_of):
            sel = np.flatnonzero(part_of == k)
            for n, value in zip(sel.tolist(), self.parts[k][rows[sel] - self.starts[k]].tolist()):
                out[n] = value
        return out

    def take(self, rows) -> np.ndarray:
        """The ids (``str``, an object array of the same shape) of row numbers ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(self)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} ids")
        flat = np.where(rows < 0, rows + n, rows).reshape(-1)
        out = np.empty(flat.shape, dtype=object)
        out[:] = [b.decode("utf-8") for b in self._bytes(flat)]
        return out.reshape(rows.shape)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return [i for i in self.take(np.arange(start, stop, step))]
        if isinstance(index, (int, np.integer)):
            return str(self.take(np.array([index]))[0])
        raise TypeError("IdColumn takes an int or a slice; use take() for arrays of rows")

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, bytes array) of consecutive blocks of at most ``ID_BLOCK_ROWS`` ids."""
        for k, part in enumerate(self.parts):
            for s in range(0, len(part), ID_BLOCK_ROWS):
                yield int(self.starts[k]) + s, np.asarray(part[s:s + ID_BLOCK_ROWS])

    def __iter__(self) -> Iterator[str]:
        for _, block in self.blocks():
            yield from (b.decode("utf-8") for b in block.tolist())

    def __eq__(self, other) -> bool:
        if isinstance(other, (str, bytes)) or not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def find(self, ids: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """(rows, ids): every row whose id is one of ``ids``, ascending, and that row's id; one
        streamed pass (a binary search of each block in the sorted wanted ids)."""
        wanted = sorted({i.encode("utf-8") for i in ids})
        if not wanted:
            return np.zeros(0, dtype=np.int64), []
        wanted = np.array(wanted, dtype=bytes)
        lengths = np.char.str_len(wanted)
        rows, found = [], []
        for start, block in self.blocks():
            # longer ids cannot be in this block (and must not be truncated into a match)
            keys = wanted[lengths <= block.dtype.itemsize].astype(block.dtype)
            if not len(keys):
                continue
            pos = np.searchsorted(keys, block).clip(max=len(keys) - 1)
            hit = np.flatnonzero(keys[pos] == block)
            rows.append(hit + start)
            found += [b.decode("utf-8") for b in block[hit].tolist()]
        return (np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)), found


def ids_at(ids: Sequence[str], rows) -> list[str]:
    """The ids of row numbers ``rows`` (1-D) of a sequence of ids: for an :class:`IdColumn`,
    only those rows are decoded."""
    if isinstance(ids, IdColumn):
        return ids.take(np.asarray(rows, dtype=np.int64).reshape(-1)).tolist()
    return [ids[int(r)] for r in rows]


def find_rows(ids: Sequence[str], wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """Row numbers (ascending) of each id of ``wanted`` found in ``ids`` (a list or an
    :class:`IdColumn`), in one pass; ids not found are absent from the result."""
    wanted = set(wanted)
    if isinstance(ids, IdColumn):
        rows, found = ids.find(wanted)
        pairs = zip(found, rows.tolist())
    else:
        pairs = ((i, n) for n, i in enumerate(ids) if i in wanted)
    out: dict[str, list[int]] = {}
    for i, n in pairs:
        out.setdefault(i, []).append(n)
    return {i: np.array(r, dtype=np.int64) for i, r in out.items()}


@dataclass
class EmbeddingSet:
    """Rows of L2-normalised embeddings with their ids (``embeddings[i]`` belongs to ``ids[i]``).

    ``ids`` is a list of ``str``, or, for a set loaded memory-mapped, an :class:`IdColumn`."""

    embeddings: np.ndarray  # [N, E], float16 on disk, memory-mapped when loaded
    ids: Sequence[str]
    source: str = ""  # the folder it was loaded from, for error messages ("" = built in memory)

    def __post_init__(self):
        if len(self.ids) != len(self.embeddings):
            where = f"{self.source}: " if self.source else ""
            raise ValueError(f"{where}{len(self.ids)} ids for {len(self.embeddings)} embeddings")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def index_of(self) -> dict[str, int]:
        return {i: n for n, i in enumerate(self.ids)}


#: the keys of a manifest's shard entry that name files of the set (relative to its folder)
SHARD_FILE_KEYS = ("file", "ids", "id_array")


def shard_under(shard: dict, folder: str) -> dict:
    """A manifest shard entry whose files are given relative to ``folder`` (a sub-folder of the
    set that holds them, e.g. a part's), every file key included."""
    return {**shard, **{key: f"{folder}/{shard[key]}" for key in SHARD_FILE_KEYS if key in shard}}


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a complete embedding set (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported embedding-set format {manifest.get('format')}")
    return manifest


LOCK_FILE = ".writer.lock"


class CacheBusyError(RuntimeError):
    """Another process is writing the same cache folder."""


_HELD_LOCKS: dict[str, list] = {}  # folder -> [open lock file, holders in this process]


class FolderLock:
    """An exclusive lock on a folder for one writing process (``flock`` on
    ``<folder>/.writer.lock``, which also says which process holds it). The system releases it
    when the process ends, even by kill -9, so a crash never leaves a stale lock; another
    process that tries to write the folder fails at once with CacheBusyError naming the folder
    and the holder. Within one process the lock is shared (a restarted writer object resumes
    what an abandoned one began). ``flock`` may not work across the hosts of some network file
    systems."""

    def __init__(self, directory: str | os.PathLike, what: str = "cache"):
        import fcntl
        import socket
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = str(self.directory.resolve())
        self._released = False
        held = _HELD_LOCKS.get(self._key)
        if held is not None:
            held[1] += 1
            return
        lock_file = open(self.directory / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown process"
            lock_file.close()
            raise CacheBusyError(
                f"{self.directory} is being written by another job ({holder}); two writers on "
                f"one {what} would mix their files. Wait for that job to finish or stop it, then "
                "run again (a stopped job's partial files are resumed or replaced)") from None
        except OSError as err:  # a file system without flock: say so, go on unlocked
            logger.warning("%s: cannot lock it (%s); make sure no other job writes it",
                           self.directory, err)
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
        _HELD_LOCKS[self._key] = [lock_file, 1]

    def release(self, everyone: bool = False) -> None:
        """Give up this holder's share; the lock goes when no holder in this process is left
        (``everyone``: at once, e.g. when the folder is complete and abandoned writers of it
        in this process can have nothing left to write)."""
        if self._released:
            return
        self._released = True
        held = _HELD_LOCKS.get(self._key)
        if held is None:
            return
        held[1] = 0 if everyone else held[1] - 1
        if held[1] == 0:
            del _HELD_LOCKS[self._key]
            (self.directory / LOCK_FILE).unlink(missing_ok=True)  # still held: no one else
            held[0].close()  # closing the descriptor releases the lock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class EmbeddingSetWriter:
    """Writes an embedding set shard by shard; ``close()`` writes the manifest.

    Shards already complete in ``directory`` (listed in a partial manifest) are kept, so a
    restarted job can resume with ``completed_shards`` and skip the rows they hold.
    """

    def __init__(self, directory: str | os.PathLike, dim: int, dtype: str = "float16"):
        self.directory = Path(directory)
        self._lock = FolderLock(self.directory, "embedding set")  # held until close()
        self.dim, self.dtype = dim, dtype
        self._partial = self.directory / ".partial-manifest.json"
        self.shards: list[dict] = []
        if self._partial.exists():
            state = json.loads(self._partial.read_text())
            if state["dim"] == dim and state["dtype"] == dtype:
                self.shards = [s for s in state["shards"]
                               if all((self.directory / s[key]).exists()
                                      for key in SHARD_FILE_KEYS if key in s)]

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
        check_finite(embeddings, ids, f"shard {len(self.shards)} of {self.directory}")
        id_array = encode_ids(ids)
        n = len(self.shards)
        name = f"shard-{n:05d}"
        atomic_save_npy(self.directory / f"{name}.npy", embeddings.astype(self.dtype))
        atomic_write_text(self.directory / f"{name}.ids.txt", "".join(f"{i}\n" for i in ids))
        atomic_save_npy(self.directory / f"{name}.ids.npy", id_array)
        self.shards.append({"file": f"{name}.npy", "ids": f"{name}.ids.txt",
                            "id_array": f"{name}.ids.npy", "rows": len(ids)})
        atomic_write_json(self._partial, {"dim": self.dim, "dtype": self.dtype, "shards": self.shards})

    def close(self, meta: dict | None = None) -> None:
        atomic_write_json(self.directory / MANIFEST, {
            "format": FORMAT_VERSION, "dim": self.dim, "dtype": self.dtype,
            "rows": self.completed_rows, "shards": self.shards, "meta": meta or {},
        })
        if self._partial.exists():
            self._partial.unlink()
        self._lock.release(everyone=True)


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


def _shard_ids(directory: Path, shard: dict, mmap: bool, redo: str) -> Sequence[str]:
    """A shard's ids: its memory-mapped id array (an :class:`IdColumn`) when ``mmap`` and the
    set has one, else a list read from the text file; a count other than the shard's rows
    raises ValueError naming the file and ``redo``."""
    if mmap and "id_array" in shard:
        path = directory / shard["id_array"]
        try:
            ids = IdColumn([np.load(path, mmap_mode="r", allow_pickle=False)])
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{path} cannot be read (truncated or corrupt: {err}); {redo}") from err
    else:
        path = directory / shard["ids"]
        ids = path.read_text().splitlines()
    if len(ids) != shard["rows"]:
        raise ValueError(f"{path} lists {len(ids)} ids for the {shard['rows']} rows of "
                         f"{directory / shard['file']}; {redo}")
    return ids


def iter_shards(directory: str | os.PathLike, mmap: bool = True) -> Iterator[EmbeddingSet]:
    """Yield the shards of an embedding set one at a time (memory-mapped; the ids too when the
    set has id arrays, ``mmap=False``: ids as lists). A shard that is truncated, of another
    width or row count than its manifest says, or whose ids have another count, raises
    ValueError naming the file and the folder to delete."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    redo = f"delete {directory} and compute it again"
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        try:
            emb = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{path} cannot be read (truncated or corrupt: {err}); {redo}") from err
        if emb.ndim != 2 or emb.shape[1] != manifest["dim"] or emb.shape[0] != shard["rows"]:
            raise ValueError(f"{path} holds an array of shape {tuple(emb.shape)}; the manifest "
                             f"says {shard['rows']} rows of width {manifest['dim']}; {redo}")
        yield EmbeddingSet(emb, _shard_ids(directory, shard, mmap, redo), source=str(directory))


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
    are a :class:`ShardedRows` view (nothing is concatenated), and the ids are an
    :class:`IdColumn` over the shards' memory-mapped id arrays (a list for a set written before
    those existed). ``mmap=False`` reads it all, ids as a list."""
    shards = list(iter_shards(directory, mmap=mmap))
    manifest = _read_manifest(Path(directory))
    source = str(directory)
    if not shards:
        return EmbeddingSet(np.zeros((0, manifest["dim"]), dtype=np.float16), [], source)
    if all(isinstance(s.ids, IdColumn) for s in shards):
        ids = IdColumn([part for s in shards for part in s.ids.parts])
    else:
        ids = [i for s in shards for i in s.ids]
    if not mmap:
        return EmbeddingSet(np.concatenate([s.embeddings for s in shards]), ids, source)
    if len(shards) == 1:
        return EmbeddingSet(shards[0].embeddings, ids, source)
    return EmbeddingSet(ShardedRows([s.embeddings for s in shards]), ids, source)


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


# --------------------------------------------------------------------------------------------
# Uncompressed .npz files written and read without holding their big arrays in memory
#
# ``np.savez`` needs every array in memory and ``np.load`` reads a member whole. The local
# descriptors of ILIAS's shortlisted images are about 185 GB in float16, so these write an
# ``.npz`` (a zip of ``.npy`` members, as numpy writes it: ZIP_STORED, zip64) array by array,
# large arrays row block by row block, and read a stored member back as a memory map of its
# bytes inside the zip. The files remain ordinary ``.npz`` files that ``np.load`` reads.

#: bytes converted and written per block when an array is streamed into an .npz
NPZ_BLOCK_BYTES = 64 << 20
#: array data in a written .npz starts at a multiple of this many bytes in the file, so a memory
#: map of it is aligned for every dtype (numpy's own .npy headers use the same alignment)
NPZ_ALIGNMENT = 64

_LOCAL_FILE_HEADER = b"PK\x03\x04"
_LOCAL_FILE_HEADER_SIZE = 30


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], position: int) -> bytes:
    """A version 1.0 ``.npy`` header for a C-ordered array, padded with spaces (as the format
    allows) so that the array data after it starts at a multiple of :data:`NPZ_ALIGNMENT` in the
    file when the header itself starts at byte ``position``."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)})
    magic = np.lib.format.magic(1, 0)
    end = position + len(magic) + 2 + len(text) + 1  # magic, uint16 length, text, newline
    text += " " * (-end % NPZ_ALIGNMENT) + "\n"
    return magic + struct.pack("<H", len(text)) + text.encode("latin1")


class NpzWriter:
    """Writes an uncompressed ``.npz`` into an open, seekable binary file, one array at a time.

    :meth:`write` stores a whole array (converted and written in blocks of about
    :data:`NPZ_BLOCK_BYTES`, so a memory-mapped array is never read whole); :meth:`rows` stores
    an array of a declared shape from row blocks given one after another, so it never needs to
    exist in memory. Members are ``<name>.npy``, ZIP_STORED with zip64 extensions, as
    ``np.savez`` writes them; :meth:`close` (or leaving the ``with`` block) writes the zip's
    directory. Use :func:`atomic_write_npz` to write a file atomically.
    """

    def __init__(self, file: BinaryIO):
        self._file = file
        self._zip = zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED,
                                    allowZip64=True)
        self.names: list[str] = []

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def write(self, name: str, array, dtype=None) -> None:
        """Store ``array`` as ``name``, in ``dtype`` (default: its own), converted and written
        block by block. ``array`` is an ndarray, a memmap, or any array-like with ``shape``,
        ``dtype`` and slicing of its first axis (:class:`ShardedRows`); other values go
        through ``np.asarray``."""
        if not (hasattr(array, "shape") and hasattr(array, "dtype")):
            array = np.asarray(array)
        dtype = np.dtype(array.dtype if dtype is None else dtype)
        if len(array.shape) == 0:  # a scalar: no rows to stream
            with self._member(name, (), dtype) as member:
                member.write(np.asarray(array, dtype=dtype).reshape(1).view(np.uint8))
            return
        with self.rows(name, array.shape, dtype) as append:
            append(array)

    @contextmanager
    def rows(self, name: str, shape: Sequence[int], dtype
             ) -> Iterator[Callable[[np.ndarray], None]]:
        """Open array ``name`` of ``shape`` and ``dtype``; yields ``append``, which takes blocks
        of rows in order (array-likes as :meth:`write` takes; trailing dimensions
        ``shape[1:]``; converted to ``dtype``, and a large block is read in slices).
        Leaving the ``with`` block checks that exactly ``shape[0]`` rows were appended."""
        dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        if not shape:
            raise ValueError(f"array {name!r}: rows need at least one dimension")
        row_shape = shape[1:]
        row_bytes = max(1, dtype.itemsize * int(np.prod(row_shape, dtype=np.int64)))
        block_rows = max(1, NPZ_BLOCK_BYTES // row_bytes)
        written = 0

        with self._member(name, shape, dtype) as member:
            def append(block) -> None:
                nonlocal written
                if not (hasattr(block, "shape") and hasattr(block, "dtype")):
                    block = np.asarray(block)
                if tuple(block.shape[1:]) != row_shape or len(block.shape) != len(shape):
                    raise ValueError(f"array {name!r}: block of shape {tuple(block.shape)}, "
                                     f"expected rows of shape {row_shape}")
                if written + block.shape[0] > shape[0]:
                    raise ValueError(f"array {name!r}: more than the declared {shape[0]} rows")
                for start in range(0, block.shape[0], block_rows):
                    part = np.ascontiguousarray(block[start:start + block_rows], dtype=dtype)
                    member.write(part.reshape(-1).view(np.uint8))
                written += block.shape[0]

            yield append
            if written != shape[0]:
                raise ValueError(f"array {name!r}: {written} rows appended, {shape[0]} declared")

    @contextmanager
    def _member(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Iterator:
        """The open zip member ``<name>.npy``, its ``.npy`` header written; closed on exit."""
        if dtype.hasobject:
            raise ValueError(f"array {name!r}: object arrays are not stored (no pickles)")
        if any(s < 0 for s in shape):
            raise ValueError(f"array {name!r}: invalid shape {shape}")
        if name in self.names:
            raise ValueError(f"array {name!r} is already in this .npz")
        self.names.append(name)
        member = self._zip.open(f"{name}.npy", mode="w", force_zip64=True)
        try:
            member.write(_npy_header(dtype, shape, self._file.tell()))
            yield member
        finally:
            member.close()


def atomic_write_npz(path: str | os.PathLike, fill: Callable[[NpzWriter], None]) -> None:
    """Write an uncompressed ``.npz`` atomically: ``fill(writer)`` adds the arrays through an
    :class:`NpzWriter` on a temporary file beside ``path``, which replaces ``path`` only once it
    is complete (:func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f, NpzWriter(f) as npz:
            fill(npz)
    atomic_write(path, write)


class NpzFormatError(ValueError):
    """An ``.npz`` file that cannot be read: truncated, corrupt, or not a zip archive."""


def _not_complete(path, err: Exception) -> NpzFormatError:
    return NpzFormatError(f"{path} is not a complete .npz file (truncated or corrupt: {err}); "
                          "delete it and create it again")


def read_npz_arrays(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays ``names`` of an ``.npz`` read into memory (``np.load``, no pickles). A truncated
    or corrupt file raises :class:`NpzFormatError` and a missing array a KeyError, both naming
    the file."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, ValueError) as err:
        raise _not_complete(path, err) from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise NpzFormatError(f"{path} is a single .npy array, not an .npz archive")
    with npz:
        missing = [n for n in names if n not in npz.files]
        if missing:
            raise KeyError(f"{path} holds no array {missing[0]!r}; it has {sorted(npz.files)}")
        try:
            return {n: npz[n] for n in names}
        except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as err:
            raise _not_complete(path, err) from err


def memmap_npz_array(path: str | os.PathLike, name: str) -> np.ndarray | None:
    """A read-only memory map of array ``name`` of an ``.npz`` file, or None when that member is
    compressed (``np.savez_compressed``) and its bytes are not in the file as they are.

    The member's data offset is the zip local header's (its size plus the name and extra
    lengths it records) followed by the ``.npy`` header. Works for every uncompressed ``.npz``,
    ``np.savez``'s included (their data may be unaligned, which numpy handles). An empty array
    comes back as a read-only empty array (nothing can be mapped). Errors name the file.
    """
    path = Path(path)
    member = f"{name}.npy"
    with open(path, "rb") as f:
        try:
            archive = zipfile.ZipFile(f)
        except zipfile.BadZipFile as err:
            raise _not_complete(path, err) from err
        with archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise KeyError(f"{path} holds no array {name!r}; it has "
                               f"{sorted(n.removesuffix('.npy') for n in archive.namelist())}"
                               ) from None
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # 0x1: encrypted
            return None
        f.seek(info.header_offset)
        local = f.read(_LOCAL_FILE_HEADER_SIZE)
        if len(local) < _LOCAL_FILE_HEADER_SIZE or local[:4] != _LOCAL_FILE_HEADER:
            raise NpzFormatError(f"{path}: no zip local header for {member} at byte "
                                 f"{info.header_offset}; the file is corrupt")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        start = info.header_offset + _LOCAL_FILE_HEADER_SIZE + name_length + extra_length
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # version 3 (utf-8 field names): let np.load read it
                return None
        except ValueError as err:
            raise NpzFormatError(f"{path}: {member} has no valid .npy header ({err})") from err
        offset = f.tell()
    if dtype.hasobject:
        raise NpzFormatError(f"{path}: {member} holds Python objects, which are not read")
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if offset - start + nbytes != info.file_size or offset + nbytes > path.stat().st_size:
        raise NpzFormatError(f"{path}: {member} declares {nbytes} bytes of data that its zip "
                             "entry does not hold; the file is truncated or corrupt")
    order = "F" if fortran else "C"
    if nbytes == 0:
        empty = np.empty(shape, dtype=dtype, order=order)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def load_npz_array(path: str | os.PathLike, name: str, mmap: bool = True) -> np.ndarray:
    """Array ``name`` of an ``.npz``: memory-mapped (:func:`memmap_npz_array`) when ``mmap`` and
    the member is stored uncompressed, otherwise read into memory (a compressed member is
    logged, since it costs the whole array in memory)."""
    if mmap:
        mapped = memmap_npz_array(path, name)
        if mapped is not None:
            return mapped
        logger.info("%s: array %r is compressed and cannot be memory-mapped; reading it into "
                    "memory", path, name)
    return read_npz_arrays(path, [name])[name]
