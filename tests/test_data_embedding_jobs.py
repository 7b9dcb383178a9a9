"""Embedding jobs of the real-data workflow on ILIAS-style shards through a tiny random SigLIP:
a many-part gallery killed mid-way resumes to the same files; nothing half-written is published."""

from pathlib import Path

import numpy as np
import pytest

from quari.backbones import ilias_transform, load_backbone
from quari.data import collections, embedding_jobs, ilias
from quari.store import load_embedding_set, load_training_collection
from tests.test_backbones import save_tiny_siglip
from tests.test_data_formats import make_collections, make_ilias


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    expected = make_ilias(root / "ilias", distractors_per_shard=4)
    info = save_tiny_siglip(root / "model")
    encoder = load_backbone(info, path=root / "model")
    return root, expected, info, encoder


def _parts(root):
    core = [root / "ilias/hf/ilias-core-db-000000.tar"]
    tars = sorted((root / "ilias/server/yfcc100m").glob("*.tar"))
    return ([("core-positives", lambda: ilias.positive_items(core))]
            + [(t.stem, lambda t=t: ilias.distractor_items(t)) for t in tars])


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_gallery_of_parts_resumes_after_a_kill(setup, tmp_path):
    root, expected, info, encoder = setup
    opts = dict(batch_size=3, shard_rows=4, num_workers=0, progress=False)
    transform = ilias_transform(info)
    reference = embedding_jobs.embed_gallery_parts(encoder, _parts(root), tmp_path / "ref", transform, **opts)

    class Killed(Exception):
        pass

    calls = []

    def kill_in_second_part(k):
        calls.append(k)
        if len(calls) == 4:  # core-positives has 3 shards; die after the first of the next part
            raise Killed

    out = tmp_path / "run" / "gallery"
    with pytest.raises(Killed):
        embedding_jobs.embed_gallery_parts(encoder, _parts(root), out, transform,
                                  on_shard=kill_in_second_part, **opts)
    assert not out.exists() and embedding_jobs.partial_dir(out).exists()  # nothing published
    embedding_jobs.embed_gallery_parts(encoder, _parts(root), out, transform, **opts)
    assert _files(out) == _files(reference)  # identical files, from the resumed run
    gallery = load_embedding_set(out)
    assert sorted(gallery.ids) == sorted(expected["positives"] + expected["yfcc"])
    # each row is that image alone through the encoder (official id -> its own pixels)
    items = dict(ilias.distractor_items(root / "ilias/server/yfcc100m/yfcc100m_000001.tar"))
    row = gallery.ids.index("yfcc100m_000001.tar/7012")
    single = embedding_jobs.embed_image_set(encoder, [("x", items["yfcc100m_000001.tar/7012"])],
                                   tmp_path / "single", transform, **opts)
    np.testing.assert_allclose(np.asarray(gallery.embeddings[row], np.float32),
                               np.asarray(load_embedding_set(single).embeddings[0], np.float32),
                               atol=2e-3)


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
