"""Training collections: image-caption (and image-class) pairs from the official formats.

Each reader returns a :class:`PairList` (images with an optional class label, captions pointing at
their image), size-limited by ``max_images`` (the first images in a deterministic order):

- ``coco``: MS-COCO ``captions_train2017.json`` (``images`` with ``id``/``file_name``,
  ``annotations`` with ``image_id``/``caption``) and the image folder; each image is its own
  instance.
- ``cc12m``: webdataset shards with ``jpg`` and ``txt`` members (e.g. ``pixparse/cc12m-wds``);
  one caption per image, each image its own instance.
- ``table`` (BioTrove and any image-caption list): a CSV or parquet file with an image path
  column, a caption column and optionally a class column (BioTrove: the species), paths relative
  to an image root. BioTrove's public release is metadata with image URLs; fetch the images of
  the chosen subset with its own tooling and list them in such a table.
- ``uned``: the UnED 1M list of the ILIAS repository (``misc/uned_paths_1M.txt``; lines
  ``<path>,<class>,<domain>``); the label is the (class, domain) pair, as ILIAS's linear
  adaptation trains on; there are no captions.

:func:`merge` concatenates collections (ids prefixed by the collection name so they stay unique)
and :func:`split_valid` holds out a deterministic fraction of images (with their captions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quari.data.tars import read_member_text, read_tar_samples
from quari.embedding_cache import ImageSource
from quari.paths import path_inside

logger = logging.getLogger(__name__)


@dataclass
class PairList:
    """Images (with class labels, None = unknown) and captions (text, index of their image)."""

    images: list[tuple[str, ImageSource]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    captions: list[tuple[str, str, int]] = field(default_factory=list)

    def __post_init__(self):
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")
        bad = [c for c in self.captions if not 0 <= c[2] < len(self.images)]
        if bad:
            raise ValueError(f"captions point outside the images, e.g. {bad[:2]}")


def coco_pairs(captions_json: str | os.PathLike, image_dir: str | os.PathLike,
               max_images: int | None = None) -> PairList:
    """MS-COCO captions: images sorted by id, all captions of each kept image."""
    data = json.loads(Path(captions_json).read_text())
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{captions_json}: no {key!r} list (not a COCO captions file)")
    images = sorted(data["images"], key=lambda im: im["id"])[:max_images]
    row = {im["id"]: n for n, im in enumerate(images)}
    pairs = PairList(images=[(f"coco/{im['file_name']}",
                              str(path_inside(image_dir, im["file_name"], f"{captions_json}: file_name")))
                             for im in images],
                     labels=[f"coco/{im['id']}" for im in images])
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        if ann["image_id"] in row:
            pairs.captions.append((f"coco-caption/{ann['id']}", ann["caption"].strip(),
                                   row[ann["image_id"]]))
    return pairs


def webdataset_pairs(tars: Sequence[str | os.PathLike], max_images: int | None = None,
                     name: str = "cc12m") -> PairList:
    """Image-caption shards (``jpg`` + ``txt``), in shard then tar order; id ``<shard>/<key>``."""
    pairs = PairList()
    for tar in tars:
        for key, fields in read_tar_samples(tar).items():
            if max_images is not None and len(pairs.images) >= max_images:
                return pairs
            if "jpg" not in fields or "txt" not in fields:
                continue
            image_id = f"{name}/{Path(tar).name}/{key}"
            pairs.captions.append((f"{image_id}#0", read_member_text(fields["txt"]),
                                   len(pairs.images)))
            pairs.images.append((image_id, fields["jpg"]))
            pairs.labels.append(image_id)
    return pairs


def table_pairs(table: str | os.PathLike, image_root: str | os.PathLike, image_column: str,
                caption_column: str, label_column: str | None = None,
                max_images: int | None = None, name: str = "biotrove") -> PairList:
    """Image-caption rows of a CSV or parquet table (BioTrove-style); one row = one image."""
    import pandas as pd
    table = Path(table)
    frame = pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table)
    columns = [image_column, caption_column] + ([label_column] if label_column else [])
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{table}: missing column(s) {missing}; has {list(frame.columns)}")
    if max_images is not None:
        frame = frame.iloc[:max_images]
    pairs = PairList()
    for n, row in enumerate(frame.itertuples(index=False)):
        values = row._asdict()
        path = str(values[image_column])
        image_id = f"{name}/{path}"
        label = values[label_column] if label_column else image_id
        pairs.images.append((image_id, str(path_inside(image_root, path, f"{table}: image"))))
        pairs.labels.append(None if pd.isna(label) else f"{name}/{label}")
        pairs.captions.append((f"{image_id}#0", str(values[caption_column]).strip(), n))
    return pairs


def uned_pairs(paths_file: str | os.PathLike, image_root: str | os.PathLike,
               max_images: int | None = None) -> PairList:
    """UnED images with (class, domain) labels, in list order; no captions. Images are decoded
    with their EXIF orientation applied, as ILIAS's ImageDataset decodes them."""
    from quari.data.ilias import ExifImage
    from quari.data.tars import ImageRef
    pairs = PairList()
    with open(paths_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_images is not None and len(pairs.images) >= max_images:
                break
            if not line.strip():
                continue
            parts = line.strip().rsplit(",", 2)
            if len(parts) != 3:
                raise ValueError(f"{paths_file}:{lineno}: expected '<path>,<class>,<domain>'")
            path, label, domain = parts
            where = f"{paths_file}:{lineno}: path"
            pairs.images.append((f"uned/{path}",
                                 ExifImage(ImageRef(str(path_inside(image_root, path, where))))))
            pairs.labels.append(f"uned/{domain}/{label}")
    return pairs


def merge(collections: dict[str, PairList]) -> PairList:
    """Concatenate collections in the given order (ids are already prefixed by their source)."""
    out = PairList()
    for pairs in collections.values():
        offset = len(out.images)
        out.images += pairs.images
        out.labels += pairs.labels
        out.captions += [(cid, text, row + offset) for cid, text, row in pairs.captions]
    ids = [i for i, _ in out.images]
    if len(set(ids)) != len(ids):
        raise ValueError("image ids collide across collections")
    return out


def is_validation(image_id: str, fraction: float) -> bool:
    """Deterministic hold-out by a hash of the id, so it does not move when the collection grows."""
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def split_valid(pairs: PairList, fraction: float) -> tuple[PairList, PairList]:
    """(train, valid): whole labels (instances, classes; the image id when unlabelled) go to
    valid by ``is_validation``, with their captions, so validation measures held-out instances
    and keeps several views of each."""
    parts = (PairList(), PairList())
    new_row: dict[int, tuple[int, int]] = {}
    for n, (item, label) in enumerate(zip(pairs.images, pairs.labels)):
        side = int(is_validation(item[0] if label is None else label, fraction))
        new_row[n] = (side, len(parts[side].images))
        parts[side].images.append(item)
        parts[side].labels.append(label)
    for cid, text, row in pairs.captions:
        side, local = new_row[row]
        parts[side].captions.append((cid, text, local))
    return parts


# What a collection's format implies when its configuration does not say: ILIAS's linear
# adaptation embeds its UnED subset with the benchmark's own transform at the test resolution
# (linear_adaptation/README.md: extract.py --partition uned --resolution <test resolution>) and
# trains on all of it (linear_adaptation/src/lin_adapt.py: "no validation split").
FORMAT_DEFAULTS = {"uned": {"protocol": "ilias", "valid_fraction": 0.0}}


def collection_setting(cfg: dict, key: str, default):
    """A collection's ``protocol`` or ``valid_fraction``: its own, else its format's
    (:data:`FORMAT_DEFAULTS`), else ``default``."""
    if key in cfg:
        return cfg[key]
    return FORMAT_DEFAULTS.get(cfg.get("format"), {}).get(key, default)


def training_split(names: Sequence[str], files: Sequence[dict], cfgs: dict,
                   valid_fraction: float) -> tuple[PairList, PairList, str]:
    """(train, valid, protocol) of a training set merging collections ``names`` (their located
    ``files`` and their ``cfgs``): each collection holds out its own fraction
    (:func:`collection_setting`, default ``valid_fraction``) before merging, and all must agree
    on the image transform ``protocol`` ("model" or "ilias")."""
    protocols = {n: collection_setting(cfgs[n], "protocol", "model") for n in names}
    if len(set(protocols.values())) > 1:
        raise ValueError(f"a training set mixes image protocols {protocols}; embed collections "
                         "of different protocols as separate training sets")
    train, valid = {}, {}
    for name, located in zip(names, files):
        pairs = read_collection(name, located, cfgs[name])
        fraction = collection_setting(cfgs[name], "valid_fraction", valid_fraction)
        train[name], valid[name] = split_valid(pairs, fraction)
    return merge(train), merge(valid), protocols[names[0]]


def read_collection(name: str, files: dict, cfg: dict) -> PairList:
    """The pairs of one collection from its located files (``quari.data.sources``) and settings
    (``max_images``, and for tables the column names)."""
    limit = cfg.get("max_images")
    kind = files["format"]
    if kind == "coco":
        return coco_pairs(files["captions"], files["images"], limit)
    if kind == "webdataset":
        return webdataset_pairs(files["tars"], limit, name=name)
    if kind == "table":
        return table_pairs(files["table"], files["image_root"], cfg["image_column"],
                           cfg["caption_column"], cfg.get("label_column"), limit, name=name)
    if kind == "uned":
        return uned_pairs(files["paths"], files["image_root"], limit)
    raise ValueError(f"collection {name}: unknown format {kind!r}")
