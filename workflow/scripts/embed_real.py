"""Embed one real set with one backbone into the embedding cache (resumable; see quari.data.embedding_jobs).

The job says which set: ILIAS image / text queries, one part of a gallery (ILIAS's core positives
or one group of distractor shards, ILIAS protocol: long side to the test resolution, no crop; one
slice of the iNat24 pool, the model's own transform; see quari.data.parts), INQUIRE queries, the
benchmark's precomputed iNat24 embeddings, INQUIRE-Rerank candidates, or one part of a training
set's collection (train and valid; quari.data.training_parts)."""

import json
import logging
from pathlib import Path

import torch

from quari.backbones import ilias_transform, load_backbone, model_transform
from quari.data import embedding_jobs, ilias, inquire, parts, training_parts
from quari.devices import resolve_device
from quari.runlog import log_to

log = logging.getLogger("quari.embed")


def _files(path):
    return json.loads(Path(path).read_text())


def gallery_part(smk, encoder, opts):
    """One part of a gallery: its items, their provenance, embedded into the part's folder."""
    info, name = encoder.info, smk.wildcards.part
    files = _files(smk.input.files)
    if name == "core":  # the original images of ilias_core.tar (or its folder), EXIF applied
        tars = [files["core"]]
        items = ilias.positive_items(files["core"])
    elif name.startswith("pool-"):
        s = smk.params.part
        pool = inquire.pool_items(files["pool_root"], s["max_pool_images"])
        start, stop = parts.even_slices(len(pool), s["of"])[s["slice"]]
        items, tars = pool[start:stop], []
        log.info("iNat24 pool slice %d of %d: images %d to %d of %d", s["slice"], s["of"], start,
                 stop, len(pool))
    else:
        tars = files["distractor_tars"]
        items = [item for tar in tars for item in ilias.distractor_items(tar)]
    protocol = "model" if name.startswith("pool-") else "ilias"
    transform = model_transform(info) if protocol == "model" else ilias_transform(info)
    sha = {Path(t["path"]).name: t.get("sha256") for t in files.get("listing", [])}
    sources = [parts.file_identity(t, sha.get(Path(t).name)) for t in tars]
    provenance = parts.part_provenance(encoder, protocol, sources, [i for i, _ in items],
                                       {"shard_rows": opts["shard_rows"], **smk.params.part})
    log.info("part %s: %d images from %d source files", name, len(items), len(tars))
    parts.embed_part(encoder, items, smk.output[0], transform, provenance,
                     meta={"protocol": protocol}, **opts)


def training_part(smk, encoder, opts, ilias_t, model_t):
    """One part of one collection of a training set (quari.data.training_parts), train and
    valid: the model's own transform, as the released QuARI code embeds its training data;
    ILIAS's at the test resolution for UnED, as ILIAS's linear adaptation does
    (docs/protocol.md)."""
    s, name = smk.params.part, smk.wildcards.collection
    files = _files(smk.input.files)
    pairs = training_parts.collection_part(name, files, smk.params.collection, s["part"], s["of"])
    if files["format"] == "webdataset":
        listed = files["tars"]
    else:  # the list or table the part is a slice of
        listed = [files[k] for k in ("captions", "paths", "table") if k in files]
    sources = [parts.file_identity(f) for f in listed]
    log.info("%s part %d of %d: %d images, %d captions, %s protocol", name, s["part"], s["of"],
             len(pairs.images), len(pairs.captions), s["protocol"])
    training_parts.embed_training_part(
        encoder, pairs, s["valid_fraction"], smk.output[0],
        ilias_t if s["protocol"] == "ilias" else model_t, s["protocol"], sources,
        {**s, "shard_rows": opts["shard_rows"],
         "max_images": smk.params.collection.get("max_images")}, **opts)


def main(smk):
    p, job = smk.params, smk.params.job
    torch.set_num_threads(max(1, smk.threads))
    opts = dict(p.embedding)
    text_opts = {"batch_size": opts["batch_size"], "shard_rows": opts["shard_rows"]}
    info, path = embedding_jobs.configured_backbone(smk.wildcards.backbone, p.models)
    if job == "inquire_precomputed_gallery":
        files = _files(smk.input.files)
        inquire.check_precomputed(info, files["precomputed"][info.name])
        work = embedding_jobs.partial_dir(smk.output[0])
        rows = inquire.convert_clip_retrieval(files["precomputed"][info.name], work,
                                              meta={"protocol": "precomputed"})
        embedding_jobs.publish(work, Path(smk.output[0]))
        log.info("converted %d precomputed embeddings", rows)
        return
    device = resolve_device(p.device)
    encoder = load_backbone(info, path=path, device=device)
    ilias_t, model_t = ilias_transform(info), model_transform(info)
    out = smk.output[0]
    if job == "gallery_part":
        gallery_part(smk, encoder, opts)
    elif job == "ilias_image_queries":
        items = ilias.image_query_items(_files(smk.input.files)["core"])
        embedding_jobs.embed_image_set(encoder, items, out, ilias_t, meta={"protocol": "ilias"},
                                       **opts)
    elif job == "ilias_text_queries":
        items = ilias.text_query_items(_files(smk.input.files)["text_queries"])
        embedding_jobs.embed_text_set(encoder, items, out, **text_opts)
    elif job == "inquire_text_queries":
        items = inquire.read_queries(_files(smk.input.files)["queries"])
        embedding_jobs.embed_text_set(encoder, items, out, **text_opts)
    elif job == "inquire_rerank_text_queries":
        split = inquire.read_rerank(_files(smk.input.files)["parquets"])
        embedding_jobs.embed_text_set(encoder, [(q, q) for q in split.queries], out, **text_opts)
    elif job == "inquire_rerank_gallery":
        files = _files(smk.input.files)
        items = inquire.rerank_gallery_items(files["parquets"], p.images_dir)
        embedding_jobs.embed_image_set(encoder, items, out, model_t, meta={"protocol": "model"},
                                       **opts)
    elif job == "training_part":
        training_part(smk, encoder, opts, ilias_t, model_t)
    else:
        raise ValueError(f"unknown embedding job {job!r}")


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
