"""Evaluate one (benchmark, backbone, method): full search, and re-ranking of the initial shortlist."""

import logging
from pathlib import Path

import torch

from baselines import get_method
from quari.evaluation import RetrievalTask, evaluate_rerank, evaluate_search, hardware_name
from quari.runlog import log_to
from quari.store import atomic_write_json, load_embedding_set, load_positives

log = logging.getLogger("quari.evaluate")


def main(smk):
    w, p = smk.wildcards, smk.params
    torch.set_num_threads(max(1, smk.threads))
    cls = get_method(p.method_type)
    device = None if p.device == "auto" else p.device
    method = cls.load(Path(smk.input.model).parent, device=device)
    gallery = load_embedding_set(smk.input.gallery)
    positives = load_positives(smk.input.positives)
    ev = p.evaluation
    tasks = []
    if w.benchmark == "ilias":
        if "i2i" in ev["ilias"]["tasks"]:
            tasks.append(RetrievalTask("i2i", load_embedding_set(smk.input.image_queries), gallery, positives))
        if "t2i" in ev["ilias"]["tasks"]:
            tasks.append(RetrievalTask("t2i", load_embedding_set(smk.input.text_queries), gallery, positives))
        k, rerank_k = ev["ilias"]["k"], ev["ilias"]["rerank_shortlist"]
    else:
        tasks.append(RetrievalTask("t2i", load_embedding_set(smk.input.text_queries), gallery, positives))
        k, rerank_k = ev["inquire"]["k"], 100
    results = {}
    for task in tasks:
        log.info("%s %s %s: %d queries, %d gallery rows", w.benchmark, task.name, w.method,
                 len(task.queries), len(gallery))
        if hasattr(method, "set_gallery"):  # re-rankers that look candidates up by id
            method.set_gallery(gallery.ids)
        results[task.name] = {}
        if not cls.reranker_only:  # re-rankers have no full-gallery search of their own
            results[task.name]["search"] = evaluate_search(
                method, task, w.benchmark, k, chunk_rows=ev["chunk_rows"], shortlist=ev["shortlist"])
        rerank = evaluate_rerank(method, task, w.benchmark, rerank_k, k, chunk_rows=ev["chunk_rows"])
        results[task.name]["rerank"] = rerank
        log.info("%s | rerank top-%d %s (%.3f ms / 1k pairs)",
                 results[task.name].get("search", {}).get("metrics", "re-ranker only"), rerank_k,
                 rerank["metrics"], rerank["ms_per_1k_pairs"])
    atomic_write_json(smk.output[0], {
        "run_id": p.run_id, "data": p.data, "benchmark": w.benchmark, "backbone": w.backbone,
        "method": w.method, "method_type": p.method_type, "label": cls.label or cls.name,
        "device": str(method.device), "hardware": hardware_name(method.device), "gallery_size": len(gallery), "tasks": results,
    })


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
