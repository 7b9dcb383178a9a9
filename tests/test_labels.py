"""Honest labels: a synthetic row says so, and a QuARI row smaller than the paper's says its size."""

from quari.quari_method import QuARIMethod
from quari.reporting.tables import evaluation_rows, write_table

from tests.builders import PAPER, evaluation


def test_quari_size_is_told_when_it_is_not_the_papers():
    assert QuARIMethod().model_size() == ""  # the released model: H 512, 4 layers, rank 64
    small = QuARIMethod(model={"hidden_dim": 64, "num_layers": 1, "rank": 16, "nhead": 4})
    assert small.model_size() == "H 64, 1 layer, rank 16; CPU-size"
    larger = QuARIMethod(model={"hidden_dim": 512, "num_layers": 6})  # the CLIP-L checkpoint's depth
    assert larger.model_size() == "H 512, 6 layers, rank 64"


def test_markdown_rows_say_synthetic_and_quari_its_size(tmp_path):
    size = QuARIMethod(model={"hidden_dim": 64, "num_layers": 1, "rank": 16}).model_size()
    evs = []
    for benchmark in ("ilias", "inquire"):
        for method in ("identity", "quari", "quari_no_noise"):
            ev = evaluation(method, method.split("_")[0], "syn-b256", benchmark=benchmark,
                            data="synthetic", gallery=6250)
            ev["model_size"] = size if method.startswith("quari") else ""
            evs.append(ev)
    rows = evaluation_rows(evs)
    for name in ("1", "2", "4"):
        md_path = tmp_path / f"table{name}.md"
        write_table(rows, PAPER, name, tmp_path / f"table{name}.csv", md_path)
        lines = md_path.read_text().splitlines()
        synthetic = [line for line in lines if line.startswith("| syn-b256")]
        assert synthetic, name
        assert all(line.startswith("| syn-b256 (synthetic) |") for line in synthetic), name
        # the paper's rows keep their backbone name and say nothing of size
        paper_rows = [line for line in lines if line.startswith("| ") and "†" in line]
        assert paper_rows and not any("synthetic" in line or "CPU-size" in line
                                      for line in paper_rows), name
    table1 = (tmp_path / "table1.md").read_text()
    assert "| syn-b256 (synthetic) | QuARI (H 64, 1 layer, rank 16; CPU-size) |" in table1
    assert "| syn-b256 (synthetic) | backbone |" in table1
    table4 = (tmp_path / "table4.md").read_text()
    assert "| syn-b256 (synthetic) | QuARI, no noise (H 64, 1 layer, rank 16; CPU-size) |" in table4
