"""Ground truth of the synthetic world (shared by every synthetic backbone)."""

from quari.runlog import log_to
from quari.store import save_positives
from quari.synthetic import WorldConfig, generate_world


def main(smk):
    syn = smk.params.synthetic
    world = generate_world(WorldConfig.from_dict({**syn.get("world", {}), "seed": syn["seed"]}))
    save_positives(smk.output.ilias, world.ilias_positives)
    save_positives(smk.output.inquire, world.inquire_positives)


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
