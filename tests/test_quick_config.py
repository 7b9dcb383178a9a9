"""Dry runs: what workflow/config/quick.yaml schedules (every real stage once, nothing of the
100M gallery or the 5M iNat24 pool), and the released-checkpoint rows of quick.yaml and
paper.yaml."""

from collections import Counter

import yaml

from baselines.quari_released import released_backbones
from tests.builders import ROOT, scheduled_inputs, scheduled_jobs, snakemake

QUICK = ROOT / "workflow/config/quick.yaml"
PAPER = ROOT / "workflow/config/paper.yaml"


def dry_run(tmp_path, configfile):
    run = snakemake(tmp_path, "-n", "results/table1.csv", "--configfile", str(configfile),
                    "--replace-workflow-config")
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def matrix(configfile) -> set[str]:
    config = yaml.safe_load(configfile.read_text())
    return {f"results/eval/{b}/{bb}/{m}.json" for block in config["evaluations"]
            for b in block["benchmarks"] for bb in block["backbones"] for m in block["methods"]}


def test_quick_config_runs_every_real_stage_once_on_small_data(tmp_path):
    output = dry_run(tmp_path, QUICK)
    jobs = scheduled_jobs(output)
    counts = Counter({rule: len(out) for rule, out in jobs.items()})
    evaluations = set(jobs["evaluate"])
    assert evaluations == matrix(QUICK)
    backbones = ["clip-vit-b16@224", "siglip2-vit-b16@512"]
    # the released checkpoints on both backbones and both benchmarks, QuARI trained on one
    assert {f"results/eval/{b}/{bb}/quari_released.json" for b in ("ilias_mini", "inquire_rerank")
            for bb in backbones} <= evaluations
    assert {f"results/eval/{b}/siglip2-vit-b16@512/quari.json"
            for b in ("ilias_mini", "inquire_rerank")} <= evaluations
    outputs = {o for out in jobs.values() for o in out}
    # data: ILIAS core, one mini-ILIAS shard, INQUIRE-Rerank, COCO; never the 100M YFCC
    # distractors nor the 5M iNat24 pool
    located = {o for o in outputs if o.startswith("results/data/") and o.endswith(".json")}
    assert {f"results/data/{s}.json" for s in ("ilias_core", "inquire_rerank", "coco")} <= located
    assert not {o for o in located if "yfcc" in o or o.startswith("results/data/inquire.json")}
    config = yaml.safe_load(QUICK.read_text())
    assert config["real"]["ilias"]["mini_shards"] == 1
    assert config["real"]["collections"]["coco"]["split"] == "val2017"
    outputs = {o for out in jobs.values() for o in out}
    assert not {o for o in outputs if o.startswith(("results/embeddings/inquire/",
                                                    "results/local_descriptors/"))
                or (o.startswith("results/embeddings/ilias/") and o.endswith("/gallery"))
                or "yfcc" in o}
    for backbone in backbones:  # ILIAS queries, the mini gallery, Rerank's candidates and queries
        for path in ("ilias/{}/image_queries", "ilias/{}/text_queries", "ilias_mini/{}/gallery",
                     "inquire_rerank/{}/gallery", "inquire_rerank/{}/text_queries"):
            assert "results/embeddings/" + path.format(backbone) in outputs, path
    # a training collection only where something is trained on it (QuARI), mined once
    assert jobs["assemble_training_set"] == ["results/embeddings/captions/siglip2-vit-b16@512/train"]
    assert jobs["mine_semipositives"] == ["results/mining/captions/siglip2-vit-b16@512/semipositives.npz"]
    # the released checkpoints are fitted without any training data
    trained = scheduled_inputs(output, "train_method")
    for backbone in backbones:
        assert trained[f"results/models/quari_released/{backbone}/method.json"] in ([], [""])
    # tables and both figures, Figure 3 from the mini-ILIAS gallery and Rerank's candidates
    assert counts["tables"] == counts["figure_tsne"] == counts["figure_cost_accuracy"] == 1
    tsne = set(scheduled_inputs(output, "figure_tsne")["figures/fig3_tsne.png"])
    assert {"results/embeddings/ilias_mini/siglip2-vit-b16@512/gallery",
            "results/embeddings/inquire_rerank/siglip2-vit-b16@512/gallery",
            "results/models/quari/siglip2-vit-b16@512/method.json"} <= tsne
    figure4 = set(scheduled_inputs(output, "figure_cost_accuracy")["figures/fig4_cost_accuracy.png"])
    assert "results/eval/ilias_mini/siglip2-vit-b16@512/quari.json" in figure4
    assert "results/eval/inquire_rerank/siglip2-vit-b16@512/quari_released.json" in figure4


def test_paper_config_schedules_the_released_checkpoint_rows(tmp_path):
    jobs = scheduled_jobs(dry_run(tmp_path, PAPER))
    released = {e for e in jobs["evaluate"] if e.endswith("/quari_released.json")}
    config = yaml.safe_load(PAPER.read_text())
    # every paper backbone with a release, on the ILIAS galleries
    with_release = set(released_backbones()) & set(config["backbones"])
    assert with_release == {"clip-vit-b16@224", "siglip2-vit-b16@512", "siglip2-vit-l16@512"}
    assert {f"results/eval/{b}/{bb}/quari_released.json" for b in ("ilias", "ilias_mini")
            for bb in with_release} <= released
    assert "results/eval/inquire_rerank/siglip2-vit-l16@512/quari_released.json" in released
    assert {f"results/models/quari_released/{bb}/method.json" for bb in with_release} == \
        {m for m in jobs["train_method"] if "/quari_released/" in m}


def test_a_released_checkpoint_on_a_backbone_without_one_is_refused_at_load(tmp_path):
    config = yaml.safe_load(QUICK.read_text())
    config["backbones"].append("clip-vit-l14@336")
    config["evaluations"][0]["backbones"].append("clip-vit-l14@336")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "-n", "results/table1.csv", "--configfile", str(path),
                    "--replace-workflow-config")
    message = run.stdout + run.stderr
    assert run.returncode != 0
    assert "no released QuARI checkpoint was trained on backbone clip-vit-l14@336" in message
    assert "clip-vit-l14@224" in message
