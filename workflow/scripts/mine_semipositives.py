"""Mine semi-positives for every training image (deduplicated by image id)."""

import numpy as np

from quari.mining import mine_semipositives, save_semipositives
from quari.runlog import log_to
from quari.store import embedding_fingerprint, load_training_collection


def main(smk):
    train = load_training_collection(smk.input.train)
    m = smk.params.mining
    semi = mine_semipositives(np.asarray(train.images.embeddings, dtype=np.float32), train.images.ids,
                              k=m["k"], top_n=m["top_n"], temperature=m["temperature"])
    save_semipositives(smk.output[0], semi, source={
        "images": embedding_fingerprint(train.images.ids, train.images.embeddings),
        "mining": dict(m)})


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
