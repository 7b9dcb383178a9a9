"""Embedding jobs of the real-data workflow on ILIAS-style shards through a tiny random SigLIP:
a many-part gallery killed mid-way resumes to the same files; nothing half-written is published;
training sets embedded in parts equal the single job's."""

from pathlib import Path

import numpy as np
import pytest

from quari.backbones import ilias_transform, load_backbone
from quari.data import collections, embedding_jobs, ilias, parts
from quari.store import load_embedding_set, load_training_collection
from tests.builders import save_tiny_siglip
from tests.builders import make_collections, make_ilias


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    expected = make_ilias(root / "ilias", distractors_per_shard=4)
    info = save_tiny_siglip(root / "model")
    encoder = load_backbone(info, path=root / "model")
    return root, expected, info, encoder


def _parts(root):
    """(name, items, source files) of a gallery's parts: core positives, one per YFCC shard."""
    core = root / "ilias/server/ilias_core"
    tars = sorted((root / "ilias/server/yfcc100m").glob("*.tar"))
    return ([("core", ilias.positive_items(core), [core])]
            + [(t.stem, ilias.distractor_items(t), [t]) for t in tars])


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _embed_parts(encoder, root, out, transform, on_shard=None, **opts):
    dirs = []
    for name, items, tars in _parts(root):
        provenance = parts.part_provenance(encoder, "ilias", [parts.file_identity(t) for t in tars],
                                           [i for i, _ in items], {"shard_rows": opts["shard_rows"]})
        dirs.append(parts.embed_part(encoder, items, out / "gallery-parts" / name, transform,
                                     provenance, on_shard=on_shard, **opts))
    return parts.assemble_parts(dirs, out / "gallery")


def test_gallery_of_parts_resumes_after_a_kill(setup, tmp_path):
    root, expected, info, encoder = setup
    opts = dict(batch_size=3, shard_rows=4, num_workers=0, progress=False)
    transform = ilias_transform(info)
    reference = _embed_parts(encoder, root, tmp_path / "ref", transform, **opts)

    class Killed(Exception):
        pass

    calls = []

    def kill_in_second_part(k):
        calls.append(k)
        if len(calls) == 4:  # core has 3 shards; die after the first of the next part
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        _embed_parts(encoder, root, out, transform, on_shard=kill_in_second_part, **opts)
    second = out / "gallery-parts" / "yfcc100m_000000"
    assert (out / "gallery-parts/core").is_dir() and not second.exists()  # nothing half-published
    assert embedding_jobs.partial_dir(second).exists() and not (out / "gallery").exists()
    calls.clear()
    _embed_parts(encoder, root, out, transform, on_shard=calls.append, **opts)
    # core was not redone, the killed part resumed at its second shard, then the last part
    assert calls == [1, 0, 1]
    assert _files(out) == _files(tmp_path / "ref")  # identical files, from the resumed run
    gallery = load_embedding_set(out / "gallery")
    assert sorted(gallery.ids) == sorted(expected["positives"] + expected["yfcc"])
    assert len(list((out / "gallery").glob("*.npy"))) == 0  # a view over the parts: no rows copied
    # each row is that image alone through the encoder (official id -> its own pixels)
    items = dict(ilias.distractor_items(root / "ilias/server/yfcc100m/yfcc100m_000001.tar"))
    row = gallery.ids.index("yfcc100m_000001.tar/7012")
    single = embedding_jobs.embed_image_set(encoder, [("x", items["yfcc100m_000001.tar/7012"])],
                                   tmp_path / "single", transform, **opts)
    np.testing.assert_allclose(np.asarray(gallery.embeddings[row], np.float32),
                               np.asarray(load_embedding_set(single).embeddings[0], np.float32),
                               atol=2e-3)
    assert reference == tmp_path / "ref" / "gallery"


def test_a_partial_part_of_another_model_is_started_over(setup, tmp_path, caplog):
    """A part killed midway, rerun after the backbone's path points at another model of the same
    width, must not resume: its rows would mix two models."""
    root, _, info, encoder = setup
    other_dir = tmp_path / "other-model"
    save_tiny_siglip(other_dir, seed=1)
    other = load_backbone(info, path=other_dir)
    assert other.embed_dim == encoder.embed_dim
    opts = dict(batch_size=3, shard_rows=2, num_workers=0, progress=False)
    transform = ilias_transform(info)
    name, items, tars = _parts(root)[1]
    sources = [parts.file_identity(t) for t in tars]
    ids = [i for i, _ in items]

    def provenance(enc):
        return parts.part_provenance(enc, "ilias", sources, ids, {"shard_rows": 2})

    assert provenance(other)["weights"] != provenance(encoder)["weights"]
    assert provenance(load_backbone(info, path=root / "model")) == provenance(encoder)

    class Killed(Exception):
        pass

    def kill(k):
        raise Killed

    out = tmp_path / "part"
    with pytest.raises(Killed):
        parts.embed_part(encoder, items, out, transform, provenance(encoder), on_shard=kill, **opts)
    calls = []
    with caplog.at_level("WARNING", logger="quari.data.parts"):
        parts.embed_part(other, items, out, transform, provenance(other), on_shard=calls.append,
                         **opts)
    assert calls[0] == 0  # started over from the first shard
    assert "starting it over" in caplog.text and "weights" in caplog.text
    fresh = parts.embed_part(other, items, tmp_path / "fresh", transform, provenance(other), **opts)
    assert _files(out) == _files(fresh)  # nothing of the first model's shard is left
    # the same model resumes where it stopped
    out2 = tmp_path / "part2"
    with pytest.raises(Killed):
        parts.embed_part(other, items, out2, transform, provenance(other), on_shard=kill, **opts)
    calls = []
    parts.embed_part(other, items, out2, transform, provenance(other), on_shard=calls.append, **opts)
    assert calls[0] == 1 and _files(out2) == _files(fresh)


def test_assembly_refuses_parts_that_do_not_fit(setup, tmp_path):
    root, _, info, encoder = setup
    opts = dict(batch_size=3, shard_rows=4, num_workers=0, progress=False)
    transform = ilias_transform(info)
    (_, core, core_tars), (_, first, first_tars) = _parts(root)[:2]
    made = {}
    for name, items, tars in (("a", core, core_tars), ("b", first, first_tars),
                              ("again", first, first_tars)):
        prov = parts.part_provenance(encoder, "ilias", [parts.file_identity(t) for t in tars],
                                     [i for i, _ in items], {"shard_rows": 4})
        made[name] = parts.embed_part(encoder, items, tmp_path / name, transform, prov, **opts)
    with pytest.raises(parts.PartError, match="ids in more than one part"):
        parts.assemble_parts([made["a"], made["b"], made["again"]], tmp_path / "dup")
    with pytest.raises(parts.PartError, match="not a complete part"):
        parts.assemble_parts([made["a"], tmp_path / "missing"], tmp_path / "g1")
    ids = made["b"] / "shard-00000.ids.txt"
    ids.write_text("\n".join(ids.read_text().splitlines()[:-1]) + "\n")  # a row without its id
    with pytest.raises(parts.PartError, match="rows"):
        parts.assemble_parts([made["a"], made["b"]], tmp_path / "g2")
    assert not (tmp_path / "g2").exists()


def test_training_collection_drops_captions_of_unreadable_images(setup, tmp_path):
    root, _, info, encoder = setup
    make_collections(tmp_path)
    pairs = collections.coco_pairs(tmp_path / "coco/annotations/captions_train2017.json",
                                   tmp_path / "coco/train2017", max_images=4)
    Path(pairs.images[1][1]).write_bytes(b"not a jpeg")
    out = embedding_jobs.embed_training_collection(
        encoder, pairs, tmp_path / "train", ilias_transform(info), "coco-train",
        batch_size=2, shard_rows=10, num_workers=0, progress=False)
    collection = load_training_collection(out)
    assert len(collection.images) == 3 and len(collection.captions) == 6
    assert pairs.images[1][0] in (out / "images/skipped.tsv").read_text()
    for cid, row in zip(collection.captions.ids, collection.caption_image):
        image_row = next(r for c, _, r in pairs.captions if c == cid)
        assert collection.images.ids[row] == pairs.images[image_row][0]
    assert sorted(collection.image_labels) == [0, 1, 2]


def test_uned_is_embedded_whole_with_the_ilias_protocol(setup, tmp_path):
    # ILIAS linear_adaptation: UnED embedded with extract.py's own transform at the test
    # resolution, trained on all of it (lin_adapt.py: "no validation split")
    root, _, info, encoder = setup
    sizes = make_collections(tmp_path)
    files = {"format": "uned", "paths": str(tmp_path / "uned/uned_paths_1M.txt"),
             "image_root": str(tmp_path / "uned/images")}
    coco_files = {"format": "coco", "captions": str(tmp_path / "coco/annotations/captions_train2017.json"),
                  "images": str(tmp_path / "coco/train2017")}
    cfgs = {"uned": {"format": "uned"}, "coco": {"format": "coco"}}
    train, valid, protocol = collections.training_split(["uned"], [files], cfgs, 0.5)
    assert protocol == "ilias" and len(train.images) == sizes["uned"] and not valid.images
    train, valid, protocol = collections.training_split(["coco"], [coco_files], cfgs, 0.5)
    assert protocol == "model" and valid.images  # other collections keep the hold-out
    with pytest.raises(ValueError, match="mixes image protocols"):
        collections.training_split(["uned", "coco"], [files, coco_files], cfgs, 0.5)
    # the configuration may override the format's default
    cfgs["uned"] = {"format": "uned", "valid_fraction": 0.5, "protocol": "model"}
    train, valid, protocol = collections.training_split(["uned"], [files], cfgs, 0.0)
    assert protocol == "model" and valid.images
    # an empty validation collection is a valid (empty) training collection
    train, valid, _ = collections.training_split(["uned"], [files], {"uned": {"format": "uned"}}, 0.5)
    out = embedding_jobs.embed_training_collection(encoder, valid, tmp_path / "valid",
                                          ilias_transform(info), "uned-valid", num_workers=0,
                                          progress=False)
    empty = load_training_collection(out)
    assert len(empty.images) == 0 and len(empty.captions) == 0


def _training_sets_in_parts(encoder, info, root, out, cfgs, plan, fraction, **opts):
    """Each training set of ``plan`` ({name: {collection: parts}}) embedded one part per job
    (a webdataset: one group of its tars per part) and assembled; returns {name: folder}."""
    from quari.backbones import model_transform
    from quari.data import training_parts
    made = {}
    for name, collection_parts in plan.items():
        dirs = []
        for c, n in collection_parts.items():
            files = _collection_files(root, c)
            protocol = collections.collection_setting(cfgs[c], "protocol", "model")
            transform = ilias_transform(info) if protocol == "ilias" else model_transform(info)
            for p in range(n):
                located = files if n == 1 or files["format"] != "webdataset" else \
                    {"format": "webdataset", "tars": files["tars"][p::n]}  # one tar per group
                pairs = training_parts.collection_part(c, located, cfgs[c], p, n)
                part_fraction = collections.collection_setting(cfgs[c], "valid_fraction", fraction)
                dirs.append(training_parts.embed_training_part(
                    encoder, pairs, part_fraction, out / name / "parts" / c / f"{p:04d}",
                    transform, protocol, [], {"collection": c, "part": p, "of": n}, **opts))
        training_parts.assemble_training_set(
            dirs, {s: out / name / s for s in training_parts.SIDES}, name)
        made[name] = out / name
    return made


def _collection_files(root, name):
    return {"coco": {"format": "coco", "captions": str(root / "coco/annotations/captions_train2017.json"),
                     "images": str(root / "coco/train2017")},
            "cc12m": {"format": "webdataset", "tars": sorted(str(t) for t in (root / "cc12m").glob("*.tar"))},
            "uned": {"format": "uned", "paths": str(root / "uned/uned_paths_1M.txt"),
                     "image_root": str(root / "uned/images")}}[name]


def _same_collections(a, b):
    x, y = load_training_collection(a), load_training_collection(b)
    assert x.images.ids == y.images.ids and x.captions.ids == y.captions.ids
    # the same image through the same encoder; batches differ, so rows agree to fp16 rounding
    np.testing.assert_allclose(np.asarray(x.images.embeddings, np.float32),
                               np.asarray(y.images.embeddings, np.float32), atol=2e-3)
    np.testing.assert_allclose(np.asarray(x.captions.embeddings, np.float32),
                               np.asarray(y.captions.embeddings, np.float32), atol=2e-3)
    assert x.image_labels.tolist() == y.image_labels.tolist()
    assert x.caption_image.tolist() == y.caption_image.tolist()
    assert x.name == y.name and x.meta == y.meta
    return x


def test_training_sets_in_parts_equal_one_job(setup, tmp_path):
    """COCO (one part) + CC12M (one part per tar), UnED in 3 slices with a held-out fraction and
    an unreadable image: the assembled train / valid equal what one job embedding the merged
    collections writes (collections.training_split + embed_training_collection), row for row, id
    for id, label for label, with the same counts."""
    from quari.backbones import model_transform
    root, _, info, encoder = setup
    make_collections(tmp_path)
    (tmp_path / "uned/images/dom1/cls2/5.jpg").write_bytes(b"not a jpeg")
    cfgs = {"coco": {"format": "coco", "max_images": 5}, "cc12m": {"format": "webdataset"},
            "uned": {"format": "uned", "valid_fraction": 0.4}}
    sets = {"captions": ["coco", "cc12m"], "uned": ["uned"]}
    opts = dict(batch_size=3, shard_rows=4, num_workers=0, progress=False)
    fraction = 0.35
    reference = {}
    for name, names in sets.items():  # what the single embed_training_set job did
        train, valid, protocol = collections.training_split(
            names, [_collection_files(tmp_path, c) for c in names], cfgs, fraction)
        transform = ilias_transform(info) if protocol == "ilias" else model_transform(info)
        for side, pairs in (("train", train), ("valid", valid)):
            reference[name, side] = embedding_jobs.embed_training_collection(
                encoder, pairs, tmp_path / "single" / name / side, transform, f"{name}-{side}",
                meta={"protocol": protocol}, **opts)
    plan = {"captions": {"coco": 1, "cc12m": 2}, "uned": {"uned": 3}}
    made = _training_sets_in_parts(encoder, info, tmp_path, tmp_path / "parts", cfgs, plan,
                                   fraction, **opts)
    for name in sets:
        for side in ("train", "valid"):
            got = _same_collections(reference[name, side], made[name] / side)
            assert len(got.images) > 0
            assert len(list((made[name] / side / "images").glob("*.npy"))) == 0  # a view
            if name == "uned":
                assert len(set(got.image_labels.tolist())) > 1  # labels coded across parts
    assert load_training_collection(made["uned"] / "train").meta["images_requested"] == \
        load_training_collection(made["uned"] / "train").meta["images_embedded"] + \
        ("uned/dom1/cls2/5.jpg" in (made["uned"] / "train/images/skipped.tsv").read_text())
    cc = load_training_collection(made["captions"] / "train")
    assert any(i.startswith("cc12m/cc12m-train-0001.tar/") for i in cc.images.ids)


def test_a_killed_training_part_resumes_and_assembly_checks_its_parts(setup, tmp_path):
    from quari.data import training_parts
    root, _, info, encoder = setup
    make_collections(tmp_path)
    cfgs = {"uned": {"format": "uned", "valid_fraction": 0.4}}
    opts = dict(batch_size=2, shard_rows=2, num_workers=0, progress=False)
    pairs = training_parts.collection_part("uned", _collection_files(tmp_path, "uned"),
                                           cfgs["uned"], 0, 2)
    args = (encoder, pairs, 0.4)
    kw = dict(transform=ilias_transform(info), protocol="ilias", sources=[],
              settings={"collection": "uned", "part": 0, "of": 2}, **opts)
    reference = training_parts.embed_training_part(*args, tmp_path / "ref", **kw)

    class Killed(Exception):
        pass

    calls = []

    def kill(k):
        calls.append(k)
        if len(calls) == 2:
            raise Killed

    out = tmp_path / "run" / "0000"
    with pytest.raises(Killed):
        training_parts.embed_training_part(*args, out, on_shard=kill, **kw)
    assert not out.exists() and embedding_jobs.partial_dir(out).exists()
    calls.clear()
    training_parts.embed_training_part(*args, out, on_shard=calls.append, **kw)
    # train (2 images, one shard) was complete and kept; valid (4 images) was killed after its
    # first shard and resumed at its second
    assert calls == [1]
    assert _files(out) == _files(reference)
    # a part with a missing label row, or another model's part, is refused before assembly
    names = out / "train" / embedding_jobs.LABEL_NAMES
    names.write_text(names.read_text().replace("[", "[null, ", 1))
    with pytest.raises(parts.PartError, match="labels"):
        training_parts.assemble_training_set([out], {s: tmp_path / "set" / s for s in
                                                     training_parts.SIDES}, "uned")
    assert not (tmp_path / "set" / "train").exists()
