"""Fit one method on one backbone's training collection and save it beside its method.json."""

import logging
from pathlib import Path

import torch

from quari.methods import get_method
from quari.mining import load_semipositives
from quari.dropped import DROPPED_FILE, check_training_collection
from quari.runlog import log_to
from quari.store import atomic_write_json, embedding_fingerprint, load_training_collection

log = logging.getLogger("quari.train")


def main(smk):
    p = smk.params
    torch.set_num_threads(max(1, smk.threads))
    cls = get_method(p.method_type)
    method = cls(**p.method_params, device=p.device)  # the rule merged any shared settings in
    # the side inputs the method declares, prepared by the rules: files are given as absolute
    # paths (the method keeps them), the backbone as its registry entry; semi-positives are read
    # below, once the training collection they must match is loaded
    context = {}
    for name in cls.side_inputs:
        if name == "backbone":
            from quari.data.embedding_jobs import configured_backbone
            context["backbone"], _ = configured_backbone(smk.wildcards.backbone, p.models)
        elif name != "semipositives":
            context[name] = str(Path(getattr(smk.input, name)).resolve())
    out_dir = Path(smk.output[0]).parent
    if "train" in smk.input.keys():
        train = load_training_collection(smk.input.train)
        if "semipositives" in smk.input.keys():  # only when mined from these very images
            context["semipositives"] = load_semipositives(
                smk.input.semipositives,
                embedding_fingerprint(train.images.ids, train.images.embeddings))
        valid = load_training_collection(smk.input.valid)
        if len(valid.images) == 0:  # a collection trained on whole (UnED, as ILIAS does)
            log.info("no validation images: training without validation")
            valid = None
        log.info("fitting %s (%s) on %d images / %d captions", smk.wildcards.method,
                 p.method_type, len(train.images), len(train.captions))
        dropped = check_training_collection(smk.input.train, train.meta, p.max_dropped_fraction)
        if dropped["dropped"]:
            log.warning("training data: %d of %d images could not be embedded and are left out, "
                        "with %d captions (training pairs) that described them",
                        dropped["dropped"], dropped["requested"], dropped["captions_dropped"])
        atomic_write_json(out_dir / DROPPED_FILE, dropped)
    else:  # fitted without training data (a released checkpoint): nothing left out
        train = valid = None
        log.info("fitting %s (%s) without training data", smk.wildcards.method, p.method_type)
    method.fit(train, valid, workdir=out_dir / "work", **context)
    method.save(out_dir)


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
