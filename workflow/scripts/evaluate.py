"""Evaluate one (benchmark, backbone, method): full search, and re-ranking of the initial shortlist."""

import json
import logging
from pathlib import Path

import torch

from quari.methods import get_method
from quari.data.inquire import rerank_candidates, rerank_full_pool_positives
from quari.evaluation import RetrievalTask, evaluate_rerank, evaluate_search, hardware_name
from quari.dropped import DROPPED_FILE, check_dropped, read_training_report, set_report
from quari.runlog import log_to
from quari.store import atomic_write_json, load_embedding_set, load_positives

log = logging.getLogger("quari.evaluate")


def main(smk):
    w, p = smk.wildcards, smk.params
    torch.set_num_threads(max(1, smk.threads))
    cls = get_method(p.method_type)
    method = cls.load(Path(smk.input.model).parent, device=p.device)
    ev = p.evaluation
    dropped = dropped_reports(smk)
    check_dropped(dropped, ev["max_dropped_fraction"])  # before any work, with the list
    gallery = load_embedding_set(smk.input.gallery)
    positives = load_positives(smk.input.positives)
    if w.benchmark == "inquire_rerank":
        return write_result(smk, cls, method, "inquire", len(gallery),
                            {"t2i": evaluate_inquire_rerank(smk, method, gallery, positives)})
    tasks = []
    if w.benchmark in ("ilias", "ilias_mini"):
        # each task whose query type the method ranks for (local-feature re-rankers compare
        # images: a text query has no local descriptors)
        if "i2i" in ev["ilias"]["tasks"] and "image" in cls.query_types:
            tasks.append(RetrievalTask("i2i", load_embedding_set(smk.input.image_queries), gallery, positives))
        if "t2i" in ev["ilias"]["tasks"] and "text" in cls.query_types:
            tasks.append(RetrievalTask("t2i", load_embedding_set(smk.input.text_queries), gallery, positives))
        k, rerank_k = ev["ilias"]["k"], ev["ilias"]["rerank_shortlist"]
        metric_family = "ilias"
    else:
        tasks.append(RetrievalTask("t2i", load_embedding_set(smk.input.text_queries), gallery, positives))
        k, rerank_k = ev["inquire"]["k"], 100
        metric_family = "inquire"
    results = {}
    for task in tasks:
        log.info("%s %s %s: %d queries, %d gallery rows", w.benchmark, task.name, w.method,
                 len(task.queries), len(gallery))
        if hasattr(method, "set_gallery"):  # re-rankers that look candidates up by id
            method.set_gallery(gallery.ids)
        results[task.name] = {}
        if not cls.reranker_only:  # re-rankers have no full-gallery search of their own
            results[task.name]["search"] = evaluate_search(
                method, task, metric_family, k, chunk_rows=ev["chunk_rows"], shortlist=ev["shortlist"],
                query_batch=ev["query_batch"])
        if p.data == "real" and w.benchmark == "inquire":
            continue  # real INQUIRE re-ranking is INQUIRE-Rerank's fixed candidates (inquire_rerank)
        rerank = evaluate_rerank(method, task, metric_family, rerank_k, k, chunk_rows=ev["chunk_rows"])
        results[task.name]["rerank"] = rerank
        log.info("%s | rerank top-%d %s (%.3f ms / 1k pairs)",
                 results[task.name].get("search", {}).get("metrics", "re-ranker only"), rerank_k,
                 rerank["metrics"], rerank["ms_per_1k_pairs"])
    write_result(smk, cls, method, metric_family, len(gallery), results)


def evaluate_inquire_rerank(smk, method, gallery, positives):
    """INQUIRE-Rerank: each query's fixed 100 candidates re-ranked by the method (Table 3b), scored
    twice: the benchmark's official way (``rerank``: P = relevant candidates) and the paper's
    (``rerank_full_pool``: P = the query's positives in the whole pool, Fullrank's k)."""
    queries = load_embedding_set(smk.input.text_queries)
    candidates = json.loads(Path(smk.input.candidates).read_text())
    labels = json.loads(Path(smk.input.rerank_files).read_text())
    full_pool = rerank_full_pool_positives(queries.ids, labels["fullrank_queries"],
                                           labels["annotations"])
    if hasattr(method, "set_gallery"):
        method.set_gallery(gallery.ids)
    log.info("inquire_rerank %s: %d queries, %d candidate images", smk.wildcards.method,
             len(queries), len(gallery))
    result = rerank_candidates(method, queries, gallery, candidates,
                               {q: sorted(p) for q, p in positives.items()},
                               full_pool_positives=full_pool,
                               k=smk.params.evaluation["inquire"]["k"])
    scored = result.pop("full_pool")
    timing = {key: result[key] for key in ("seconds", "ms_per_1k_pairs", "ms_per_100_pairs",
                                           "shortlist", "num_queries", "gallery_size",
                                           "shortlist_source")}
    log.info("rerank fixed candidates: official %s, full pool %s (%.3f ms / 100 pairs)",
             result["metrics"], scored["metrics"], result["ms_per_100_pairs"])
    return {"rerank": result, "rerank_full_pool": {**timing, **scored}}


def dropped_reports(smk):
    """What the gallery, the query sets and the method's training data left out (quari.dropped)."""
    sets = {key: getattr(smk.input, key) for key in ("gallery", "image_queries", "text_queries")
            if key in smk.input.keys()}
    reports = {key: set_report(path) for key, path in sets.items()}
    reports["training"] = read_training_report(Path(smk.input.model).parent / DROPPED_FILE)
    return reports


def write_result(smk, cls, method, benchmark, gallery_size, results):
    """The evaluation JSON; `benchmark` is the paper's benchmark name (ilias / inquire), the
    setting follows from the gallery size and the mode (quari.reporting.tables)."""
    w, p = smk.wildcards, smk.params
    atomic_write_json(smk.output[0], {
        "run_id": p.run_id, "data": p.data, "benchmark": benchmark, "backbone": w.backbone,
        "method": w.method, "method_type": p.method_type, "label": method.display_label(),
        "model_size": method.model_size(),
        "device": str(method.device), "hardware": hardware_name(method.device), "gallery_size": gallery_size, "tasks": results,
        "dropped": dropped_reports(smk),
    })


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
