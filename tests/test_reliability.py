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


# ---------------------------------------------------------------------------------------------
# a training checkpoint is resumed only by a run on the same data


def _variants():
    """Training data, and the same with each input changed in turn."""
    import numpy as np

    from quari.mining import mine_semipositives
    from quari.training import make_training_data
    from tests.builders import TOY_DIM, toy_data
    base = toy_data(0)
    fewer = toy_data(0, images=36)  # a collection's max_images lowered
    other_model = toy_data(0, noise=0.31)  # same ids and sizes, other embeddings
    rng = np.random.default_rng(0)
    img = rng.standard_normal((40, TOY_DIM)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    pair = np.repeat(np.arange(40), 2)
    ids = [f"im{i}" for i in pair]
    cap = img[pair] + 0.3 * rng.standard_normal((80, TOY_DIM)).astype(np.float32)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    other_semi = make_training_data(img[pair], ids, cap, np.arange(80),
                                    mine_semipositives(img[pair], ids, k=10, top_n=1,
                                                       progress=False))
    return base, {"fewer images": fewer, "other embeddings": other_model,
                  "other semi-positives": other_semi}


@pytest.mark.parametrize("change", ["fewer images", "other embeddings", "other semi-positives",
                                    "other validation data"])
def test_a_checkpoint_of_other_training_data_is_not_resumed(tmp_path, change, caplog):
    import torch

    from quari.training import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, train
    from tests.builders import tiny_model, tiny_train, toy_data, weights_equal
    torch.set_num_threads(1)
    base, changed = _variants()
    valid, new_valid = toy_data(5, images=10), toy_data(6, images=10)
    new = changed.get(change, base)
    new_v = new_valid if change == "other validation data" else valid
    cfg = tiny_train(max_steps=4)
    train(cfg, tiny_model(), base, valid, checkpoint_dir=tmp_path, progress=False)  # finished
    with caplog.at_level("WARNING"):
        again = train(cfg, tiny_model(), new, new_v, checkpoint_dir=tmp_path, progress=False)
    fresh = train(cfg, tiny_model(), new, new_v, checkpoint_dir=tmp_path / "fresh",
                  progress=False)
    assert weights_equal(again.model, fresh.model)
    assert "other training data" in caplog.text and "starting over" in caplog.text
    assert (tmp_path / PREVIOUS_CHECKPOINT_FILE).exists() and (tmp_path / CHECKPOINT_FILE).exists()
    # the same data again resumes the finished checkpoint: nothing is trained
    steps = []
    train(cfg, tiny_model(), new, new_v, checkpoint_dir=tmp_path, progress=False,
          on_step=lambda step, *_: steps.append(step))
    assert steps == []


def test_a_changed_training_setting_names_the_checkpoint_to_delete(tmp_path):
    from quari.training import CHECKPOINT_FILE, train
    from tests.builders import tiny_model, tiny_train, toy_data
    data = toy_data(0)
    train(tiny_train(max_steps=2), tiny_model(), data, checkpoint_dir=tmp_path, progress=False)
    for cfg, model in ((tiny_train(max_steps=2, lr_max=1e-2), tiny_model()),
                       (tiny_train(max_steps=2), tiny_model(rank=2))):
        with pytest.raises(ValueError) as err:
            train(cfg, model, data, checkpoint_dir=tmp_path, progress=False)
        assert str(tmp_path / CHECKPOINT_FILE) in str(err.value) and "delete" in str(err.value)


def test_semipositives_are_used_only_with_the_images_they_were_mined_from(tmp_path):
    import numpy as np

    from quari.mining import (StaleCacheError, load_semipositives, mine_semipositives,
                              save_semipositives)
    from quari.store import embedding_fingerprint
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((30, 8)).astype(np.float32)
    ids = [f"im{i}" for i in range(30)]
    path = tmp_path / "semi.npz"
    save_semipositives(path, mine_semipositives(emb, ids, k=5, top_n=2, progress=False),
                       source={"images": embedding_fingerprint(ids, emb)})
    assert len(load_semipositives(path, embedding_fingerprint(ids, emb)).image_ids) == 30
    changed = {"other model, same ids": (ids, emb + 1e-3),
               "fewer images": (ids[:-1], emb[:-1]),
               "other ids": ([f"x{i}" for i in range(30)], emb),
               "other dtype": (ids, emb.astype(np.float16))}
    for what, (other_ids, other) in changed.items():
        with pytest.raises(StaleCacheError, match="delete it") as err:
            load_semipositives(path, embedding_fingerprint(other_ids, other))
        assert str(path) in str(err.value), what
    # a file that records no source (written before fingerprints) is not trusted either
    with np.load(path) as f:
        np.savez(tmp_path / "old.npz", **{k: f[k] for k in f.files if k != "source"})
    with pytest.raises(StaleCacheError):
        load_semipositives(tmp_path / "old.npz", embedding_fingerprint(ids, emb))


# ---------------------------------------------------------------------------------------------
# two writers on one cache; shards and rows that cannot be right


@pytest.fixture
def other_writer(tmp_path):
    """Another process holding the writer's lock on a folder until killed (-9)."""
    import subprocess
    import sys
    import time
    procs = []

    def start(folder):
        code = ("import sys, time; from quari.store import FolderLock; "
                "lock = FolderLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__)
                                                                               .parents[1])})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_writer_of_an_embedding_set_fails_naming_the_folder(tmp_path, other_writer):
    import numpy as np

    from quari.store import CacheBusyError, EmbeddingSetWriter, load_embedding_set
    folder = tmp_path / "set"
    proc = other_writer(folder)
    with pytest.raises(CacheBusyError) as err:
        EmbeddingSetWriter(folder, dim=4)
    assert str(folder) in str(err.value) and f"pid {proc.pid}" in str(err.value)
    proc.kill()  # kill -9: the system releases the lock; no stale lock is left to clean
    proc.wait()
    writer = EmbeddingSetWriter(folder, dim=4)
    writer.add_shard(np.ones((2, 4)), ["a", "b"])
    writer.close()
    assert load_embedding_set(folder).ids == ["a", "b"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "shard-00000.ids.npy", "shard-00000.ids.txt", "shard-00000.npy"]


def test_a_second_training_on_one_checkpoint_folder_fails(tmp_path, other_writer):
    from quari.store import CacheBusyError
    from quari.training import train
    from tests.builders import tiny_model, tiny_train, toy_data
    other_writer(tmp_path / "work")
    with pytest.raises(CacheBusyError, match="training checkpoint"):
        train(tiny_train(max_steps=1), tiny_model(), toy_data(0), checkpoint_dir=tmp_path / "work",
              progress=False)


def _saved_set(folder, rows=5, dim=4):
    import numpy as np

    from quari.store import save_embedding_set
    save_embedding_set(folder, np.ones((rows, dim), np.float32) / 2, [f"id{i}" for i in range(rows)],
                       shard_rows=3)
    return folder


def test_a_truncated_shard_names_the_file_and_the_folder_to_delete(tmp_path):
    from quari.store import load_embedding_set
    folder = _saved_set(tmp_path / "set")
    shard = folder / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(ValueError) as err:
        load_embedding_set(folder)
    assert str(shard) in str(err.value) and f"delete {folder}" in str(err.value)


def test_an_ids_file_of_another_length_names_both_files(tmp_path):
    from quari.store import load_embedding_set
    import numpy as np
    folder = _saved_set(tmp_path / "set")
    ids = folder / "shard-00000.ids.txt"
    ids.write_text("id0\nid1\n")  # 2 ids for 3 rows
    with pytest.raises(ValueError) as err:
        load_embedding_set(folder, mmap=False)  # read as lists, from the text files
    assert str(ids) in str(err.value) and "shard-00000.npy" in str(err.value)
    assert "2 ids" in str(err.value) and "3 rows" in str(err.value)
    id_array = folder / "shard-00000.ids.npy"  # memory-mapped, from the id arrays
    np.save(id_array, np.array([b"id0", b"id1"]))
    with pytest.raises(ValueError) as err:
        load_embedding_set(folder)
    assert str(id_array) in str(err.value) and "shard-00000.npy" in str(err.value)
    assert "2 ids" in str(err.value) and "3 rows" in str(err.value)


def test_nan_rows_name_the_folder_and_the_ids(tmp_path):
    import numpy as np

    from quari.store import EmbeddingSetWriter, NonFiniteRowsError
    rows = np.ones((4, 3), np.float32)
    rows[1, 0], rows[3, 2] = np.nan, np.inf
    writer = EmbeddingSetWriter(tmp_path / "set", dim=3)
    with pytest.raises(NonFiniteRowsError) as err:
        writer.add_shard(rows, ["a", "b", "c", "d"])
    assert str(tmp_path / "set") in str(err.value)
    assert "'b'" in str(err.value) and "'d'" in str(err.value) and "'a'" not in str(err.value)


def test_an_empty_gallery_or_query_set_names_its_folder(tmp_path):
    import numpy as np

    from quari.evaluation import RetrievalTask
    from quari.store import load_embedding_set, save_embedding_set
    save_embedding_set(tmp_path / "empty", np.zeros((0, 4), np.float32), [])
    full = load_embedding_set(_saved_set(tmp_path / "full"))
    empty = load_embedding_set(tmp_path / "empty")
    with pytest.raises(ValueError, match=f"gallery {tmp_path / 'empty'} .*empty"):
        RetrievalTask("i2i", full, empty, {i: set() for i in full.ids})
    with pytest.raises(ValueError, match=f"queries {tmp_path / 'empty'} .*empty"):
        RetrievalTask("i2i", empty, full, {})


def test_nan_queries_name_their_ids(tmp_path):
    import numpy as np

    from quari.evaluation import RetrievalTask
    from quari.store import EmbeddingSet
    q = np.ones((3, 4), np.float32)
    q[2, 1] = np.nan
    queries = EmbeddingSet(q, ["q0", "q1", "q2"], source="results/emb/queries")
    with pytest.raises(ValueError, match="results/emb/queries.*'q2'"):
        RetrievalTask("i2i", queries, queries, {i: set() for i in queries.ids})


# ---------------------------------------------------------------------------------------------
# every setting checked at load, before any job runs


def _schema():
    return Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml"


def test_numbers_in_exponent_notation_are_numbers():
    import yaml

    from quari.config import validate_config
    from tests.builders import TINY
    text = yaml.safe_dump(TINY) + "\n"
    config = yaml.safe_load(text)
    # what a user writes; YAML 1.1 (PyYAML, Snakemake) reads "1e-3" without a dot as a string
    extra = yaml.safe_load("quari: {train: {lr_max: 1e-3, max_steps: 6}}\n"
                           "mining: {temperature: 7e-2}\n"
                           "methods: {linear_adaptation: {lr: 1e-3, epochs: 1}}\n"
                           "run_id: 1e5\n")
    assert extra["quari"]["train"]["lr_max"] == "1e-3"  # the trap
    config["quari"]["train"].update(extra["quari"]["train"])
    config["mining"].update(extra["mining"])
    config["methods"]["linear_adaptation"] = extra["methods"]["linear_adaptation"]
    config["run_id"] = extra["run_id"]
    out = validate_config(config, _schema())
    assert out["quari"]["train"]["lr_max"] == 1e-3 and out["mining"]["temperature"] == 0.07
    assert out["methods"]["linear_adaptation"]["lr"] == 1e-3
    assert out["run_id"] == "1e5"  # a string where the schema asks for one


def test_a_typo_inside_a_collection_entry_is_named():
    import yaml

    from quari.config import ConfigError, validate_config
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "workflow/config/paper.yaml").read_text())
    config["real"]["collections"]["coco"]["max_image"] = 1000  # would use the whole collection
    with pytest.raises(ConfigError) as err:
        validate_config(config, _schema())
    assert "real.collections.coco.max_image" in str(err.value)
    assert "did you mean 'max_images'" in str(err.value)


def test_parameters_are_checked_against_the_code_that_takes_them():
    from quari.methods import get_method
    from quari.config import check_parameters
    from quari.model import QuARIConfig
    from quari.training import TrainConfig
    nested = {"model": QuARIConfig, "train": TrainConfig}
    problems = check_parameters(get_method("quari"), {
        "model": {"rnk": 4, "hidden_dim": "64"}, "train": {"lr_max": "1e-3", "use_noise": "no"},
        "image_query_fraction": 1}, "methods.q", ("self", "device", "embedding_dim"), nested)
    assert problems == [
        "unknown key 'methods.q.model.rnk' (did you mean 'rank'?); allowed here: "
        + ", ".join(f for f in QuARIConfig.__dataclass_fields__ if f != "embedding_dim"),
        "methods.q.model.hidden_dim: '64' is not of type int",
        "methods.q.train.use_noise: 'no' is not of type bool"]
    assert check_parameters(get_method("linear_adaptation"), {"epochs": 2.5, "lr": 1},
                            "methods.la") == ["methods.la.epochs: 2.5 is not of type int"]


def test_bad_method_entries_and_training_settings_fail_at_load_naming_each_key(tmp_path):
    import yaml

    from tests.builders import TINY, snakemake
    methods = {"identity": {}, "la": {"type": "linear_adaptation", "epoch": 2},
               "quari": {"model": {"rnk": 4}},
               "q2": {"type": "quari", "train": {"batch_size": "big"}}}
    quari = {"model": TINY["quari"]["model"], "train": {"max_steps": "many"}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY, "methods": methods, "quari": quari}))
    run = snakemake(tmp_path, "-n", "--configfile", str(config), "--replace-workflow-config")
    out = run.stdout + run.stderr
    assert run.returncode != 0
    for named in ("methods.la.epoch' (did you mean 'epochs'?)", "methods.quari.model.rnk'",
                  "methods.q2.train.batch_size: 'big' is not of type int",
                  "quari.train.max_steps: 'many' is not of type int"):
        assert named in out, named
    assert not (tmp_path / "results").exists()


def test_zero_epochs_of_linear_adaptation_fail_at_load(tmp_path):
    import yaml

    from tests.builders import TINY, snakemake
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY, "methods": {"linear_adaptation": {"epochs": 0}}}))
    run = snakemake(tmp_path, "-n", "--configfile", str(config), "--replace-workflow-config")
    assert run.returncode != 0
    assert "methods.linear_adaptation" in run.stderr + run.stdout
    assert "epochs" in run.stderr + run.stdout


# ---------------------------------------------------------------------------------------------
# every item left out is counted, shown, and too many stop the run


def _set_with_skips(folder, requested, skipped_ids):
    """An embedding set as the embedding cache leaves it when items could not be read."""
    import numpy as np

    from quari.store import save_embedding_set
    kept = [f"k{i}" for i in range(requested - len(skipped_ids))]
    save_embedding_set(folder, np.ones((len(kept), 4), np.float32), kept,
                       meta={"requested": requested, "embedded": len(kept),
                             "skipped": len(skipped_ids)})
    (folder / "skipped.tsv").write_text("id\treason\n" + "".join(
        f"{i}\tOSError: truncated\n" for i in skipped_ids))
    return folder


def test_dropped_items_are_counted_and_too_many_stop_with_the_list(tmp_path):
    from quari.dropped import TooManyDroppedError, check_dropped, set_report, training_report
    queries = set_report(_set_with_skips(tmp_path / "q", 100, ["bad1", "bad2"]))
    gallery = set_report(_set_with_skips(tmp_path / "g", 1000, ["g7"]))
    assert (queries["requested"], queries["dropped"]) == (100, 2)
    assert queries["ids"] == ["bad1 (OSError: truncated)", "bad2 (OSError: truncated)"]
    assert queries["list"] == str(tmp_path / "q" / "skipped.tsv")
    training = training_report({"images_requested": 50, "images_embedded": 45,
                                "captions_of_skipped_images": 9})
    assert (training["dropped"], training["captions_dropped"]) == (5, 9)
    check_dropped({"image_queries": queries, "gallery": gallery}, max_fraction=0.02)
    with pytest.raises(TooManyDroppedError) as err:
        check_dropped({"image_queries": queries, "gallery": gallery, "training": training},
                      max_fraction=0.015)
    message = str(err.value)
    assert "image_queries: 2 of 100" in message and "bad1" in message
    assert str(tmp_path / "q" / "skipped.tsv") in message and "training: 5 of 50" in message
    assert "gallery" not in message.split("\n", 1)[1].split("repair")[0]  # 0.1% is allowed
    assert "max_dropped_fraction" in message


def test_a_training_collection_that_lost_too_many_images_stops_training(tmp_path):
    """Before any training (train_method), with the same limit as the evaluation's and the
    collection's list of unreadable images."""
    from quari.dropped import TooManyDroppedError, check_training_collection
    _set_with_skips(tmp_path / "coll" / "images", 20, ["c1", "c2"])
    meta = {"images_requested": 20, "images_embedded": 18, "captions_of_skipped_images": 10}
    report = check_training_collection(tmp_path / "coll", meta, max_fraction=0.1)
    assert (report["dropped"], report["captions_dropped"]) == (2, 10)
    with pytest.raises(TooManyDroppedError) as err:
        check_training_collection(tmp_path / "coll", meta, max_fraction=0.05)
    assert "2 of 20" in str(err.value)
    assert str(tmp_path / "coll" / "images" / "skipped.tsv") in str(err.value)
    whole = {"images_requested": 20, "images_embedded": 20, "captions_of_skipped_images": 0}
    assert check_training_collection(tmp_path / "coll", whole, 0.0)["dropped"] == 0


def test_every_method_refuses_an_unknown_setting():
    """No method takes any key silently (a `**params` signature would accept a typo)."""
    from quari.config import check_parameters
    from quari.methods import available_methods, get_method
    for name in available_methods():
        problems = check_parameters(get_method(name), {"no_such_setting": 1}, f"methods.{name}",
                                    ("self", "device", "embedding_dim"))
        assert problems and "unknown key" in problems[0], name


def test_a_dropped_query_is_a_footnote_in_the_table(tmp_path):
    import pandas as pd

    from quari.reporting.tables import evaluation_rows, write_table
    from tests.builders import evaluation
    paper = pd.read_csv(Path(__file__).resolve().parents[1] / "workflow/resources/paper_numbers.csv")
    ev = evaluation("quari", "quari", "siglip-vit-l16@384")
    ev["dropped"] = {"image_queries": {"requested": 1232, "dropped": 3},
                     "text_queries": {"requested": 1232, "dropped": 0},
                     "gallery": {"requested": 5_000_000, "dropped": 0}, "training": None}
    clean = evaluation("identity", "identity", "siglip-vit-l16@384")
    df = evaluation_rows([ev, clean])
    assert set(df.loc[(df["method"] == "quari") & (df["task"] == "i2i"), "dropped"]) == {
        "3 of 1,232 queries left out"}
    assert set(df.loc[df["task"] == "t2i", "dropped"]) == {""}
    table = write_table(df, paper, "1", tmp_path / "t.csv", tmp_path / "t.md")
    assert "3 of 1,232 queries left out" in set(pd.read_csv(tmp_path / "t.csv")["dropped"].dropna())
    md = (tmp_path / "t.md").read_text()
    assert "QuARI [1]" in md or "quari [1]" in md.lower()
    assert "[1] siglip-vit-l16@384" in md and "3 of 1,232 queries left out" in md
    assert len(table)


def test_a_backbone_override_of_the_wrong_type_fails_at_load(tmp_path):
    import yaml

    from tests.builders import snakemake
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "workflow/config/paper.yaml").read_text())
    config["real"]["models"] = {"my-clip": {"like": "clip-vit-l14", "embed_dim": "768"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "-n", "results/table1.csv", "--configfile", str(tmp_path / "bad.yaml"),
                    "--replace-workflow-config")
    assert run.returncode != 0
    assert "real.models.my-clip.embed_dim: '768' is not of type int" in run.stdout + run.stderr


def test_every_field_of_the_model_config_is_a_valid_setting():
    import dataclasses

    import yaml

    from quari.model import QuARIConfig
    schema = yaml.safe_load(_schema().read_text())
    allowed = set(schema["properties"]["quari"]["properties"]["model"]["properties"])
    fields = {f.name for f in dataclasses.fields(QuARIConfig)} - {"embedding_dim"}
    assert fields == allowed, fields ^ allowed
