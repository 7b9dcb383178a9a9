"""quari.reporting.compare: a method against a reference on every result of a run."""

import json

import pytest

from quari.reporting.compare import compare, main


def write(root, benchmark, backbone, method, metrics_by_task):
    path = root / benchmark / backbone / f"{method}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tasks": {t: {"search": {"metrics": m}, "rerank": {"metrics": {}}}
                                          for t, m in metrics_by_task.items()}}))


def test_every_metric_compared_and_one_below_fails(tmp_path, capsys):
    write(tmp_path, "ilias", "b1", "identity", {"i2i": {"mAP@1k": 0.2}, "t2i": {"mAP@1k": 0.3}})
    write(tmp_path, "ilias", "b1", "quari", {"i2i": {"mAP@1k": 0.3}, "t2i": {"mAP@1k": 0.3}})
    write(tmp_path, "inquire", "b1", "identity", {"t2i": {"mAP@50": 0.5, "MRR": 0.8}})
    write(tmp_path, "inquire", "b1", "quari", {"t2i": {"mAP@50": 0.6, "MRR": 0.9}})
    write(tmp_path, "inquire", "b2", "identity", {"t2i": {"mAP@50": 0.5}})  # no quari: skipped
    rows = compare(tmp_path)
    assert [(r["benchmark"], r["task"], r["metric"], r["above"]) for r in rows] == [
        ("ilias", "i2i", "mAP@1k", True), ("ilias", "t2i", "mAP@1k", False),  # a tie is not above
        ("inquire", "t2i", "MRR", True), ("inquire", "t2i", "mAP@50", True)]
    assert main([str(tmp_path)]) == 1
    assert "no, in 1 comparison(s)" in capsys.readouterr().out


def test_all_above_passes_and_nothing_to_compare_is_an_error(tmp_path):
    write(tmp_path, "ilias", "b1", "identity", {"i2i": {"mAP@1k": 0.2}})
    write(tmp_path, "ilias", "b1", "quari", {"i2i": {"mAP@1k": 0.25}})
    assert main([str(tmp_path)]) == 0
    with pytest.raises(FileNotFoundError):
        compare(tmp_path / "empty")
