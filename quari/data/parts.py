"""Large embedding sets as parts: one job per group of source shards, a cheap view assembles them.

A 100M-image gallery is embedded by many independent jobs (a cluster runs them side by side),
each writing one *part*: an ordinary embedding set (:mod:`quari.embedding_cache`) in its own folder.
(Within one job, the embedding cache resumes shard by shard; a part is a whole job.)
:func:`assemble_parts` checks every part (rows against ids, counts, distinct ids, the same model
and preprocessing in all of them) and writes a manifest that lists the parts' shards by relative
path, so the set loads as one memory-mapped view (:func:`quari.store.load_embedding_set`) and
nothing is copied.

Each part job works in a hidden sibling folder (``quari.data.embedding_jobs.partial_dir``) and is renamed
when complete, so a killed or preempted job resumes its own part from its last complete shard.
Before resuming, the part's *provenance* is compared with the job's: a fingerprint of the model
weights, the preprocessing, the identity of the input shards and the settings that change the
rows. A partial part written by another model (a ``real.models.X.path`` pointed elsewhere, even
at a model of the same width), other inputs or other settings is removed and started over, with
a log line saying what differs; it is never resumed into a mix of two models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from quari.embedding_cache import SKIPPED, embed_images, ids_digest
from quari.store import (FORMAT_VERSION, MANIFEST, atomic_write_json, atomic_write_text,
                         load_embedding_set, shard_under)

logger = logging.getLogger(__name__)

PROVENANCE = "provenance.json"




def even_slices(count: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``parts`` near-equal consecutive slices of ``count`` items."""
    if parts < 1:
        raise ValueError("number of parts must be positive")
    return [(count * p // parts, count * (p + 1) // parts) for p in range(parts)]


def weights_fingerprint(module) -> str:
    """sha256 over a torch module's state (names, dtypes, shapes and bytes of every tensor): the
    identity of the weights, wherever they were loaded from."""
    import torch
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its raw 16-bit words
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def encoder_fingerprint(encoder) -> str:
    """The identity of an encoder's weights (its ``model``'s state); an encoder without a torch
    model is identified by its backbone description."""
    import torch
    model = getattr(encoder, "model", None)
    if isinstance(model, torch.nn.Module):
        return weights_fingerprint(model)
    return hashlib.sha256(repr(dataclasses.asdict(encoder.info)).encode()).hexdigest()


def file_identity(path: str | os.PathLike, sha256: str | None = None) -> dict:
    """How an input shard is recognised: its name and size, and its published sha256 when known
    (not its modification time: a verified re-download of the same file is the same input)."""
    path = Path(path)
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256}


def part_provenance(encoder, protocol: str, sources: Sequence[dict], ids: Sequence[str],
                    settings: dict) -> dict:
    """What a part's rows depend on: the model weights, the preprocessing (protocol and the
    backbone's sizes and normalisation), the input shards, the item ids and the settings."""
    record = {"weights": encoder_fingerprint(encoder),
              "transform": {"protocol": protocol, **dataclasses.asdict(encoder.info)},
              "device": getattr(encoder.device, "type", str(encoder.device)),
              "sources": list(sources), "ids": ids_digest(ids), "items": len(ids),
              "settings": dict(settings)}
    return json.loads(json.dumps(record))  # as it reads back from disk (tuples become lists)


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def embed_part(encoder, items: Sequence[tuple[str, object]], out_dir: str | os.PathLike,
               transform: Callable, provenance: dict, meta: dict | None = None,
               **options) -> Path:
    """Embed one part's (id, image source) items into ``out_dir`` through its partial folder.

    A partial folder left by a killed job is resumed when its recorded provenance equals
    ``provenance``; otherwise it is removed and the part starts over (logged with what differs).
    A complete part of the same provenance is kept as is; of another, it is an error (it is
    never overwritten).
    """
    from quari.data.embedding_jobs import partial_dir, publish
    out_dir, work = Path(out_dir), partial_dir(out_dir)
    if (out_dir / MANIFEST).is_file():
        done = json.loads((out_dir / MANIFEST).read_text()).get("meta", {}).get("provenance")
        if done != provenance:
            raise FileExistsError(f"{out_dir} is a complete part of another model, input or "
                                  f"settings ({', '.join(_differences(done or {}, provenance))} "
                                  "differ); remove it to embed it again")
        logger.info("%s is complete; nothing to embed", out_dir)
        return out_dir
    record = work / PROVENANCE
    if work.exists():
        old = json.loads(record.read_text()) if record.exists() else {}
        if old != provenance:
            changed = _differences(old, provenance) or ["no provenance recorded"]
            logger.warning("%s: partial part of another model, input or settings (%s differ); "
                           "starting it over", work, ", ".join(changed))
            shutil.rmtree(work)
        else:
            logger.info("%s: same model, inputs and settings; resuming", work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, provenance)
    embed_images(encoder, items, work, transform,
                 meta={**(meta or {}), "provenance": provenance}, **options)
    publish(work, out_dir)
    return out_dir


class PartError(ValueError):
    """A part is missing, incomplete or inconsistent with the others."""


def verify_part(part_dir: str | os.PathLike) -> dict:
    """The manifest of a complete part, after checking that every shard's rows match its ids and
    the counts add up (requested = embedded + skipped, listed in the skip file)."""
    import numpy as np
    part_dir = Path(part_dir)
    if not (part_dir / MANIFEST).is_file():
        raise PartError(f"{part_dir}: not a complete part (no {MANIFEST}); rerun its job")
    manifest = json.loads((part_dir / MANIFEST).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise PartError(f"{part_dir}: embedding-set format {manifest.get('format')}")
    total = 0
    for shard in manifest["shards"]:
        rows = np.load(part_dir / shard["file"], mmap_mode="r")
        ids = (part_dir / shard["ids"]).read_text().splitlines()
        if rows.shape != (shard["rows"], manifest["dim"]) or len(ids) != shard["rows"]:
            raise PartError(f"{part_dir}/{shard['file']}: {rows.shape[0]} rows, {len(ids)} ids, "
                            f"manifest says {shard['rows']} x {manifest['dim']}")
        total += shard["rows"]
    meta = manifest.get("meta", {})
    skipped = (part_dir / SKIPPED).read_text().splitlines()[1:]
    if total != manifest["rows"] or total != meta.get("embedded") or \
            meta.get("requested") != total + len(skipped) or len(skipped) != meta.get("skipped"):
        raise PartError(f"{part_dir}: {total} rows and {len(skipped)} skipped items do not add up "
                        f"to the manifest's counts {manifest['rows']} / {meta}")
    return manifest


def _id_digests(ids: Sequence[str]):
    """64-bit digests of ids: 800 MB for the 100M gallery's ids, where a set of the strings
    would need tens of GB."""
    import numpy as np
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(),
                                       "little") for i in ids), dtype=np.uint64, count=len(ids))


def _check_distinct(digests, part_dirs: Sequence[Path]) -> None:
    """Raise PartError naming ids held by more than one part (each part's own ids are distinct:
    :func:`quari.embedding_cache.embed_images` refuses repeated ids)."""
    import numpy as np
    flat = np.sort(np.concatenate(digests)) if digests else np.zeros(0, np.uint64)
    repeated = set(flat[1:][flat[1:] == flat[:-1]].tolist())
    if not repeated:
        return
    where: dict[str, list[str]] = {}
    for part in part_dirs:  # a second pass, on failure only, to name them
        manifest = json.loads((part / MANIFEST).read_text())
        for shard in manifest["shards"]:
            for i in (part / shard["ids"]).read_text().splitlines():
                if int(_id_digests([i])[0]) in repeated:
                    where.setdefault(i, []).append(part.name)
    clashes = {i: p for i, p in where.items() if len(p) > 1}
    if clashes:
        raise PartError(f"ids in more than one part, e.g. {sorted(clashes.items())[:3]}")


def assemble_parts(part_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                   meta: dict | None = None) -> Path:
    """Write ``out_dir`` as one embedding set over the verified ``part_dirs`` (in order): a
    manifest listing their shards by relative path and the concatenated skip list; no rows are
    copied. Every part must be complete, hold ids no other part holds, and come from the same
    weights and preprocessing."""
    from quari.data.embedding_jobs import partial_dir, publish
    out_dir, work = Path(out_dir), partial_dir(out_dir)
    if not part_dirs:
        raise PartError("no parts to assemble")
    work.mkdir(parents=True, exist_ok=True)
    shards, skipped, names, digests = [], [], [], []
    counts = {"requested": 0, "embedded": 0, "skipped": 0}
    first, dim, kind = None, None, None
    for part in map(Path, part_dirs):
        manifest = verify_part(part)
        part_meta = manifest.get("meta", {})
        origin = {k: part_meta.get("provenance", {}).get(k) for k in ("weights", "transform")}
        if first is None:
            first, dim, kind = (part, origin), manifest["dim"], part_meta.get("kind", "images")
        elif origin != first[1] or manifest["dim"] != dim:
            raise PartError(f"{part} was embedded with other weights or preprocessing than "
                            f"{first[0]}; rerun the parts of one model")
        rel = Path(os.path.relpath(part, work))
        for shard in manifest["shards"]:
            digests.append(_id_digests((part / shard["ids"]).read_text().splitlines()))
            shards.append(shard_under(shard, str(rel)))  # every file of the shard
        for key in counts:
            counts[key] += part_meta.get(key, 0)
        skipped += (part / SKIPPED).read_text().splitlines()[1:]
        names.append(part.name)
    _check_distinct(digests, [Path(p) for p in part_dirs])
    atomic_write_text(work / SKIPPED, "id\treason\n" + "".join(f"{x}\n" for x in skipped))
    atomic_write_json(work / MANIFEST, {
        "format": FORMAT_VERSION, "dim": dim, "dtype": "float16",
        "rows": sum(s["rows"] for s in shards), "shards": shards,
        "meta": {**(meta or {}), **counts, "kind": kind, "parts": names,
                 "provenance": first[1]}})
    load_embedding_set(work)  # every listed shard opens before the set is published
    publish(work, out_dir)
    logger.info("%s: %d rows over %d parts (%d skipped items)", out_dir, counts["embedded"],
                len(names), counts["skipped"])
    return out_dir
