"""ILIAS: image queries, positives, text queries, distractors and ground truth in official ids.

Sources (each step and its official source: docs/protocol.md):

- Core images (image queries ``<instance>/query/Qxxx_yy.jpg``, positives
  ``<instance>/pos/Pxxx_zz.jpg``): the original images of the official server's
  ``ilias_core.tar`` (or its extracted ``ilias_core/`` folder), decoded with the EXIF orientation
  applied, as ILIAS's ``ImageDataset`` does. The official id of a core image is its path inside
  ``ilias_core/`` (``bold_bimp_000/pos/P000_07.jpg``). The Hugging Face ``vrg-prague/ilias``
  core shards are not used: their images look downscaled and are not proven identical.
- Text queries: ``<instance>/query/Txxx.txt`` files (the official id is that path), read from an
  extracted ``ilias_core`` folder or from any tar holding those members.
- Distractors: webdataset shards (the 45 mini-ILIAS shards, or the 1,000 YFCC100M shards of the
  official server), decoded without EXIF transposition (webdataset's ``pilrgb``, as ILIAS's
  ``get_wds_dataset``). Their official id is ``<shard file name>/<key>``, as ILIAS's feature
  extraction names them; a distractor is never a positive.
- ``image_ids/`` lists of the official server (``image_query_ids.txt`` and ``positive_ids.txt``
  with the id in the first comma-separated column, ``text_query_ids.txt``): used to check that the
  embedded sets are exactly the benchmark's.

Ground truth: the instance name, the first path component of an id, is the class; a query's
positives are the positive images of its instance.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from quari.data.tars import ImageRef, read_tar_samples

logger = logging.getLogger(__name__)

_CORE_IMAGE = re.compile(r"^(?:.*/)?([^/]+/(query|pos)/([^/]+)\.(?:jpg|jpeg|png))$", re.IGNORECASE)
_TEXT_NAME = re.compile(r"^(?:.*/)?([^/]+/query/T[^/]+\.txt)$")
_PART_PREFIX = {"query": "Q", "pos": "P"}


def instance_of(official_id: str) -> str:
    """The instance (ground-truth class) of a core id: its first path component."""
    return official_id.split("/", 1)[0]


@dataclass(frozen=True)
class ExifImage:
    """An image of a folder ILIAS reads with its ImageDataset (core queries and positives, the
    UnED subset; also INQUIRE-Rerank's candidates, which ``datasets`` transposes the same way),
    decoded as ILIAS's feature extraction decodes it: ``Image.open(...).convert("RGB")`` then
    ``ImageOps.exif_transpose`` (feature_extraction/src/datasets/generators.py, ImageDataset).
    ``ref`` is the file or the tar member holding the JPEG; picklable into DataLoader workers."""

    ref: ImageRef

    def __call__(self):
        import io

        from PIL import Image, ImageOps
        image = Image.open(io.BytesIO(self.ref())).convert("RGB")
        return ImageOps.exif_transpose(image)


def _core_members(core: str | os.PathLike) -> list[tuple[str, str, ImageRef]]:
    """``(official id, part, ref)`` of every core image of an extracted ``ilias_core/`` folder or
    of ``ilias_core.tar`` (members under any prefix); the id is the path inside ``ilias_core/``."""
    core = Path(core)
    found = []

    def add(name: str, ref: ImageRef) -> None:
        match = _CORE_IMAGE.match(name)
        if match and match.group(3).upper().startswith(_PART_PREFIX[match.group(2).lower()]):
            found.append((match.group(1), match.group(2).lower(), ref))

    if core.is_dir():
        for path in sorted(core.glob("*/*/*")):
            if path.is_file():
                add(path.relative_to(core).as_posix(), ImageRef(str(path)))
    else:
        try:
            with tarfile.open(core, "r:") as tar:
                for member in tar:
                    if member.isfile():
                        add(member.name, ImageRef(str(core), member.offset_data, member.size))
        except (tarfile.TarError, EOFError) as err:
            raise tarfile.ReadError(f"{core}: unreadable tar ({err})") from err
    return found


def core_image_items(core: str | os.PathLike, part: str) -> list[tuple[str, ExifImage]]:
    """``(official id, image)`` of the image queries (``part="query"``, ``<instance>/query/Q...``)
    or positives (``part="pos"``, ``<instance>/pos/P...``) of the original core images, sorted by
    id as ILIAS sorts them; each image is EXIF-transposed when decoded (:class:`ExifImage`).

    ``core`` is the official ``ilias_core.tar`` of the ILIAS server, or its extracted
    ``ilias_core/`` folder. The Hugging Face shards are not used for core images: their images
    look downscaled and are not proven identical to these (docs/protocol.md).
    """
    if part not in _PART_PREFIX:
        raise ValueError(f"part must be 'query' or 'pos', got {part!r}")
    items = [(i, ExifImage(ref)) for i, p, ref in _core_members(core) if p == part]
    if not items:
        raise ValueError(f"{core}: no core {part} images (<instance>/{part}/*.jpg) found")
    ids = [i for i, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{core}: duplicate core image paths")
    return sorted(items, key=lambda item: item[0])


def image_query_items(core: str | os.PathLike) -> list[tuple[str, ExifImage]]:
    """``(official id, image)`` of every image query of ``ilias_core`` (folder or tar), sorted."""
    return core_image_items(core, "query")


def positive_items(core: str | os.PathLike) -> list[tuple[str, ExifImage]]:
    """``(official id, image)`` of every core positive of ``ilias_core`` (folder or tar), sorted."""
    return core_image_items(core, "pos")


def distractor_items(tar: str | os.PathLike) -> list[tuple[str, ImageRef]]:
    """``(official id, image)`` of one distractor shard, in shard order; id = ``<shard name>/<key>``."""
    name = Path(tar).name
    return [(f"{name}/{key}", fields["jpg"]) for key, fields in read_tar_samples(tar).items()
            if "jpg" in fields]


def text_query_items(source: str | os.PathLike) -> list[tuple[str, str]]:
    """``(official id, description)`` of every text query, sorted by id.

    ``source`` is an extracted ``ilias_core`` folder (files ``<instance>/query/Txxx.txt``) or a tar
    (e.g. the official ``ilias_core.tar``) holding such members under any prefix.
    """
    source = Path(source)
    items: list[tuple[str, str]] = []
    if source.is_dir():
        for path in sorted(source.glob("*/query/T*.txt")):
            items.append((path.relative_to(source).as_posix(), path.read_text("utf-8").strip()))
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    match = _TEXT_NAME.match(member.name)
                    if member.isfile() and match:
                        data = tar.extractfile(member).read()
                        items.append((match.group(1), data.decode("utf-8").strip()))
        except tarfile.TarError as err:
            raise tarfile.ReadError(f"{source}: unreadable tar ({err})") from err
    if not items:
        raise ValueError(f"{source}: no text queries (<instance>/query/T*.txt) found")
    return sorted(items)




def ground_truth(query_ids: Sequence[str], positive_ids: Sequence[str]) -> dict[str, list[str]]:
    """``{query id: positives of the query's instance}`` for image and text queries alike.

    Raises ValueError naming the queries whose instance has no positive (a wrong or partial file).
    """
    by_instance: dict[str, list[str]] = {}
    for pid in positive_ids:
        by_instance.setdefault(instance_of(pid), []).append(pid)
    missing = [q for q in query_ids if instance_of(q) not in by_instance]
    if missing:
        raise ValueError(f"{len(missing)} queries have no positive of their instance, "
                         f"e.g. {missing[:3]}")
    return {q: sorted(by_instance[instance_of(q)]) for q in query_ids}


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Official ids of an ``image_ids/*.txt`` list (first comma-separated column; gzip allowed)."""
    import gzip
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.split(",", 1)[0].strip() for line in f if line.strip()]


def check_against_official(ids: Sequence[str], official: Sequence[str], what: str) -> None:
    """Raise ValueError when ``ids`` differ from the official list (counts and examples both ways)."""
    have, want = set(ids), set(official)
    if have != want:
        raise ValueError(
            f"{what}: {len(have)} ids, official list has {len(want)}; "
            f"missing e.g. {sorted(want - have)[:3]}, unexpected e.g. {sorted(have - want)[:3]}")


def gallery_items(ids: Iterable[str], core: str | os.PathLike,
                  distractor_tars: Iterable[str | os.PathLike]) -> list[tuple[str, ImageRef]]:
    """``(official id, image)`` of the given gallery ids, in the order given: core positives
    (``<instance>/pos/P...jpg``, from ``core``: ``ilias_core.tar`` or its folder) and
    distractors (``<shard name>/<key>``).

    Only the distractor shards that hold a requested id are indexed, so a few hundred thousand
    shortlisted images of the 100M gallery are found without reading every shard. Raises
    ValueError naming the ids that are in none of the files (a shortlist of another gallery).
    """
    ids = list(dict.fromkeys(ids))
    wanted = set(ids)
    shards = {Path(t).name: t for t in distractor_tars}
    found: dict = {}
    if any("/pos/" in i for i in wanted):
        found.update((i, ref) for i, ref in positive_items(core) if i in wanted)
    needed_shards = sorted({i.split("/", 1)[0] for i in wanted if i.split("/", 1)[0] in shards})
    for name in needed_shards:
        found.update((i, ref) for i, ref in distractor_items(shards[name]) if i in wanted)
    missing = [i for i in ids if i not in found]
    if missing:
        raise ValueError(f"{len(missing)} gallery ids are in no positive or distractor shard, "
                         f"e.g. {missing[:3]}")
    return [(i, found[i]) for i in ids]
