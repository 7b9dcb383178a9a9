"""Nothing silently wrong (issue #15): permissions, provenance of caches, safe paths, dropped
items, settings checked at load, errors that name the file and say what to do."""

import os
import stat
from pathlib import Path

import pytest

from quari.store import atomic_write_json, atomic_write_text


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_outputs_get_the_users_umask_not_0600(tmp_path, umask, mask):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"a": 1})
    # an ordinary open() is the reference
    with open(tmp_path / "reference.txt", "w") as f:
        f.write("x")
    want = stat.S_IMODE((tmp_path / "reference.txt").stat().st_mode)
    assert want == 0o666 & ~mask
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want


# ---------------------------------------------------------------------------------------------
# ids and names from data never become paths outside their folder

HOSTILE_IDS = ["../../../x", "/abs/x", "..", "a/../../y", "ok\nline"]


def _rerank_parquet(path, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {"image": [{"bytes": f"jpeg of {i}".encode(), "path": "p.jpg"} for i in ids],
            "query": ["q"] * len(ids), "relevant": [1] * len(ids),
            "inat24_image_id": [str(i) for i in ids]}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


def test_rerank_image_ids_that_are_paths_stay_inside_the_output_folder(tmp_path):
    from quari.data import inquire
    work = tmp_path / "deep" / "er" / "results"
    ids = ["12345", *HOSTILE_IDS, str(tmp_path / "abs-target")]
    _rerank_parquet(tmp_path / "r.parquet", ids)
    items = inquire.extract_rerank_images([tmp_path / "r.parquet"], work / "img")
    assert [i for i, _ in items] == ids  # ids unchanged, only their file names are mapped
    out = (work / "img").resolve()
    for image_id, path in items:
        assert Path(path).resolve().parent == out, (image_id, path)
        assert Path(path).read_bytes() == f"jpeg of {image_id}".encode()
    assert Path(items[0][1]).name == "12345.jpg"  # a plain id keeps its name
    assert len({p for _, p in items}) == len(ids)
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(["r.parquet", *(Path(p).name for _, p in items)])


@pytest.mark.parametrize("bad", ["../../outside.jpg", "/etc/hostname", "a/../../b.jpg"])
def test_image_paths_of_training_collections_stay_under_their_root(tmp_path, bad):
    import json

    import pandas as pd

    from quari.data import collections
    from quari.paths import UnsafePathError
    (tmp_path / "images").mkdir()
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": bad}],
                                "annotations": [{"id": 1, "image_id": 1, "caption": "c"}]}))
    with pytest.raises(UnsafePathError, match="file_name"):
        collections.coco_pairs(coco, tmp_path / "images")
    uned = tmp_path / "uned.txt"
    uned.write_text(f"ok/a.jpg,1,d\n{bad},2,d\n")
    with pytest.raises(UnsafePathError, match="uned.txt:2"):
        collections.uned_pairs(uned, tmp_path / "images")
    table = tmp_path / "t.csv"
    pd.DataFrame({"img": [bad], "cap": ["c"]}).to_csv(table, index=False)
    with pytest.raises(UnsafePathError, match="t.csv"):
        collections.table_pairs(table, tmp_path / "images", "img", "cap")


def test_safe_file_name_keeps_plain_ids_and_maps_the_rest_apart():
    from quari.paths import safe_file_name
    assert safe_file_name("12345") == "12345" and safe_file_name("a_b-c.d") == "a_b-c.d"
    mapped = [safe_file_name(i) for i in HOSTILE_IDS]
    assert all("/" not in m and m.startswith("_") for m in mapped)
    assert len(set(mapped)) == len(mapped)
