"""The real-data DAG: the paper configuration's schedule, and a real run on generated files.

1. ``snakemake -n`` on ``workflow/config/paper.yaml`` schedules every (benchmark, backbone,
   method) that Tables 1a, 1b and 2 report (derived here from paper_numbers.csv, independently of
   the config), with the expected number of download, ground-truth, embedding, mining and
   training jobs, and Table 3's re-rankers with their inputs (DINOv2 descriptors of the ILIAS
   queries and of SigLIP-L's shortlisted images; INQUIRE-Rerank's images for the open VLMs).
2. The whole real-data chain on small files in the official formats (ILIAS webdataset shards and
   core folder, INQUIRE CSVs, an INQUIRE-Rerank parquet, a clip-retrieval folder, COCO / CC12M /
   UnED) with a tiny random CLIP, SigLIP, DINOv2 and LLaVA loaded from local folders through the
   hub code path: locate -> ground truth -> embed (and local descriptors, extracted images) ->
   mine -> train -> evaluate -> tables and figures; INQUIRE-Rerank scored both ways (official,
   and against every positive in the pool, counted from the Fullrank CSVs of both splits).
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from quari.store import load_embedding_set, load_positives
from tests.builders import save_tiny_clip, save_tiny_siglip
from tests.builders import RERANK_QUERIES, make_collections, make_ilias, make_inquire, make_rerank
from tests.builders import save_tiny_ames_checkpoint
from tests.builders import tiny_detector, tiny_dinov2
from tests.builders import build_tiny_llava
from tests.builders import scheduled_inputs, scheduled_jobs, snakemake, tiny_real_config
from tests.builders import PAPER_CSV, ROOT



def required_evaluations() -> set[str]:
    """Evaluation files the paper's Tables 1a, 1b and 2 need, read off paper_numbers.csv."""
    paper = pd.read_csv(PAPER_CSV)
    needed = set()
    for _, row in paper[paper["table"].isin(["1a", "1b", "2"])].iterrows():
        method = {"backbone": "identity"}.get(row["method"], row["method"])
        if row["table"] == "2":
            benchmark = "inquire"
        else:  # ILIAS: the 5M gallery is mini-ILIAS, the 100M gallery the full one
            benchmark = "ilias_mini" if row["setting"].endswith("@5M") else "ilias"
        needed.add(f"results/eval/{benchmark}/{row['backbone']}/{method}.json")
    return needed


def table_3b_open_vlms() -> set[str]:
    """Table 3b's VLM rows of paper_numbers.csv that an open model runs (not VILA, not GPT)."""
    from baselines.vlm.scorer import list_vlms
    paper = pd.read_csv(PAPER_CSV)
    rows = set(paper[paper["table"] == "3b"]["method"])
    return {m for m in rows if m in list_vlms()}


def table_3_reranker_evaluations() -> set[str]:
    """Evaluation files of Table 3a's local-feature rows and Table 3b's open-VLM rows."""
    paper = pd.read_csv(PAPER_CSV)
    local = set(paper[paper["table"] == "3a"]["method"]) & {"chamfer", "spatial_verification",
                                                             "ames"}
    return ({f"results/eval/ilias/siglip-vit-l16@384/{m}.json" for m in local}
            | {f"results/eval/inquire_rerank/siglip2-vit-l16@512/{m}.json"
               for m in table_3b_open_vlms()})


def test_table_3_rerankers_are_all_open_rows_of_the_paper():
    # 3 local-feature rows of 3a (Chamfer, spatial verification, AMES); BLIP-2, InstructBLIP, PaliGemma and three LLaVAs of 3b
    assert len(table_3_reranker_evaluations()) == 3 + 6


def test_paper_config_schedules_the_whole_matrix(tmp_path):
    run = snakemake(tmp_path, "-n", "results/table1.csv", "--configfile",
                    str(ROOT / "workflow/config/paper.yaml"), "--replace-workflow-config")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = scheduled_jobs(run.stdout + run.stderr)
    evaluations = set(jobs["evaluate"])
    assert required_evaluations() <= evaluations, sorted(required_evaluations() - evaluations)
    # 1a: 7 backbones x {ilias, ilias_mini} x {identity, quari}; 1b: 7 x 2 more on ilias;
    # 2: 4 backbones x {identity, quari} on inquire
    assert len(required_evaluations()) == 7 * 2 * 2 + 7 * 2 + 4 * 2
    config = yaml.safe_load((ROOT / "workflow/config/paper.yaml").read_text())
    matrix = {f"results/eval/{b}/{bb}/{m}.json" for block in config["evaluations"]
              for b in block["benchmarks"] for bb in block["backbones"] for m in block["methods"]}
    # nothing beyond the matrix is evaluated (Figure 4 draws from it)
    assert evaluations <= matrix, sorted(evaluations - matrix)
    assert "results/eval/inquire_rerank/siglip2-vit-l16@512/quari.json" in evaluations
    # Table 3a's global-feature re-rankers and Table 4's fine-tuned backbone
    assert {f"results/eval/ilias/siglip-vit-l16@384/alpha_qe{n}.json" for n in (1, 2, 5)} <= evaluations
    assert {f"results/eval/{b}/siglip2-vit-l16@512/finetuned_backbone.json"
            for b in ("ilias", "ilias_mini", "inquire")} <= evaluations
    ilias_backbones = {e.split("/")[3] for e in evaluations if e.startswith("results/eval/ilias/")}
    inquire_backbones = {e.split("/")[3] for e in evaluations if "/inquire/" in e}
    counts = Counter({rule: len(out) for rule, out in jobs.items()})
    assert counts["locate_data"] == 5 + 4  # ILIAS core, mini, YFCC; INQUIRE, Rerank; 4 collections
    assert counts["ilias_ground_truth"] == counts["inquire_ground_truth"] == 1
    assert counts["inquire_rerank_ground_truth"] == 1
    for rule in ("embed_ilias_image_queries", "embed_ilias_text_queries"):
        assert counts[rule] == len(ilias_backbones) == 7, rule
    galleries = Counter(g.split("/")[2] for g in jobs["assemble_gallery"])  # over their parts
    assert galleries["ilias"] == galleries["ilias_mini"] == len(ilias_backbones) == 7
    assert galleries["inquire"] == counts["embed_inquire_text_queries"] == len(inquire_backbones) == 5
    trained = {tuple(m.split("/")[2:4]) for m in jobs["train_method"]}
    assert trained == {(e.split("/")[4].removesuffix(".json"), e.split("/")[3]) for e in evaluations}
    # a training set per backbone that trains on it: captions for all 8, UnED for the 7 of Table 1b
    assert sorted(jobs["assemble_training_set"]) == sorted(
        [f"results/embeddings/captions/{bb}/train" for bb in config["backbones"]]
        + [f"results/embeddings/uned/{bb}/train" for bb in ilias_backbones])
    assert counts["tables"] == counts["figure_tsne"] == counts["figure_cost_accuracy"] == 1
    assert table_3_reranker_evaluations() <= evaluations, sorted(
        table_3_reranker_evaluations() - evaluations)
    # 3a: descriptors of the ILIAS image queries once, of SigLIP-L's shortlisted images once
    assert jobs["extract_ilias_query_local_descriptors"] == ["results/local_descriptors/ilias/queries.npz"]
    assert jobs["ilias_shortlist_ids"] == [
        "results/local_descriptors/ilias/siglip-vit-l16@384/shortlist_ids.txt"]
    assert jobs["assemble_ilias_database_local_descriptors"] == [
        "results/local_descriptors/ilias/siglip-vit-l16@384/database.npz"]
    parts = config["real"]["fan_out"]["local_descriptor_jobs"]
    assert sorted(jobs["extract_ilias_database_local_descriptors"]) == [
        f"results/local_descriptors/ilias/siglip-vit-l16@384/database-parts/{p:04d}.npz"
        for p in range(parts)]
    # 3b: INQUIRE-Rerank's images extracted once, for its embedding and the VLMs alike
    assert jobs["extract_inquire_rerank_images"] == ["results/data/inquire_rerank_images"]
    # 3b is also scored against all positives in the pool: every INQUIRE-Rerank evaluation (and
    # only those) reads the Rerank manifest, which lists the Fullrank CSVs that count them
    inputs = scheduled_inputs(run.stdout + run.stderr, "evaluate")
    assert set(inputs) == evaluations
    reads_labels = {e for e, i in inputs.items() if "results/data/inquire_rerank.json" in i}
    assert reads_labels == {e for e in evaluations if e.startswith("results/eval/inquire_rerank/")}
    # identity, quari and the released checkpoint, and the VLMs
    assert len(reads_labels) == 3 + len(table_3b_open_vlms())
    # Figure 4 draws ILIAS from Table 3a's setting (SigLIP-L's top-1k, local re-rankers included)
    # and INQUIRE from Table 3b's (INQUIRE-Rerank on SigLIP2-L, the VLMs included)
    figure4 = scheduled_inputs(run.stdout + run.stderr, "figure_cost_accuracy")
    fig_inputs = set(figure4["figures/fig4_cost_accuracy.png"])
    assert table_3_reranker_evaluations() <= fig_inputs
    assert "results/eval/ilias/siglip-vit-l16@384/quari.json" in fig_inputs
    assert "results/eval/inquire_rerank/siglip2-vit-l16@512/quari.json" in fig_inputs
    assert not {i for i in fig_inputs if i.startswith("results/eval/ilias_mini/")
                or (i.startswith("results/eval/ilias/") and "/siglip-vit-l16@384/" not in i)}
    # the local-feature re-rankers are evaluated on ILIAS only, the VLMs on INQUIRE-Rerank only
    for e in evaluations:
        method = e.split("/")[4].removesuffix(".json")
        if method in ("chamfer", "spatial_verification", "ames"):
            assert e.startswith("results/eval/ilias/siglip-vit-l16@384/"), e
        if method in table_3b_open_vlms():
            assert e.startswith("results/eval/inquire_rerank/"), e


# ----------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_real_data_dag_end_to_end_on_generated_official_files(tmp_path):
    data = tmp_path / "data"
    ilias = make_ilias(data / "ilias")
    inquire = make_inquire(data / "inquire")
    rerank = make_rerank(data / "inquire" / "rerank" / "data" / "test-00000-of-00001.parquet")
    make_collections(data)
    models = tmp_path / "models"
    save_tiny_clip(models / "clip")
    save_tiny_siglip(models / "siglip")
    tiny_dinov2(models / "dinov2")
    tiny_detector(models / "ames_detector.pt", dim=32)  # AMES's detector picks the patches
    save_tiny_ames_checkpoint(models / "ames.pt", local_dim=32)
    build_tiny_llava(models / "llava")
    config = tmp_path / "tiny-real.yaml"
    config.write_text(yaml.safe_dump(tiny_real_config(data, models, inquire["precomputed"])))
    work = tmp_path / "work"
    cfg = yaml.safe_load(config.read_text())
    evaluations = [f"results/eval/{b}/{bb}/{m}.json" for block in cfg["evaluations"]
                   for b in block["benchmarks"] for bb in block["backbones"] for m in block["methods"]]
    # targets: every evaluation and Figure 3; the tables are built below from the same JSONs.
    # (results/table1.csv also waits for Figure 4, whose script still expects a re-ranking entry
    # in every INQUIRE result; see the report of this change.)
    targets = [*evaluations, "figures/fig3_tsne.png"]
    run = snakemake(work, *targets, "--configfile", str(config), "--replace-workflow-config")
    assert run.returncode == 0, run.stderr[-5000:]
    res = work / "results"
    from quari.reporting.tables import build_table, evaluation_rows, load_evaluations
    rows = evaluation_rows(load_evaluations([work / e for e in evaluations]))
    paper = pd.read_csv(PAPER_CSV)
    for name in ("1", "2", "3"):
        build_table(rows, paper, name).to_csv(res / f"table{name}.csv", index=False)

    # ground truth in official ids
    truth = load_positives(res / "groundtruth/ilias.json")
    assert set(truth) == set(ilias["queries"]) | set(ilias["texts"])
    assert all(all(p.split("/")[0] == q.split("/")[0] for p in ps) for q, ps in truth.items())
    assert load_positives(res / "groundtruth/inquire.json") == {q: set(p) for q, p in inquire["truth"].items()}
    candidates = json.loads((res / "groundtruth/inquire_rerank_candidates.json").read_text())
    assert {q: c for q, c in candidates.items()} == {q: c for q, (c, _) in rerank.items()}

    # the embedding cache: official ids, the 100M-style gallery assembled from parts
    gallery = load_embedding_set(res / "embeddings/ilias/tiny-siglip/gallery")
    assert sorted(gallery.ids) == sorted(ilias["positives"] + ilias["yfcc"])
    mini = load_embedding_set(res / "embeddings/ilias_mini/tiny-clip/gallery")
    assert sorted(mini.ids) == sorted(ilias["positives"] + ilias["mini"]) and mini.dim == 24
    pool = load_embedding_set(res / "embeddings/inquire/tiny-clip/gallery")  # precomputed
    assert pool.ids == inquire["pool"] and pool.dim == 24
    pool = load_embedding_set(res / "embeddings/inquire/tiny-siglip/gallery")  # from images
    assert sorted(pool.ids) == sorted(inquire["pool"]) and pool.dim == 32
    assert not list((res / "embeddings").rglob(".*.partial"))

    # tables: one row per evaluated setting, the paper's benchmark names
    table1 = pd.read_csv(res / "table1.csv")
    ours = table1[table1["data"] == "real"]
    assert set(ours["benchmark"]) == {"ilias"} and set(ours["backbone"]) == {"tiny-clip", "tiny-siglip"}
    assert {"backbone", "quari", "linear_adaptation", "quari_uned"} <= set(ours["method"])
    gallery_sizes = {len(ilias["positives"]) + len(ilias["yfcc"]), len(ilias["positives"]) + len(ilias["mini"])}
    assert set(ours["setting"]) == {f"{t}@{n}" for t in ("i2i", "t2i") for n in gallery_sizes}
    assert ours["value"].between(0, 100).all()
    table2 = pd.read_csv(res / "table2.csv")
    assert set(table2[table2["data"] == "real"]["metric"]) == {"mAP@5", "nDCG@5", "MRR"}
    table3 = pd.read_csv(res / "table3.csv")
    rerank_rows = table3[(table3["data"] == "real") & (table3["benchmark"] == "inquire")]
    # the fixed candidate lists, scored the official way and against every positive in the pool
    assert set(rerank_rows["setting"]) == {"rerank top-5, official Rerank scoring",
                                           "rerank top-5, full-pool scoring"}
    manifest = json.loads((res / "data/inquire_rerank.json").read_text())
    assert sorted(map(Path, manifest["fullrank_queries"])) == sorted(
        data / "inquire" / f"inquire_queries_{s}.csv" for s in ("test", "val"))
    # the backbone's full-pool scores, recomputed here from the made files: P of each Rerank
    # query = its Fullrank query's annotated images (query "9" of the validation split, "3")
    full_pool_p = {RERANK_QUERIES[0]: len(set(inquire["val_truth"]["9"])),
                   RERANK_QUERIES[1]: len(inquire["truth"]["3"])}
    backbone = json.loads((res / "eval/inquire_rerank/tiny-siglip/identity.json").read_text())
    full = backbone["tasks"]["t2i"]["rerank_full_pool"]
    text_queries = load_embedding_set(res / "embeddings/inquire_rerank/tiny-siglip/text_queries")
    rerank_gallery = load_embedding_set(res / "embeddings/inquire_rerank/tiny-siglip/gallery")
    row_of = rerank_gallery.index_of()
    aps = []
    for n, query in enumerate(text_queries.ids):
        cands, relevant = rerank[query]
        scores = [float(np.dot(np.asarray(rerank_gallery.embeddings[row_of[c]], np.float64),
                               np.asarray(text_queries.embeddings[n], np.float64))) for c in cands]
        ranked = [cands[j] for j in np.argsort(-np.asarray(scores), kind="stable")][:5]
        hits, precision_sum = 0, 0.0
        for rank, c in enumerate(ranked, 1):
            if c in relevant:
                hits += 1
                precision_sum += hits / rank
        aps.append(precision_sum / min(5, full_pool_p[query]))
    assert full["num_positives"] == [full_pool_p[q] for q in text_queries.ids]
    assert full["metrics"]["mAP@5"] == pytest.approx(np.mean(aps), abs=1e-3)
    best = rerank_rows[(rerank_rows["method"] == "best_possible")
                       & (rerank_rows["setting"] == "rerank top-5, full-pool scoring")]
    ideal = [min(5, len(rerank[q][1])) / min(5, full_pool_p[q]) for q in text_queries.ids]
    assert best.set_index("metric").loc["mAP@5", "value"] == pytest.approx(
        100 * np.mean(ideal), abs=0.01)
    assert (work / "figures/fig3_tsne.png").stat().st_size > 0

    # Table 3a: DINOv2 descriptors of every image query, and of exactly the gallery images in
    # some image query's cosine top-(8 + 2), recomputed here by brute force
    from baselines.local_features.matching import load_local_descriptors
    local = res / "local_descriptors/ilias"
    queries = load_local_descriptors(local / "queries.npz")
    assert sorted(queries.ids) == sorted(ilias["queries"]) and set(queries.counts) == {12}
    image_queries = load_embedding_set(res / "embeddings/ilias/tiny-siglip/image_queries")
    g = np.asarray(gallery.embeddings, dtype=np.float32)
    q = np.asarray(image_queries.embeddings, dtype=np.float32)
    top = (-(q / np.linalg.norm(q, axis=1, keepdims=True))
           @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T).argsort(1)[:, :10]
    shortlisted = sorted({gallery.ids[r] for r in top.ravel()})
    assert (local / "tiny-siglip/shortlist_ids.txt").read_text().split() == shortlisted
    database = load_local_descriptors(local / "tiny-siglip/database.npz")
    assert database.ids == shortlisted and set(database.counts) == {6}
    for method in ("chamfer", "spatial_verification", "ames"):  # image queries, re-ranking only
        result = json.loads((res / f"eval/ilias/tiny-siglip/{method}.json").read_text())
        assert set(result["tasks"]) == {"i2i"} and set(result["tasks"]["i2i"]) == {"rerank"}
        assert result["tasks"]["i2i"]["rerank"]["shortlist"] == 8
    table3a = table3[(table3["data"] == "real") & (table3["benchmark"] == "ilias")]
    assert {"chamfer", "spatial_verification", "ames"} <= set(table3a["method"])
    # Table 3b: the VLM re-ranked the benchmark's candidates, read from the extracted images
    images = dict(line.split("\t") for line in
                  (res / "data/inquire_rerank_images.tsv").read_text().splitlines())
    assert set(images) == {c for cands, _ in rerank.values() for c in cands}
    assert all((res / "data" / path).is_file() for path in images.values())
    vlm = json.loads((res / "eval/inquire_rerank/tiny-siglip/llava_1.5_13b.json").read_text())
    assert vlm["tasks"]["t2i"]["rerank"]["shortlist_source"] == "benchmark"
    assert "llava_1.5_13b" in set(rerank_rows["method"])
    again = snakemake(work, *targets, "--configfile", str(config),
                      "--replace-workflow-config", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_missing_files_are_listed_when_downloads_are_off(tmp_path):
    models = tmp_path / "models"
    cfg = tiny_real_config(tmp_path / "nothing-here", models, str(tmp_path / "vit-b-16"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path / "work", "results/data/inquire.json", "--configfile", str(config),
                    "--replace-workflow-config", timeout=300)
    assert run.returncode != 0
    log = (tmp_path / "work/results/logs/data/locate/inquire.log").read_text()
    assert "inquire_queries_test.csv" in log and "inquire_annotations.csv" in log


# ----------------------------------------------------------------------------- Table 3 inputs


def test_default_offline_config_schedules_no_real_reranker_inputs(tmp_path):
    run = snakemake(tmp_path, "-n", "results/table1.csv", "--configfile",
                    str(ROOT / "workflow/config/config.yaml"))
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = scheduled_jobs(run.stdout + run.stderr)
    assert "evaluate" in jobs
    assert not {"ilias_shortlist_ids", "extract_ilias_query_local_descriptors",
                "extract_ilias_database_local_descriptors",
                "assemble_ilias_database_local_descriptors", "extract_inquire_rerank_images"} & set(jobs)


@pytest.mark.parametrize("method, entry, benchmark", [
    ("chamfer", {}, "ilias_mini"),
    ("llava_1.5_13b", {"type": "vlm_reranker", "model": "llava_1.5_13b"}, "ilias")])
def test_a_reranker_on_a_benchmark_without_its_inputs_is_rejected(tmp_path, method, entry, benchmark):
    cfg = tiny_real_config(tmp_path / "data", tmp_path / "models", str(tmp_path / "vit-b-16"))
    cfg["methods"][method] = entry
    cfg["evaluations"].append({"benchmarks": [benchmark], "backbones": ["tiny-siglip"],
                               "methods": [method]})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path / "work", "-n", "--configfile", str(config),
                    "--replace-workflow-config", timeout=300)
    assert run.returncode != 0
    message = run.stdout + run.stderr
    assert f"{method} ({entry.get('type', method)}) re-ranks" in message
    assert f"not ['{benchmark}']" in message


def test_gallery_items_finds_shortlisted_positives_and_distractors(tmp_path):
    from quari.data import ilias
    expected = make_ilias(tmp_path / "ilias")
    positive_tars = tmp_path / "ilias/server/ilias_core"
    yfcc = sorted((tmp_path / "ilias/server/yfcc100m").glob("*.tar"))
    wanted = [expected["yfcc"][-1], expected["positives"][1], expected["yfcc"][0]]
    items = ilias.gallery_items(wanted, positive_tars, yfcc)
    assert [i for i, _ in items] == wanted
    # the same bytes as the full listings the gallery embedding reads
    full = dict(ilias.positive_items(positive_tars))
    for tar in yfcc:
        full.update(ilias.distractor_items(tar))
    assert all(ref() == full[i]() for i, ref in items)
    # only the shards holding a wanted id are read: the other one may be unreadable
    only_first = [expected["yfcc"][0]]
    yfcc[-1].write_bytes(b"not a tar")
    assert [i for i, _ in ilias.gallery_items(only_first, positive_tars, yfcc)] == only_first
    with pytest.raises(ValueError, match="in no positive or distractor shard"):
        ilias.gallery_items(["yfcc100m_000000.tar/nope"], positive_tars, yfcc[:1])


def test_shortlist_ids_are_the_union_of_every_querys_top_k():
    from baselines.local_features.descriptors import shortlist_ids
    from quari.store import EmbeddingSet
    rng = torch.Generator().manual_seed(0)
    gallery = torch.randn(50, 8, generator=rng).numpy()
    queries = torch.randn(7, 8, generator=rng).numpy()
    g = EmbeddingSet(gallery, [f"g{i:02d}" for i in range(50)])
    q = EmbeddingSet(queries, [f"q{i}" for i in range(7)])
    # brute force: cosine of every pair, each query's k best rows
    gn = gallery / (gallery ** 2).sum(1, keepdims=True) ** 0.5
    qn = queries / (queries ** 2).sum(1, keepdims=True) ** 0.5
    top = (-(qn @ gn.T)).argsort(1)[:, :4]
    assert shortlist_ids(q, g, 4, chunk_rows=16, batch_size=3) == sorted(
        {f"g{r:02d}" for r in top.ravel()})
    assert shortlist_ids(q, g, 50) == sorted(g.ids)
