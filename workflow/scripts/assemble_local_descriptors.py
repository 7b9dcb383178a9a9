"""Assemble the local descriptors of ILIAS's shortlisted database images from the parts the
extraction jobs wrote (each verified against its slice of the shortlist's ids and the
configuration), into the one file the Table 3a re-rankers memory-map:
baselines.local_features.descriptors.assemble_local_descriptors."""

from pathlib import Path

from baselines.local_features.descriptors import assemble_local_descriptors, config_from_options
from quari.runlog import log_to


def main(smk):
    opts = smk.params.options
    ids = [i for i in Path(smk.input.ids).read_text().split("\n") if i]
    assemble_local_descriptors(list(smk.input.parts), ids, smk.output.descriptors,
                               config_from_options(opts, opts["database_descriptors"]),
                               part_images=opts["part_images"])


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
