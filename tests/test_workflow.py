"""The whole DAG on a tiny configuration in a temporary directory, a toy baseline included.

The toy baseline is added exactly as the README tells a user to: one module dropped into
``baselines/`` and one entry under ``methods:``.
"""

import subprocess

import pandas as pd
import pytest
import yaml
from tests.builders import TINY
from tests.builders import ROOT, SNAKEMAKE, snakemake


TOY_BASELINE = '''
"""A toy baseline for the workflow test: cosine on the first half of the embedding."""
from quari.methods import StaticProjectionMethod


class FirstHalf(StaticProjectionMethod):
    name = "toy_first_half"
    trainable = False

    def embed(self, x):
        return x[..., : x.shape[-1] // 2]
'''


@pytest.fixture
def toy_baseline():
    path = ROOT / "baselines" / "toy_first_half.py"
    path.write_text(TOY_BASELINE)
    yield
    path.unlink()


def test_dag_end_to_end_on_tiny_config(tmp_path, toy_baseline):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = snakemake(tmp_path, "all", "--configfile", str(config), "--replace-workflow-config")
    assert run.returncode == 0, run.stderr[-4000:]
    for out in ("results/table1.csv", "results/table1.md", "results/table2.csv", "results/table3.csv",
                "figures/fig3_tsne.png", "figures/fig3_tsne.pdf", "figures/fig4_cost_accuracy.png",
                "figures/fig4_cost_accuracy.pdf"):
        assert (tmp_path / out).stat().st_size > 0, out
    table = pd.read_csv(tmp_path / "results/table1.csv")
    ours = table[table["data"] == "synthetic"]
    assert set(ours["backbone"]) == {"tiny-a", "tiny-b"}
    assert {"backbone", "quari", "oracle", "linear_adaptation", "toy"} <= set(ours["method"])
    assert set(ours["setting"].str.split("@").str[0]) == {"i2i", "t2i"}
    assert ours["value"].between(0, 100).all()
    assert ours["paper_value"].isna().all(), "synthetic rows must never be compared with the paper"
    assert (ours["run_id"] == "tiny").all()
    # every rule wrote a log
    logs = list((tmp_path / "results/logs").rglob("*.log"))
    assert len(logs) >= 1 + 2 + 2 + 2 * 5 + 2 * 2 * 5 + 3
    # a second run has nothing to do: nothing is recomputed or overwritten
    again = snakemake(tmp_path, "results/table1.csv", "--configfile", str(config),
                      "--replace-workflow-config", "-n")
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


@pytest.mark.parametrize("change, named", [
    ({"backbones": ["tiny-a", "not-defined"]}, "not-defined"),
    ({"quari": {"model": {}, "train": {"lr_shedule": "released"}}}, "lr_shedule"),
    ({"methods": {"x": {"type": "no_such_method"}}}, "no_such_method"),
    ({"synthetic": {**TINY["synthetic"], "world": {"num_categorys": 3}}}, "num_categorys"),
])
def test_bad_config_fails_before_running(tmp_path, change, named):
    config = tmp_path / "bad.yaml"
    without_toy = {k: v for k, v in TINY["methods"].items() if k != "toy"}
    config.write_text(yaml.safe_dump({**TINY, "methods": without_toy, **change}))
    run = snakemake(tmp_path, "-n", "--configfile", str(config), "--replace-workflow-config")
    assert run.returncode != 0
    assert named in run.stderr + run.stdout
    assert not (tmp_path / "results").exists(), "nothing may run on a bad config"


def test_lint_is_clean():
    run = subprocess.run([str(SNAKEMAKE), "--lint", "--snakefile", str(ROOT / "Snakefile")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Lints for" not in run.stdout + run.stderr, run.stdout + run.stderr
