"""DINOv2 local descriptors of ILIAS images for the Table 3a re-rankers
(baselines.local_features.descriptors): the image queries (600 each in the paper), or one part of
the shortlisted database images (100 each): the part-th of real.fan_out.local_descriptor_jobs
consecutive slices of the shortlist's ids (assembled by assemble_local_descriptors.py)."""

import json
import logging
from pathlib import Path

import torch

from quari.data import ilias
from baselines.local_features.descriptors import (DinoLocalExtractor, config_from_options,
                                                  extract_local_descriptors)
from quari.data.parts import even_slices
from quari.devices import resolve_device
from quari.runlog import log_to

log = logging.getLogger("baselines.local_features.descriptors")


def _files(path):
    return json.loads(Path(path).read_text())


def main(smk):
    p = smk.params
    torch.set_num_threads(max(1, smk.threads))
    opts = p.options
    core = _files(smk.input.files)
    if p.job == "queries":
        items = ilias.image_query_items(core["core"])
        n = opts["query_descriptors"]
    elif p.job == "database":
        ids = [i for i in Path(smk.input.ids).read_text().split("\n") if i]
        start, stop = even_slices(len(ids), p.part["of"])[p.part["part"]]
        if start == stop:
            raise ValueError(f"{len(ids)} shortlisted images cannot make {p.part['of']} parts; "
                             "lower real.fan_out.local_descriptor_jobs")
        log.info("part %d of %d: shortlisted images %d to %d of %d", p.part["part"],
                 p.part["of"], start, stop, len(ids))
        distractors = [t for group in smk.input.distractors  # one manifest per group of shards
                       for t in _files(group)["distractor_tars"]]
        items = ilias.gallery_items(ids[start:stop], core["core"], distractors)
        n = opts["database_descriptors"]
    else:
        raise ValueError(f"unknown local-descriptor job {p.job!r}")
    device = resolve_device(p.device)
    config = config_from_options(opts, n)
    log.info("%s: %d images, %d descriptors each, %s on %s", p.job, len(items), n, config.model,
             device)
    extractor = DinoLocalExtractor(config.model, device=device, saliency=config.saliency,
                                   detector=config.detector)
    extract_local_descriptors(extractor, items, smk.output.descriptors, config,
                              batch_size=opts["batch_size"], num_workers=opts["num_workers"],
                              part_images=opts["part_images"], progress=False)


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
