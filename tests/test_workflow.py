"""The whole DAG on a tiny configuration in a temporary directory, a toy re-ranker included.

The toy re-ranker is added exactly as the README ("Adding a baseline") tells a user to: one
module, kept outside the repository (a file in a temporary folder, named under
``method_packages:``), and one entry under ``methods:``. It declares a side input (the synthetic
world's oracle file, a precomputed array), which the DAG must schedule for it.
"""

import subprocess

import pandas as pd
import pytest
import yaml
from tests.builders import TINY
from tests.builders import (ROOT, SNAKEMAKE, dry_run_jobs, scheduled_inputs, scheduled_jobs,
                            snakemake)

#: the tiny configuration's methods, with a global-feature re-ranker (alpha-QE)
METHODS = {**TINY["methods"], "alpha_qe1": {"type": "alpha_qe", "neighbours": 1}}

TOY_RERANKER = '''
"""A toy re-ranker: cosine of query and candidate inside the query category's true subspace,
read from the synthetic world's oracle file (a side input the workflow prepares)."""
import json

import numpy as np
import torch
import torch.nn.functional as F

from quari.methods import RetrievalMethod


class ToySubspaceReranker(RetrievalMethod):
    name = "toy_subspace_reranker"
    label = "toy subspace re-ranker"
    trainable = False
    uses_training_data = False
    reranker = reranker_only = True
    side_inputs = ("oracle_file",)

    def fit(self, train=None, valid=None, workdir=None, oracle_file=None, **context):
        self._read(oracle_file)
        return self

    def _read(self, path):
        self.oracle_file_ = str(path)
        with np.load(path) as f:
            self.bases_ = torch.from_numpy(f["bases"].astype(np.float32))
            self.category_ = dict(zip(f["query_ids"].tolist(), f["query_categories"].tolist()))

    def prepare(self, queries, query_ids=None):
        return self.bases_[[self.category_[q] for q in query_ids]]

    def score(self, state, rows):
        raise NotImplementedError("a re-ranker only")

    def search(self, *args, **kwargs):
        raise NotImplementedError("a re-ranker only")

    def score_candidates(self, state, queries, candidates, query_ids=None):
        query = torch.einsum("be,bek->bk", queries, state)
        rows = torch.einsum("bne,bek->bnk", candidates, state)
        return F.cosine_similarity(rows, query[:, None], dim=-1)

    def save_state(self, directory):
        (directory / "toy.json").write_text(json.dumps({"oracle_file": self.oracle_file_}))

    def load_state(self, directory):
        self._read(json.loads((directory / "toy.json").read_text())["oracle_file"])
'''


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny configuration run to the end, with the toy re-ranker added the README's way:
    its module in a folder of its own, named under `method_packages`, and one entry under
    `methods`. Returns (work folder, config file, the run)."""
    tmp = tmp_path_factory.mktemp("tiny")
    (tmp / "my_methods").mkdir()
    (tmp / "my_methods" / "toy_reranker.py").write_text(TOY_RERANKER)
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        **TINY, "method_packages": [str(tmp / "my_methods" / "toy_reranker.py")],
        "methods": {**METHODS, "toy": {"type": "toy_subspace_reranker"}}}))
    work = tmp / "work"
    run = snakemake(work, "all", "--configfile", str(config), "--replace-workflow-config")
    return work, config, run


def test_dag_end_to_end_on_tiny_config(tiny_run):
    tmp_path, config, run = tiny_run
    assert run.returncode == 0, run.stderr[-4000:]
    for out in ("results/table1.csv", "results/table1.md", "results/table2.csv", "results/table3.csv",
                "results/table4.csv", "results/report.md",
                "figures/fig3_tsne.png", "figures/fig3_tsne.pdf", "figures/fig4_cost_accuracy.png",
                "figures/fig4_cost_accuracy.pdf"):
        assert (tmp_path / out).stat().st_size > 0, out
    table = pd.read_csv(tmp_path / "results/table1.csv")
    ours = table[table["data"] == "synthetic"]
    assert set(ours["backbone"]) == {"tiny-a", "tiny-b"}
    assert {"backbone", "quari", "oracle", "linear_adaptation"} <= set(ours["method"])
    assert set(ours["setting"].str.split("@").str[0]) == {"i2i", "t2i"}
    assert ours["value"].between(0, 100).all()
    assert ours["paper_value"].isna().all(), "synthetic rows must never be compared with the paper"
    assert (ours["run_id"] == "tiny").all()
    # every rule wrote a log
    logs = list((tmp_path / "results/logs").rglob("*.log"))
    assert len(logs) >= 1 + 2 + 2 + 2 * 6 + 2 * 2 * 6 + 3
    # a second run has nothing to do: nothing is recomputed or overwritten
    again = snakemake(tmp_path, "all", "--configfile", str(config), "--replace-workflow-config",
                      "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    # Snakemake's own report: one self-contained page, every table and figure with its caption
    # (workflow/report/*.rst) and the run's configuration
    report = snakemake(tmp_path, "--report", "results/report.html", "--configfile", str(config),
                       "--replace-workflow-config")
    assert report.returncode == 0, report.stderr[-4000:]
    html = (tmp_path / "results/report.html").read_text()
    for name in ("table1.html", "table2.html", "table3.html", "table4.html", "fig3_tsne.png",
                 "fig4_cost_accuracy.png", "configuration.yaml"):
        assert name in html, name
    for caption in ("Table 1: ILIAS search", "Table 2: INQUIRE text-to-image search",
                    "Table 3: re-ranking", "Table 4: ablations", "Figure 3: t-SNE",
                    "Figure 4: re-ranking time", "The configuration this run used",
                    "SYNTHETIC DATA"):
        assert caption in html, caption
    assert 'src="http' not in html and "mailto:" not in html  # self-contained; no e-mail links
    pages = tmp_path / "results/report"
    assert "<table>" in (pages / "table1.html").read_text()
    assert yaml.safe_load((pages / "configuration.yaml").read_text())["run_id"] == "tiny"


def test_a_toy_reranker_with_a_side_input_is_scheduled_and_evaluated(tiny_run):
    """One module and one config entry: the DAG gives its fit the oracle file it declares (and
    no training collection), evaluates it as a re-ranker on both benchmarks, and the tables
    show its re-ranking rows (Table 3) under its label, never a search row."""
    work, config, run = tiny_run
    assert run.returncode == 0, run.stderr[-4000:]
    # what its fit read: the oracle file of its backbone (the path it kept)
    for backbone in ("tiny-a", "tiny-b"):
        saved = work / f"results/models/toy/{backbone}/method.json"
        assert yaml.safe_load(saved.read_text())["name"] == "toy_subspace_reranker"
        toy_file = work / f"results/models/toy/{backbone}/toy.json"
        read = yaml.safe_load(toy_file.read_text())["oracle_file"]
        assert read == str((work / f"results/embeddings/synthetic/{backbone}/oracle.npz").resolve())
    # from scratch, the DAG schedules the oracle file (embed_synthetic) for the toy's fit, and
    # nothing else
    target = "results/models/toy/tiny-a/method.json"
    fresh = snakemake(work.parent / "fresh", "-n", target, "--configfile", str(config),
                      "--replace-workflow-config")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    listing = fresh.stdout + fresh.stderr
    assert sorted(scheduled_jobs(listing)) == ["embed_synthetic", "train_method"]
    assert scheduled_inputs(listing, "train_method") == {
        target: ["results/embeddings/synthetic/tiny-a/oracle.npz"]}
    for benchmark in ("ilias", "inquire"):
        for backbone in ("tiny-a", "tiny-b"):
            result = yaml.safe_load((work / f"results/eval/{benchmark}/{backbone}/toy.json").read_text())
            assert result["label"] == "toy subspace re-ranker"
            assert all(set(modes) == {"rerank"} for modes in result["tasks"].values()), result["tasks"]
    table3 = pd.read_csv(work / "results/table3.csv")
    toy = table3[table3["method"] == "toy"]
    assert set(toy["table"]) == {"3a", "3b"} and toy["value"].between(0, 100).all()
    assert "toy subspace re-ranker" in (work / "results/table3.md").read_text()
    for name in ("table1", "table2"):
        assert "toy" not in set(pd.read_csv(work / f"results/{name}.csv")["method"])


def test_editing_quari_training_reruns_only_what_trains_with_it(tiny_run, tmp_path):
    """Each job is given only the settings it uses: a change of `quari.train` reruns QuARI's
    fit and what reads it (its evaluations, the tables, the figures, the report), and no job of
    the methods that do not train with QuARI's recipe (identity, linear adaptation, alpha-QE,
    the oracle, the toy re-ranker)."""
    work, config, run = tiny_run
    assert run.returncode == 0, run.stderr[-4000:]
    edited = yaml.safe_load(config.read_text())
    edited["quari"]["train"]["max_steps"] += 1
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(edited))
    dry = snakemake(work, "-n", "all", "--configfile", str(path), "--replace-workflow-config")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = scheduled_jobs(dry.stdout + dry.stderr)
    # results/models/{method}/{backbone}/method.json, results/eval/{benchmark}/{backbone}/{method}.json
    assert sorted(jobs["train_method"]) == ["results/models/quari/tiny-a/method.json",
                                            "results/models/quari/tiny-b/method.json"]
    assert {out.rsplit("/", 1)[1] for out in jobs["evaluate"]} == {"quari.json"}
    assert len(jobs["evaluate"]) == 4
    assert {"tables", "figure_tsne", "figure_cost_accuracy", "report_markdown"} <= set(jobs)
    assert not {"embed_synthetic", "mine_semipositives", "synthetic_ground_truth"} & set(jobs)


def test_costliest_trainings_and_the_data_they_wait_for_are_scheduled_first(tmp_path):
    """Job priorities come from what each method declares (fit_cost, trainable): QuARI's
    trainings before the cheaper fits, every fit before the jobs with nothing to fit, and the
    short data jobs that everything waits for before all of them."""
    from quari.methods import get_method
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "methods": METHODS}))
    dry = snakemake(tmp_path / "work", "-n", "all", "--configfile", str(config),
                    "--replace-workflow-config")
    assert dry.returncode == 0, dry.stderr[-3000:]
    priority = {}
    for job in dry_run_jobs(dry.stdout + dry.stderr):
        if "output" in job:
            priority[job["output"].split(",")[0].strip()] = int(job.get("priority", "0"))
    trains = {path.split("/")[2]: p for path, p in priority.items()
              if path.startswith("results/models/")}
    for method, p in trains.items():
        cls = get_method(METHODS[method].get("type", method))
        assert p == (cls.fit_cost if cls.trainable else 0), method
    assert trains["quari"] > trains["linear_adaptation"] > trains["identity"] == 0
    data = [p for path, p in priority.items()
            if path.startswith(("results/embeddings/", "results/mining/", "results/groundtruth/"))]
    assert data and min(data) > max(trains.values())


@pytest.mark.parametrize("change, named", [
    ({"backbones": ["tiny-a", "not-defined"]}, "not-defined"),
    ({"quari": {"model": {}, "train": {"lr_shedule": "released"}}}, "lr_shedule"),
    ({"methods": {"x": {"type": "no_such_method"}}}, "no_such_method"),
    ({"synthetic": {**TINY["synthetic"], "world": {"num_categorys": 3}}}, "num_categorys"),
])
def test_bad_config_fails_before_running(tmp_path, change, named):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY, "methods": METHODS, **change}))
    run = snakemake(tmp_path, "-n", "--configfile", str(config), "--replace-workflow-config")
    assert run.returncode != 0
    assert named in run.stderr + run.stdout
    assert not (tmp_path / "results").exists(), "nothing may run on a bad config"


def test_lint_is_clean(tmp_path):
    # run from a temporary folder: Snakemake writes its .snakemake/ where it runs, never into
    # the source tree
    run = subprocess.run([str(SNAKEMAKE), "--lint", "--snakefile", str(ROOT / "Snakefile"),
                          "--configfile", str(ROOT / "workflow/config/config.yaml")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Lints for" not in run.stdout + run.stderr, run.stdout + run.stderr
