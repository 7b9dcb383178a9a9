"""Fit one method on one backbone's training collection and save it beside its method.json."""

import logging
from pathlib import Path

import torch

from quari.methods import get_method
from quari.config import deep_merge
from quari.mining import load_semipositives
from quari.dropped import DROPPED_FILE, check_training_collection
from quari.runlog import log_to
from quari.store import atomic_write_json, embedding_fingerprint, load_training_collection

log = logging.getLogger("quari.train")


def main(smk):
    p = smk.params
    torch.set_num_threads(max(1, smk.threads))
    cls = get_method(p.method_type)
    params = dict(p.method_params)
    if p.method_type == "quari":  # the quari section is the base; a method entry overrides it
        params = deep_merge(p.quari, params)
    if p.method_type == "finetuned_backbone":  # QuARI's training recipe and data, no hypernetwork
        base = {"train": p.quari["train"], "image_query_fraction": p.quari["image_query_fraction"]}
        params = deep_merge(base, params)
    method = cls(**params, device=p.device)
    context = {}
    if "oracle" in smk.input.keys():
        context["oracle_file"] = smk.input.oracle
    # Table 3's re-rankers read files the rules prepared: local descriptors (chamfer, spatial
    # verification), candidate images and query texts (VLMs); the method keeps their paths
    for key in ("local_descriptors", "query_local_descriptors", "gallery_images", "query_texts"):
        if key in smk.input.keys():
            context[key] = str(Path(getattr(smk.input, key)).resolve())
    if getattr(cls, "needs_backbone", False):  # e.g. a released checkpoint checks its backbone
        from quari.data.embedding_jobs import configured_backbone
        context["backbone"], _ = configured_backbone(smk.wildcards.backbone, p.models)
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
