"""List the ILIAS gallery images in some image query's cosine top-k (plus a margin) for one
backbone: the database images whose local descriptors the Table 3a re-rankers need."""

import logging

import torch

from baselines.local_features.descriptors import shortlist_ids
from quari.runlog import log_to
from quari.store import atomic_write_text, load_embedding_set

log = logging.getLogger("baselines.local_features.descriptors")


def main(smk):
    p = smk.params
    torch.set_num_threads(max(1, smk.threads))
    queries = load_embedding_set(smk.input.image_queries)
    gallery = load_embedding_set(smk.input.gallery)
    k = p.shortlist + p.margin
    ids = shortlist_ids(queries, gallery, k, chunk_rows=p.chunk_rows)
    log.info("%d image queries x top-%d of %d gallery rows: %d distinct images", len(queries), k,
             len(gallery), len(ids))
    atomic_write_text(smk.output[0], "".join(f"{i}\n" for i in ids))


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
