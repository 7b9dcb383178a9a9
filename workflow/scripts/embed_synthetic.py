"""Render the synthetic world through one synthetic backbone into the embedding cache.

This is the synthetic counterpart of "download and embed": it writes the same files the real
pipeline writes (training collection, validation collection, benchmark galleries and queries),
plus the oracle's ground truth.
"""

import logging

import numpy as np

from quari.runlog import log_to
from quari.store import (EmbeddingSet, TrainingCollection, atomic_savez, save_embedding_set,
                         save_training_collection)
from quari.synthetic import BackboneSpec, WorldConfig, generate_world, render

log = logging.getLogger("quari.synthetic")


def collection(r, split, name):
    return TrainingCollection(
        images=EmbeddingSet(getattr(r, f"{split}_images"), getattr(r, f"{split}_image_ids")),
        image_labels=getattr(r, f"{split}_image_labels"),
        captions=EmbeddingSet(getattr(r, f"{split}_captions"), getattr(r, f"{split}_caption_ids")),
        caption_image=getattr(r, f"{split}_caption_image"), name=name)


def main(smk):
    syn, backbone, out = smk.params.synthetic, smk.wildcards.backbone, smk.output
    world = generate_world(WorldConfig.from_dict({**syn.get("world", {}), "seed": syn["seed"]}))
    r = render(world, BackboneSpec.from_dict(backbone, syn["backbones"][backbone]))
    log.info("%s: %d train images, %d captions; ILIAS gallery %d; INQUIRE pool %d; dim %d",
             backbone, len(r.train_images), len(r.train_captions), len(r.ilias_gallery),
             len(r.inquire_gallery), r.dim)
    save_training_collection(out.train, collection(r, "train", "synthetic-train"))
    save_training_collection(out.valid, collection(r, "valid", "synthetic-valid"))
    save_embedding_set(out.ilias_gallery, r.ilias_gallery, r.ilias_gallery_ids)
    save_embedding_set(out.ilias_image_queries, r.ilias_image_queries, r.ilias_image_query_ids)
    save_embedding_set(out.ilias_text_queries, r.ilias_text_queries, r.ilias_text_query_ids)
    save_embedding_set(out.inquire_gallery, r.inquire_gallery, r.inquire_gallery_ids)
    save_embedding_set(out.inquire_text_queries, r.inquire_queries, r.inquire_query_ids)
    ids = sorted(r.query_categories)
    atomic_savez(out.oracle, bases=r.oracle_bases.astype(np.float32), query_ids=np.array(ids),
                 query_categories=np.array([r.query_categories[i] for i in ids], dtype=np.int64))


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
