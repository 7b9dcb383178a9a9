"""Webdataset tar shards, read by member offset so any sample can be decoded on its own.

A webdataset shard is a plain tar whose members are grouped into samples by *key*: the member
path up to the first dot of its file name (``bold_bimp_000/pos/P000_07.jpg`` and
``bold_bimp_000/pos/P000_07.bbox.json`` form sample ``bold_bimp_000/pos/P000_07`` with fields
``jpg`` and ``bbox.json``). Indexing a shard once gives, for every sample, the byte offset and size
of each field, so an image is read later by one seek in a worker process, without re-scanning the
tar or keeping its bytes in memory.

Why not the ``webdataset`` library: it streams a shard's samples in order, which suits training
but not this harness's needs: random access to any sample from a DataLoader worker (embedding a
query set, one shard's part, a shortlist's images) by offset, one index per shard reused by every
job, and a truncated download refused as a whole rather than read up to where it was cut (its
stream ends quietly there). The standard library's :mod:`tarfile` gives each member's data offset,
and nothing here extracts a member to disk, so member names never become paths.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageRef:
    """An image stored at ``offset`` (``size`` bytes) inside ``path``; a whole file when size < 0.

    Calling it returns the bytes, so it is an image source for
    :func:`quari.embedding_cache.embed_images`, and it pickles into DataLoader workers as three fields.
    """

    path: str    # file holding the image (a tar shard, or the image file itself)
    offset: int = 0   # first byte of the image inside `path`
    size: int = -1    # number of bytes; -1 = the whole file

    def __call__(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: {len(data)} of {self.size} bytes at offset {self.offset}")
        return data


def split_key(member_name: str) -> tuple[str, str]:
    """(sample key, field) of a tar member name, by the webdataset rule (first dot of the base name)."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, field = base.partition(".")
    if not dot:
        return member_name, ""
    return (f"{directory}/{stem}" if directory else stem), field.lower()


def read_tar_samples(path: str | os.PathLike) -> dict[str, dict[str, ImageRef]]:
    """Index a webdataset shard: ``{key: {field: ImageRef}}`` in tar order.

    Raises ``tarfile.ReadError`` (naming the file) on a truncated or corrupt shard, so a damaged
    download is never embedded partially.
    """
    path = Path(path)
    samples: dict[str, dict[str, ImageRef]] = {}
    end = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, field = split_key(member.name)
                samples.setdefault(key, {})[field] = ImageRef(str(path), member.offset_data,
                                                              member.size)
                end = max(end, member.offset_data + member.size)
    except (tarfile.TarError, EOFError) as err:
        raise tarfile.ReadError(f"{path}: unreadable tar shard ({err})") from err
    # tarfile stops quietly where a cut file ends: require the last member's data, padded to a
    # 512-byte block, and the two zero blocks that close every complete archive
    needed = -(-end // 512) * 512 + 1024
    if path.stat().st_size < needed:
        raise tarfile.ReadError(f"{path}: truncated tar shard ({path.stat().st_size} bytes, "
                                f"a complete archive needs at least {needed})")
    return samples


def read_member_text(ref: ImageRef) -> str:
    """A text field (caption, description) of a sample, decoded as UTF-8 and stripped."""
    return ref().decode("utf-8").strip()
