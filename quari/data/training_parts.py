"""Training sets embedded in parts (CC12M's ~10M images, UnED's 1M) and assembled as a view.

A training set merges collections, each split into train and valid by a hash of the label
(:func:`quari.data.collections.training_split`). Here every collection is embedded as one or more
*parts*, each by its own job: CC12M one group of its webdataset tars per part, UnED or a table an
equal slice of its list, a small collection (COCO) one part. A part holds, for each side
(``train``, ``valid``), what :func:`quari.data.embedding_jobs.embed_training_collection` writes for
that side of its slice, with the part's provenance (:mod:`quari.data.parts`: its images go
through :func:`~quari.data.parts.embed_part`, so a killed job resumes its own part from its last
complete shard) and the label of every embedded image by name.

:func:`assemble_training_set` verifies the parts (rows against ids and counts, per side; ids
distinct across parts; one model and preprocessing) and writes ``train/`` and ``valid/``: images
and captions as manifests over the parts' shards (:func:`~quari.data.parts.assemble_parts`,
nothing copied), labels coded across all parts in the order they first appear, caption rows
moved by their part's offset, counts summed. The hold-out is decided per label and the parts are
consecutive slices in each collection's order, so the assembled set has the rows, ids, labels and
captions, in the same order, that one job embedding the merged collections writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quari.data import collections
from quari.data.collections import PairList
from quari.data.embedding_jobs import (LABEL_NAMES, embed_training_collection, partial_dir,
                                       publish)
from quari.data.parts import PartError, assemble_parts, ids_digest, part_provenance, verify_part
from quari.store import atomic_save_npy, atomic_write_json, load_training_collection

logger = logging.getLogger(__name__)

SIDES = ("train", "valid")


def slice_pairs(pairs: PairList, start: int, stop: int) -> PairList:
    """Images ``[start, stop)`` of ``pairs`` with their labels and captions (rows renumbered)."""
    return PairList(images=pairs.images[start:stop], labels=pairs.labels[start:stop],
                    captions=[(c, t, r - start) for c, t, r in pairs.captions
                              if start <= r < stop])


def collection_part(name: str, files: dict, cfg: dict, part: int, parts: int) -> PairList:
    """The pairs of part ``part`` of ``parts`` of collection ``name``.

    A webdataset in several parts: ``files`` is its group's manifest, the pairs of the group's
    tars (``max_images`` cannot apply across groups: use ``max_shards``). Any other collection:
    an equal slice (:func:`quari.data.parts.even_slices`) of its whole list, whose captions must
    follow their images' order so that the parts' captions, concatenated, keep the order of the
    whole.
    """
    from quari.data.parts import even_slices
    if parts == 1:
        return collections.read_collection(name, files, cfg)
    if files["format"] == "webdataset":
        if cfg.get("max_images") is not None:
            raise ValueError(f"real.collections.{name}: max_images applies to the whole list and "
                             f"cannot be cut into {parts} groups of tars; limit it with max_shards "
                             f"or embed it as one part (real.fan_out.collection_jobs.{name}: 1)")
        return collections.webdataset_pairs(files["tars"], None, name=name)
    pairs = collections.read_collection(name, files, cfg)
    rows = [r for _, _, r in pairs.captions]
    if rows != sorted(rows):
        raise ValueError(f"collection {name}: captions are not in the order of their images, so "
                         f"it cannot be cut into parts; embed it as one part "
                         f"(real.fan_out.collection_jobs.{name}: 1)")
    start, stop = even_slices(len(pairs.images), parts)[part]
    return slice_pairs(pairs, start, stop)


def embed_training_part(encoder, pairs: PairList, valid_fraction: float,
                        out_dir: str | os.PathLike, transform, protocol: str,
                        sources: Sequence[dict], settings: dict, **options) -> Path:
    """Embed one part's ``pairs`` into ``out_dir/train`` and ``out_dir/valid`` (held out by
    :func:`quari.data.collections.split_valid`), through the part's partial folder; each side
    records its provenance (weights, preprocessing, ``sources``, its ids, ``settings``)."""
    out_dir, work = Path(out_dir), partial_dir(out_dir)
    base = part_provenance(encoder, protocol, sources, [], settings)
    sides = collections.split_valid(pairs, valid_fraction)
    for side, side_pairs in zip(SIDES, sides):
        ids = [i for i, _ in side_pairs.images]
        provenance = {**base, "ids": ids_digest(ids), "items": len(ids),
                      "settings": {**base["settings"], "side": side}}
        logger.info("%s: %d images, %d captions", side, len(ids), len(side_pairs.captions))
        embed_training_collection(encoder, side_pairs, work / side, transform, side,
                                  provenance=provenance, meta={"protocol": protocol}, **options)
    publish(work, out_dir)
    return out_dir


def _verify_side(side_dir: Path) -> dict:
    """The collection meta of one side of a part, after checking its images, captions, label
    names and caption rows against each other and its counts."""
    if not (side_dir / "collection.json").is_file():
        raise PartError(f"{side_dir}: not a complete part (no collection.json); rerun its job")
    meta = json.loads((side_dir / "collection.json").read_text())["meta"]
    images, captions = verify_part(side_dir / "images"), verify_part(side_dir / "captions")
    names = json.loads((side_dir / LABEL_NAMES).read_text())
    rows = np.load(side_dir / "caption_image.npy")
    if not (len(names) == images["rows"] == meta["images_embedded"]
            and len(rows) == captions["rows"] == meta["captions"]
            and images["meta"]["requested"] == meta["images_requested"]):
        raise PartError(f"{side_dir}: {images['rows']} images, {len(names)} labels, "
                        f"{captions['rows']} captions, {len(rows)} caption rows do not match "
                        f"its counts {meta}")
    if len(rows) and (rows.min() < 0 or rows.max() >= images["rows"]):
        raise PartError(f"{side_dir}: captions point outside its {images['rows']} images")
    return meta


def assemble_training_set(part_dirs: Sequence[str | os.PathLike],
                          out_dirs: dict[str, str | os.PathLike], name: str) -> None:
    """Write each side of ``out_dirs`` (``train``, ``valid``) as one training collection over the
    verified ``part_dirs`` (in row order), named ``<name>-<side>``; no rows are copied."""
    for side in SIDES:
        _assemble_side([Path(p) / side for p in part_dirs], Path(out_dirs[side]), f"{name}-{side}")


def _assemble_side(side_dirs: list[Path], out_dir: Path, name: str) -> None:
    metas = [_verify_side(d) for d in side_dirs]
    protocols = {d.parent.name: m.get("protocol") for d, m in zip(side_dirs, metas)}
    if len(set(protocols.values())) > 1 or len({m["backbone"] for m in metas}) > 1:
        raise PartError(f"{name}: parts of other backbones or image protocols ({protocols}); "
                        "embed collections of different protocols as separate training sets")
    work = partial_dir(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    # the views first: they check ids are distinct and all parts come from the same weights
    assemble_parts([d / "images" for d in side_dirs], work / "images",
                   meta={"protocol": metas[0].get("protocol")})
    assemble_parts([d / "captions" for d in side_dirs], work / "captions")
    codes: dict[str, int] = {}
    labels, caption_image, offset = [], [], 0
    for d, meta in zip(side_dirs, metas):
        names = json.loads((d / LABEL_NAMES).read_text())
        labels += [-1 if n is None else codes.setdefault(n, len(codes)) for n in names]
        caption_image.append(np.load(d / "caption_image.npy") + offset)
        offset += meta["images_embedded"]
    atomic_save_npy(work / "image_labels.npy", np.array(labels, dtype=np.int64))
    atomic_save_npy(work / "caption_image.npy",
                    np.concatenate(caption_image) if caption_image else np.zeros(0, np.int64))
    counts = {key: sum(m[key] for m in metas) for key in
              ("images_requested", "images_embedded", "captions", "captions_of_skipped_images")}
    atomic_write_json(work / "collection.json", {"name": name, "meta": {
        **counts, "labels": len(codes), "backbone": metas[0]["backbone"],
        "protocol": metas[0].get("protocol")}})
    load_training_collection(work)  # it opens (rows, labels, captions agree) before publishing
    publish(work, out_dir)
    logger.info("%s: %d images, %d captions, %d labels over %d parts", name,
                counts["images_embedded"], counts["captions"], len(codes), len(side_dirs))
