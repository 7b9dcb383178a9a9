"""Assemble a gallery as one embedding set over its verified parts (a manifest; no copy)."""

from quari.data.parts import assemble_parts
from quari.runlog import log_to


def main(smk):
    assemble_parts(list(smk.input.parts), smk.output[0],
                   meta={"dataset": smk.wildcards.dataset, "backbone": smk.wildcards.backbone})


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
