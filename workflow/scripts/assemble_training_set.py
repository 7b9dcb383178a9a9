"""Assemble a training set's train and valid collections over its verified parts (manifests and
the labels coded across parts; no rows copied): quari.data.training_parts."""

from quari.data.training_parts import assemble_training_set
from quari.runlog import log_to


def main(smk):
    assemble_training_set(list(smk.input.parts), {"train": smk.output.train,
                                                  "valid": smk.output.valid},
                          smk.wildcards.trainset)


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
