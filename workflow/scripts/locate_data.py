"""Make one dataset's official files present and verified (fetching what is missing when
downloads are on) and write the manifest of local paths the later stages read."""

import logging

from quari.data import sources
from quari.runlog import log_to
from quari.store import atomic_write_json

log = logging.getLogger("quari.data")


def main(smk):
    p = smk.params
    real, dataset = p.real, p.dataset
    root, download = real["data_root"], real["download"]
    if dataset == "ilias_core":
        manifest = sources.locate_ilias_core(real["ilias"], root, download)
    elif dataset == "ilias_mini":
        manifest = sources.locate_ilias_mini(real["ilias"], root, download)
    elif dataset == "ilias_yfcc":
        manifest = sources.locate_ilias_yfcc(real["ilias"], root, download)
    elif dataset == "inquire":
        manifest = sources.locate_inquire(real["inquire"], root, download,
                                          real["inquire"].get("precomputed", {}))
    elif dataset == "inquire_rerank":
        manifest = {**sources.locate_inquire_rerank(real["inquire"], root, download),
                    **sources.locate_inquire_labels(real["inquire"], root, download)}
    else:
        manifest = sources.locate_collection(dataset, real["collections"][dataset], root, download)
    log.info("%s: %s", dataset, manifest)
    atomic_write_json(smk.output[0], manifest)


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
