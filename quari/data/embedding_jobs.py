"""Embedding jobs of the real-data workflow: whole sets, many-part galleries, training collections.

A workflow engine deletes the declared output of a failed job, which would throw away the
resumable shards of :mod:`quari.embedding_cache`. So every job here works in a hidden sibling folder
``.<name>.partial`` and renames it to ``<name>`` only when complete: a killed job resumes from its
last complete shard, and ``<name>`` never exists half-written.

Galleries of many source shards (100M ILIAS distractors in 1,000 tars) are embedded one part per
group of shards, each by its own job, and assembled as a view over the parts: see
:mod:`quari.data.parts`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quari.backbones import Encoder
from quari.data.collections import PairList
from quari.embedding_cache import embed_images, embed_texts
from quari.store import (atomic_save_npy, atomic_write_json, embedding_set_meta,
                         load_embedding_set)

logger = logging.getLogger(__name__)


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """The hidden work folder a job fills before it is renamed to ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.partial")


def publish(work: Path, out_dir: Path) -> None:
    """Move a complete work folder to its final name (replacing an empty or stale folder there)."""
    if out_dir.exists():  # an empty folder left by the workflow engine
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)


def embed_image_set(encoder: Encoder, items, out_dir: str | os.PathLike, transform: Callable,
                    **options) -> Path:
    """:func:`quari.embedding_cache.embed_images` into ``out_dir`` through its partial folder."""
    out_dir, work = Path(out_dir), partial_dir(out_dir)
    embed_images(encoder, items, work, transform, **options)
    publish(work, out_dir)
    return out_dir


def embed_text_set(encoder: Encoder, items, out_dir: str | os.PathLike, **options) -> Path:
    """:func:`quari.embedding_cache.embed_texts` into ``out_dir`` through its partial folder."""
    out_dir, work = Path(out_dir), partial_dir(out_dir)
    embed_texts(encoder, items, work, **options)
    publish(work, out_dir)
    return out_dir


#: a training collection's label of every embedded image, by name (null: unknown), row by row:
#: what the assembly of a training set from parts codes across parts (quari.data.training_parts)
LABEL_NAMES = "image_label_names.json"


def embed_training_collection(encoder: Encoder, pairs: PairList, out_dir: str | os.PathLike,
                              transform: Callable, name: str, provenance: dict | None = None,
                              **options) -> Path:
    """Embed a :class:`PairList` into a training-collection folder (``quari.store`` layout).

    Images that cannot be read are listed in ``images/skipped.tsv`` and their captions are left
    out (counted in ``collection.json``); labels become integers (one per distinct label, -1 for
    unknown) in the order they first appear, and their names are kept in ``LABEL_NAMES``.

    With ``provenance`` (a part of a training set, :mod:`quari.data.training_parts`) the images
    go through :func:`quari.data.parts.embed_part` (a partial folder of other weights, inputs or
    settings is started over, never resumed), the captions' and the collection's meta record
    it, and a complete folder of the same provenance is kept as is.
    """
    from quari.data.parts import embed_part
    out_dir, work = Path(out_dir), partial_dir(out_dir)
    if provenance is not None and (out_dir / "collection.json").is_file():
        done = json.loads((out_dir / "collection.json").read_text())["meta"].get("provenance")
        if done != provenance:
            raise FileExistsError(f"{out_dir} is a complete training collection of another "
                                  "model, input or settings; remove it to embed it again")
        return out_dir
    text_options = {k: v for k, v in options.items() if k in ("shard_rows", "progress")}
    if provenance is None:
        images = embed_images(encoder, pairs.images, work / "images", transform, **options)
    else:
        meta = {**options.pop("meta", {})}
        images = load_embedding_set(embed_part(encoder, pairs.images, work / "images", transform,
                                               provenance, meta=meta, **options), mmap=False)
    row_of = images.index_of()
    kept = [(cid, text, row_of[pairs.images[row][0]]) for cid, text, row in pairs.captions
            if pairs.images[row][0] in row_of]
    dropped = len(pairs.captions) - len(kept)
    if dropped:
        logger.warning("%s: %d captions of unreadable images left out", name, dropped)
    embed_texts(encoder, [(cid, text) for cid, text, _ in kept], work / "captions",
                meta=None if provenance is None else {"provenance": provenance}, **text_options)
    label_of = dict(zip((i for i, _ in pairs.images), pairs.labels))
    codes: dict[str, int] = {}
    labels = np.array([-1 if label_of[i] is None else codes.setdefault(label_of[i], len(codes))
                       for i in images.ids], dtype=np.int64)
    atomic_save_npy(work / "image_labels.npy", labels)
    atomic_write_json(work / LABEL_NAMES, [label_of[i] for i in images.ids])
    atomic_save_npy(work / "caption_image.npy", np.array([r for _, _, r in kept], dtype=np.int64))
    atomic_write_json(work / "collection.json", {"name": name, "meta": {
        "images_requested": len(pairs.images), "images_embedded": len(images),
        "captions": len(kept), "captions_of_skipped_images": dropped,
        "labels": len(codes), "backbone": encoder.info.name,
        **({} if provenance is None else {"provenance": provenance}),
        **{k: v for k, v in embedding_set_meta(work / "images").items() if k == "protocol"}}})
    publish(work, out_dir)
    return out_dir


def configured_backbone(name: str, models: dict | None = None):
    """The registry entry of backbone ``name`` and the local path to load it from.

    ``models[name]`` (the ``real.models`` configuration) may give a local ``path`` (a
    ``save_pretrained`` folder or open_clip checkpoint, loaded through the same code as the hub
    id), and for a backbone outside the registry ``like`` (a registry name it copies) with
    overrides of :class:`quari.backbones.BackboneInfo` fields.
    """
    import dataclasses

    from quari.backbones import get_backbone
    entry = dict((models or {}).get(name, {}))
    path = entry.pop("path", None)
    like = entry.pop("like", None)
    info = get_backbone(like or name)
    fields = {f.name for f in dataclasses.fields(info)}
    unknown = sorted(set(entry) - fields)
    if unknown:
        raise ValueError(f"real.models.{name}: unknown field(s) {unknown}; allowed: "
                         f"path, like, {', '.join(sorted(fields - {'name'}))}")
    for key in ("mean", "std"):
        if key in entry:
            entry[key] = tuple(entry[key])
    return dataclasses.replace(info, name=name, **entry), path
