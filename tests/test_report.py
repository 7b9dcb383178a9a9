"""results/report.md: every table and figure with its line, run id, data kind, hardware, config."""

import json

import pytest
import yaml

from quari.reporting.report import hardware_of, render_report, write_report


def inputs(tmp_path, data="synthetic"):
    (tmp_path / "results").mkdir()
    (tmp_path / "figures").mkdir()
    tables = []
    for n in (1, 4):
        path = tmp_path / "results" / f"table{n}.md"
        path.write_text(f"# Table {n}: title\n\n## Table {n}a: ilias\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
        tables.append(path)
    figures = []
    for stem in ("fig3_tsne", "fig4_cost_accuracy"):
        path = tmp_path / "figures" / f"{stem}.png"
        path.write_bytes(b"\x89PNG")
        figures.append(path)
    evaluations = []
    for i, hw in enumerate(["NVIDIA H100", "NVIDIA H100", "Xeon (2 threads)"]):
        path = tmp_path / f"ev{i}.json"
        path.write_text(json.dumps({"data": data, "hardware": hw, "device": "cuda"}))
        evaluations.append(path)
    config = {"run_id": "demo-7", "data": data, "methods": {"quari": {}, "finetuned_backbone": {}}}
    return tables, figures, config, evaluations


def test_report_gathers_everything(tmp_path):
    tables, figures, config, evaluations = inputs(tmp_path)
    text = write_report(tmp_path / "results" / "report.md", tables, figures, config, evaluations)
    assert (tmp_path / "results" / "report.md").read_text() == text
    assert "run `demo-7`" in text and "SYNTHETIC" in text
    assert "NVIDIA H100, Xeon (2 threads)" in text  # each machine once
    # each table's rendering, its heading under the report's, with its one-line explanation
    assert "### Table 1: title" in text and "#### Table 4a: ilias" in text
    assert "**table1.** ILIAS search" in text and "**table4.** Ablations" in text
    # figures linked relative to the report
    assert "![fig3_tsne](../figures/fig3_tsne.png)" in text
    assert "![fig4_cost_accuracy](../figures/fig4_cost_accuracy.png)" in text
    # the configuration, as YAML that reads back to the same dict
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == config


def test_real_data_is_labelled_as_such(tmp_path):
    tables, figures, config, evaluations = inputs(tmp_path, data="real")
    text = write_report(tmp_path / "results" / "report.md", tables, figures, config, evaluations)
    assert "REAL" in text and "SYNTHETIC" not in text


def test_disagreeing_data_kind_is_refused(tmp_path):
    tables, figures, config, evaluations = inputs(tmp_path)
    with pytest.raises(ValueError, match="data: real"):
        write_report(tmp_path / "r.md", tables, figures, {**config, "data": "real"}, evaluations)


def test_missing_input_is_named(tmp_path):
    tables, figures, config, evaluations = inputs(tmp_path)
    figures[0].unlink()
    with pytest.raises(FileNotFoundError, match="fig3_tsne.png"):
        write_report(tmp_path / "r.md", tables, figures, config, evaluations)
    assert not (tmp_path / "r.md").exists()


def test_hardware_falls_back_to_device_and_render_checks_data():
    assert hardware_of([{"device": "cpu"}, {"hardware": "A100"}]) == ["A100", "cpu"]
    with pytest.raises(ValueError, match="data"):
        render_report("r", "fake", [], {}, [], [], ".")
