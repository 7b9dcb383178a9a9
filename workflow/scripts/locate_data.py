"""Make one dataset's official files present and verified (fetching what is missing when
downloads are on) and write the manifest of local paths the later stages read.

The sets fetched in groups (ILIAS's YFCC100M and mini-ILIAS shards, a webdataset collection embedded
in parts such as CC12M) have two jobs: the dataset's own (`locate_data`) lists the shards without
fetching them, and one `locate_data_group` job per group fetches and verifies that group's
shards."""

import json
import logging
from pathlib import Path

from quari.data import sources
from quari.runlog import log_to
from quari.store import atomic_write_json

log = logging.getLogger("quari.data")


def locate(dataset, settings, root, download):
    if dataset == "ilias_core":
        return sources.locate_ilias_core(settings, root, download)
    if dataset == "ilias_mini":
        return {"listing": sources.ilias_mini_listing(settings, root, download)}
    if dataset == "ilias_yfcc":
        return {"listing": sources.ilias_yfcc_listing(settings, root, download)}
    if dataset == "inquire":
        return sources.locate_inquire(settings, root, download, settings.get("precomputed", {}))
    if dataset == "inquire_rerank":
        return {**sources.locate_inquire_rerank(settings, root, download),
                **sources.locate_inquire_labels(settings, root, download)}
    if settings.get("groups"):  # a webdataset embedded in parts: listed here, fetched by group
        return {"format": "webdataset",
                "listing": sources.webdataset_listing(dataset, settings, root, download)}
    return sources.locate_collection(dataset, settings, root, download)


def locate_group(p, listing_path):
    """The shards of group `p.group` of the dataset's listing, fetched and verified."""
    listing = json.loads(Path(listing_path).read_text())["listing"]
    if p.settings.get("groups"):  # a webdataset collection: equal groups of its shards
        from quari.data.parts import even_slices
        groups = p.settings["groups"]
        start, stop = even_slices(len(listing), groups)[p.group]
        if start == stop:
            raise ValueError(f"{p.dataset}: {len(listing)} shards cannot make {groups} groups; "
                             f"set real.fan_out.collection_jobs.{p.dataset} to at most "
                             f"{len(listing)}")
        log.info("%s group %d of %d: shards %d to %d of %d", p.dataset, p.group, groups, start,
                 stop, len(listing))
        return sources.locate_webdataset_group(p.dataset, p.settings, p.data_root, p.download,
                                               listing[start:stop])
    if len(listing) != p.planned:
        raise ValueError(f"{p.dataset}: {len(listing)} shards listed, the workflow planned "
                         f"{p.planned} jobs' worth; set real.ilias."
                         f"{'yfcc_shards' if p.dataset == 'ilias_yfcc' else 'mini_shards'}: "
                         f"{len(listing)}")
    group = listing[p.group * p.group_size:(p.group + 1) * p.group_size]
    if not group:
        raise ValueError(f"{p.dataset}: group {p.group} is beyond the {len(listing)} shards")
    log.info("%s group %d: %d shards (%s ... %s)", p.dataset, p.group, len(group),
             json.dumps(group[0]), json.dumps(group[-1]))
    if p.dataset == "ilias_yfcc":  # the sha256 of each shard goes along (part provenance)
        return {**sources.locate_ilias_yfcc(p.settings, p.data_root, p.download, listing=group),
                "listing": group}
    return sources.locate_ilias_mini(p.settings, p.data_root, p.download, names=group)


def main(smk):
    p = smk.params
    if hasattr(p, "group"):
        manifest = locate_group(p, smk.input.listing)
    else:
        manifest = locate(p.dataset, p.settings, p.data_root, p.download)
    log.info("%s: %s", p.dataset, manifest)
    atomic_write_json(smk.output[0], manifest)


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
