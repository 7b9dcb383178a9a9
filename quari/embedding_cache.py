"""The embedding cache: images and text queries through a frozen backbone into an embedding set.

`embed_images` and `embed_texts` turn a list of (id, source) items into an embedding set
(`quari.store`): L2-normalised fp16 shards, ids in item order, manifest written last.

Why the bookkeeping:
- Real collections hold corrupt or missing files. Such an image is not fatal: it is listed with
  its id and the reason in ``skipped.tsv`` and the manifest's meta counts requested, embedded and
  skipped items, so nothing leaves the accounting silently.
- Embedding a benchmark gallery takes hours. Shard k always covers items
  ``[k * shard_rows, (k + 1) * shard_rows)`` of the item order (fewer rows when some are skipped),
  so a rerun on the same folder resumes after the last complete shard, recomputes nothing already
  written, and ends with files identical to those of an uninterrupted run.
- ILIAS images keep their aspect ratio, so a batch holds tensors of different sizes. Padding them
  to a common size would change their embeddings (the encoder attends to the padding), so each
  batch is encoded in groups of equal size: an image's embedding does not depend on its batch.

Decoding and transforms run in DataLoader worker processes; the encoder owns the device and uses
mixed precision on CUDA (`quari.backbones.Encoder`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from quari.backbones import Encoder
from quari.store import (MANIFEST, EmbeddingSet, EmbeddingSetWriter, atomic_write_json,
                         atomic_write_text, embedding_set_meta, load_embedding_set)

logger = logging.getLogger(__name__)

SKIPPED = "skipped.tsv"
STATE = ".embed-state.json"  # resume state: skipped items of the shards written so far
DEFAULT_SHARD_ROWS = 100_000

# A path, encoded image bytes, or a zero-argument callable returning any of these or a PIL image.
ImageSource = Union[str, os.PathLike, bytes, Callable[[], Any]]


@dataclass
class _Batch:
    """Embeddings of consecutive items of one shard (positions in the item list)."""

    positions: list[int]            # items embedded, in item order
    embeddings: np.ndarray          # [len(positions), E] float32, unit norm
    skipped: list[tuple[int, str]]  # (position, reason) of items that could not be embedded


def open_image(source: ImageSource):
    """Decode `source` fully into an RGB PIL image (raises on corrupt or unreadable data)."""
    from PIL import Image
    if callable(source):
        source = source()
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(source)))
    else:
        image = Image.open(source)
    image.load()  # PIL decodes lazily; force it so truncated files fail here, not later
    return image.convert("RGB")


class ImageDataset(Dataset):
    """Item n -> (n, ``transform(image)`` or None, failure reason); runs inside the workers (the
    embedding cache's and the local-descriptor extraction's)."""

    def __init__(self, sources: Sequence[ImageSource], transform: Callable):
        self.sources, self.transform = sources, transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, n: int) -> tuple[int, Any, str]:
        try:
            return n, self.transform(open_image(self.sources[n])), ""
        except Exception as err:  # any failure to read one image is recorded, not fatal
            return n, None, f"{type(err).__name__}: {err}"


def shard_batches(start: int, stop: int, shard_rows: int, batch_size: int) -> list[list[int]]:
    """Item positions [start, stop) in batches that never cross a shard boundary, so the batches
    of a shard are the same whether or not the run resumed."""
    batches = []
    for shard_start in range(start, stop, shard_rows):
        shard_stop = min(shard_start + shard_rows, stop)
        batches += [list(range(b, min(b + batch_size, shard_stop)))
                    for b in range(shard_start, shard_stop, batch_size)]
    return batches


def _encode_by_shape(encoder: Encoder, tensors: list[torch.Tensor]) -> np.ndarray:
    """Encode tensors of possibly different sizes, one stacked call per size, in input order."""
    out = np.empty((len(tensors), encoder.embed_dim), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(tensors):
        groups.setdefault(tuple(x.shape), []).append(i)
    for members in groups.values():
        emb = encoder.encode_images(torch.stack([tensors[i] for i in members]))
        out[members] = emb.float().cpu().numpy()
    return out


def ids_digest(ids: Sequence[str], settings: bytes = b"") -> str:
    """sha256 of ``settings`` followed by every id and a newline: identifies the job a folder
    holds (the item list and what changes its rows), so a rerun never mixes chunks of two jobs."""
    digest = hashlib.sha256(settings)
    for i in ids:
        digest.update(i.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _fingerprint(kind: str, ids: Sequence[str], shard_rows: int, dim: int) -> str:
    return ids_digest(ids, f"{kind}\n{shard_rows}\n{dim}\n".encode())


def _clean_reason(reason: str) -> str:
    return re.sub(r"[\t\r\n]+", " ", reason).strip() or "unknown error"


def check_ids(ids: Sequence[str]) -> None:
    """Item ids name rows and lines of a skip list: each unique, without tabs or newlines."""
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    if any(("\t" in i) or ("\n" in i) or ("\r" in i) for i in ids):
        raise ValueError("item ids must not contain tabs or newlines")


def _write_cache(kind: str, encoder: Encoder, ids: Sequence[str], out_dir: str | os.PathLike,
                 produce: Callable[[int], Iterator[_Batch]], shard_rows: int,
                 meta: dict | None, on_shard: Callable[[int], None] | None,
                 progress: bool) -> EmbeddingSet:
    """Shared driver: resume, collect batches into shards, write skip list and manifest."""
    if shard_rows < 1:
        raise ValueError("shard_rows must be positive")
    check_ids(ids)
    out_dir = Path(out_dir)
    dim = encoder.embed_dim
    fingerprint = _fingerprint(kind, ids, shard_rows, dim)
    if (out_dir / MANIFEST).exists():
        if embedding_set_meta(out_dir).get("fingerprint") != fingerprint:
            raise FileExistsError(f"{out_dir} holds a complete embedding set of other items; "
                                  "remove it or choose another folder")
        logger.info("%s is complete; nothing to embed", out_dir)
        return load_embedding_set(out_dir)

    writer = EmbeddingSetWriter(out_dir, dim)
    done = len(writer.shards)
    skipped: list[list] = []  # [shard, id, reason] for every skipped item of shards 0..done-1
    state_path = out_dir / STATE
    if done:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"{out_dir} holds partial shards of another job; remove it first")
        skipped = [s for s in state["skipped"] if s[0] < done]
        logger.info("resuming %s after %d complete shards", out_dir, done)

    total = len(ids)
    start = min(done * shard_rows, total)
    shard_positions: list[int] = []
    shard_embeddings: list[np.ndarray] = []
    shard_end = min(start + shard_rows, total)
    seen = start
    bar = tqdm(total=total, initial=start, unit="img" if kind == "images" else "text",
               desc=f"embed {kind}", disable=not progress, dynamic_ncols=True)
    try:
        for batch in produce(start):
            shard_positions += batch.positions
            shard_embeddings.append(batch.embeddings)
            skipped += [[done, ids[n], _clean_reason(r)] for n, r in batch.skipped]
            for n, reason in batch.skipped:
                logger.warning("skipping %s: %s", ids[n], reason)
            seen += len(batch.positions) + len(batch.skipped)
            bar.update(len(batch.positions) + len(batch.skipped))
            if seen == shard_end:
                # the skip list goes first: a crash before add_shard leaves an extra entry for a
                # shard that is not complete, which the rerun drops (shard index >= done)
                atomic_write_json(state_path, {"fingerprint": fingerprint, "skipped": skipped})
                rows = np.concatenate(shard_embeddings) if shard_embeddings else \
                    np.zeros((0, dim), np.float32)
                writer.add_shard(rows.reshape(-1, dim), [ids[n] for n in shard_positions])
                if on_shard is not None:
                    on_shard(done)
                done += 1
                shard_positions, shard_embeddings = [], []
                shard_end = min(seen + shard_rows, total)
    finally:
        bar.close()
    if seen != total:
        raise RuntimeError(f"embedded {seen} of {total} items")  # a producer bug, never data

    lines = "".join(f"{i}\t{r}\n" for _, i, r in skipped)
    atomic_write_text(out_dir / SKIPPED, "id\treason\n" + lines)
    embedded = writer.completed_rows
    writer.close({**(meta or {}), "kind": kind, "backbone": encoder.info.name,
                  "requested": total, "embedded": embedded, "skipped": len(skipped),
                  "shard_rows": shard_rows, "fingerprint": fingerprint})
    if state_path.exists():
        state_path.unlink()
    if skipped:
        logger.warning("%s: %d of %d items skipped, listed in %s", out_dir, len(skipped), total,
                       out_dir / SKIPPED)
    return load_embedding_set(out_dir)


def embed_images(encoder: Encoder, items: Sequence[tuple[str, ImageSource]],
                 out_dir: str | os.PathLike, transform: Callable, batch_size: int = 64,
                 shard_rows: int = DEFAULT_SHARD_ROWS, num_workers: int = 2,
                 meta: dict | None = None, on_shard: Callable[[int], None] | None = None,
                 progress: bool = True) -> EmbeddingSet:
    """Embed (id, image source) items into the embedding set at `out_dir` and return it.

    A source is a path, encoded image bytes, or a zero-argument callable returning a path, bytes
    or a PIL image (picklable when `num_workers` > 0). Images are decoded to RGB and passed through
    `transform` (e.g. `ilias_transform(info)`) in `num_workers` worker processes (0: in this
    process). Unreadable images are listed in ``skipped.tsv``; the manifest meta holds the counts
    (requested, embedded, skipped), `meta`, and a fingerprint of the ids and `shard_rows`.
    A rerun on the same folder resumes after the last complete shard; a complete folder of the
    same items is returned as is. `on_shard(k)` is called after shard k is on disk.
    """
    ids = [str(i) for i, _ in items]
    sources = [s for _, s in items]
    dataset = ImageDataset(sources, transform)

    def produce(start: int) -> Iterator[_Batch]:
        batches = shard_batches(start, len(ids), shard_rows, batch_size)
        if not batches:
            return
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                            collate_fn=list)
        for samples in loader:
            good = [(n, x) for n, x, _ in samples if x is not None]
            embeddings = (_encode_by_shape(encoder, [x for _, x in good]) if good
                          else np.zeros((0, encoder.embed_dim), np.float32))
            yield _Batch([n for n, _ in good], embeddings,
                         [(n, reason) for n, x, reason in samples if x is None])

    return _write_cache("images", encoder, ids, out_dir, produce, shard_rows, meta, on_shard,
                        progress)


def embed_texts(encoder: Encoder, items: Sequence[tuple[str, str]], out_dir: str | os.PathLike,
                batch_size: int = 256, shard_rows: int = DEFAULT_SHARD_ROWS,
                meta: dict | None = None, on_shard: Callable[[int], None] | None = None,
                progress: bool = True) -> EmbeddingSet:
    """Embed (id, text) queries, raw text without a prompt template, into the embedding set at
    `out_dir`; same files, counts and resume behaviour as `embed_images` (nothing is skipped)."""
    ids = [str(i) for i, _ in items]
    texts = [t for _, t in items]

    def produce(start: int) -> Iterator[_Batch]:
        for batch in shard_batches(start, len(ids), shard_rows, batch_size):
            emb = encoder.encode_texts([texts[n] for n in batch])
            yield _Batch(batch, emb.float().cpu().numpy(), [])

    return _write_cache("texts", encoder, ids, out_dir, produce, shard_rows, meta, on_shard,
                        progress)


def read_items_tsv(path: str | os.PathLike, root: str | os.PathLike | None = None,
                   paths: bool = True) -> list[tuple[str, str]]:
    """(id, value) pairs of a two-column TSV (no header). With `paths`, relative values are
    resolved against `root` (default: the TSV's folder)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'id<TAB>value'")
        item_id, value = parts
        items.append((item_id, str(base / value) if paths else value))
    return items


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: embed an image list and/or a text-query list with a registered backbone."""
    from quari.backbones import get_backbone, ilias_transform, load_backbone, model_transform
    from quari.devices import resolve_device
    parser = argparse.ArgumentParser(prog="python -m quari.embedding_cache", description=main.__doc__)
    parser.add_argument("--backbone", required=True, help="registry name (quari.backbones)")
    parser.add_argument("--model-path", help="local model directory or checkpoint")
    parser.add_argument("--images", help="TSV: id<TAB>image path (relative to --root)")
    parser.add_argument("--root", help="folder relative image paths start from (default: TSV's)")
    parser.add_argument("--texts", help="TSV: id<TAB>query text")
    parser.add_argument("--out", required=True, help="output folder (images/ and texts/ inside "
                        "when both lists are given)")
    parser.add_argument("--protocol", choices=("ilias", "model"), default="ilias",
                        help="ilias: long side to the test resolution, padded; model: own eval")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    args = parser.parse_args(argv)
    if not (args.images or args.texts):
        parser.error("give --images and/or --texts")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = get_backbone(args.backbone)
    encoder = load_backbone(info, path=args.model_path, device=resolve_device(args.device))
    out = Path(args.out)
    both = bool(args.images and args.texts)
    meta = {"protocol": args.protocol}
    if args.images:
        transform = ilias_transform(info) if args.protocol == "ilias" else model_transform(info)
        embed_images(encoder, read_items_tsv(args.images, args.root),
                     out / "images" if both else out, transform, batch_size=args.batch_size,
                     shard_rows=args.shard_rows, num_workers=args.workers, meta=meta)
    if args.texts:
        embed_texts(encoder, read_items_tsv(args.texts, paths=False),
                    out / "texts" if both else out, batch_size=args.batch_size,
                    shard_rows=args.shard_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
