"""Embed one real set with one backbone into the embedding cache (resumable; see quari.data.embedding_jobs).

The job says which set: ILIAS image / text queries and galleries (ILIAS protocol: long side to
the test resolution, no crop), INQUIRE queries and pool (the model's own transform, or the
benchmark's precomputed embeddings), INQUIRE-Rerank candidates, or a training set (collections
merged, a validation fraction held out)."""

import json
import logging
from pathlib import Path

import torch

from quari.backbones import ilias_transform, load_backbone, model_transform
from quari.data import collections, ilias, inquire
from quari.data import embedding_jobs as embed
from quari.runlog import log_to

log = logging.getLogger("quari.embed")


def _files(path):
    return json.loads(Path(path).read_text())


def main(smk):
    p, job = smk.params, smk.params.job
    torch.set_num_threads(max(1, smk.threads))
    opts = dict(p.real["embedding"])
    text_opts = {"batch_size": opts["batch_size"], "shard_rows": opts["shard_rows"]}
    info, path = embed.configured_backbone(smk.wildcards.backbone, p.real.get("models"))
    if job == "inquire_gallery" and info.name in p.real["inquire"].get("precomputed", {}):
        files = _files(smk.input.files)
        work = embed.partial_dir(smk.output[0])
        rows = inquire.convert_clip_retrieval(files["precomputed"][info.name], work,
                                              meta={"protocol": "precomputed"})
        embed.publish(work, Path(smk.output[0]))
        log.info("converted %d precomputed embeddings", rows)
        return
    device = "cuda" if p.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if p.device == "auto" else p.device)
    encoder = load_backbone(info, path=path, device=device)
    ilias_t, model_t = ilias_transform(info), model_transform(info)
    out = smk.output[0]
    if job == "ilias_image_queries":
        items = ilias.image_query_items(_files(smk.input.files)["image_query_tars"])
        embed.embed_image_set(encoder, items, out, ilias_t, meta={"protocol": "ilias"}, **opts)
    elif job == "ilias_text_queries":
        items = ilias.text_query_items(_files(smk.input.files)["text_queries"])
        embed.embed_text_set(encoder, items, out, **text_opts)
    elif job in ("ilias_gallery", "ilias_mini_gallery"):
        core = _files(smk.input.files)
        tars = _files(smk.input.distractors)["distractor_tars"]
        parts = [("core-positives", lambda: ilias.positive_items(core["positive_tars"]))]
        parts += [(Path(t).stem, lambda t=t: ilias.distractor_items(t)) for t in tars]
        embed.embed_gallery_parts(encoder, parts, out, ilias_t, meta={"protocol": "ilias"},
                                  **opts)
    elif job == "inquire_text_queries":
        items = inquire.read_queries(_files(smk.input.files)["queries"])
        embed.embed_text_set(encoder, items, out, **text_opts)
    elif job == "inquire_gallery":
        files = _files(smk.input.files)
        items = inquire.pool_items(files["pool_root"], p.real["inquire"].get("max_pool_images"))
        embed.embed_image_set(encoder, items, out, model_t, meta={"protocol": "model"}, **opts)
    elif job == "inquire_rerank_text_queries":
        split = inquire.read_rerank(_files(smk.input.files)["parquets"])
        embed.embed_text_set(encoder, [(q, q) for q in split.queries], out, **text_opts)
    elif job == "inquire_rerank_gallery":
        files = _files(smk.input.files)
        items = inquire.extract_rerank_images(files["parquets"], p.images_dir)
        embed.embed_image_set(encoder, items, out, model_t, meta={"protocol": "model"}, **opts)
    elif job == "training_set":
        real = p.real
        pairs = collections.merge({
            name: collections.read_collection(name, _files(f), real["collections"][name])
            for name, f in zip(p.collections, smk.input.files)})
        train, valid = collections.split_valid(pairs, real["valid_fraction"])
        name = smk.wildcards.trainset
        log.info("%s: %d train / %d valid images", name, len(train.images), len(valid.images))
        # training embeddings use the model's own transform, as the released QuARI code does
        embed.embed_training_collection(encoder, train, smk.output.train, model_t,
                                        f"{name}-train", meta={"protocol": "model"}, **opts)
        embed.embed_training_collection(encoder, valid, smk.output.valid, model_t,
                                        f"{name}-valid", meta={"protocol": "model"}, **opts)
    else:
        raise ValueError(f"unknown embedding job {job!r}")


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
