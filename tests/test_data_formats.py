"""Data adapters on small files generated in each official format (written by tests/builders.py).

Formats: ILIAS webdataset shards (``jpg``, ``bbox.json``, ``download_url.txt``; keys
``<instance>/query/Qxxx_yy``, ``<instance>/pos/Pxxx_zz``), the ILIAS core folder's ``Txxx.txt``
text queries and ``image_ids`` lists; INQUIRE CSVs, INQUIRE-Rerank parquet (real column names,
embedded image bytes), a clip-retrieval embedding folder; COCO captions JSON, CC12M-style
webdataset, a BioTrove-style table and the UnED path list.
"""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from quari.data import collections, ilias, inquire
from quari.data.tars import ImageRef, read_tar_samples, split_key
from quari.store import load_embedding_set
from tests.builders import INQUIRE_QUERIES, RERANK_QUERIES, shard_sample, jpeg_bytes, make_collections, make_ilias, make_inquire, make_rerank, write_tar



# ----------------------------------------------------------------------------- tests


def test_tar_index_reads_every_member_by_offset(tmp_path):
    members = {**shard_sample("inst/pos/P000_00", 1), "inst/pos/P000_01.jpg": jpeg_bytes(2),
               "other.tar.gz.note": b"x"}
    tar = write_tar(tmp_path / "s.tar", members)
    samples = read_tar_samples(tar)
    assert list(samples) == ["inst/pos/P000_00", "inst/pos/P000_01", "other"]
    assert set(samples["inst/pos/P000_00"]) == {"jpg", "bbox.json", "download_url.txt"}
    assert samples["inst/pos/P000_00"]["jpg"]() == members["inst/pos/P000_00.jpg"]
    assert samples["inst/pos/P000_01"]["jpg"]() == members["inst/pos/P000_01.jpg"]
    assert split_key("a/b/c.bbox.json") == ("a/b/c", "bbox.json")
    assert ImageRef(str(tar))() == tar.read_bytes()


def test_truncated_shard_is_refused(tmp_path):
    tar = write_tar(tmp_path / "s.tar", {**shard_sample("k1", 1), **shard_sample("k2", 2)})
    data = tar.read_bytes()
    last = read_tar_samples(tar)["k2"]["download_url.txt"]
    for cut in (last.offset + 3, last.offset - 512, last.offset + last.size):
        tar.write_bytes(data[:cut])  # inside a member, at a header, after the last member
        with pytest.raises(tarfile.ReadError, match="s.tar"):
            read_tar_samples(tar)


def test_ilias_items_use_official_ids_and_ground_truth_is_by_instance(tmp_path):
    expected = make_ilias(tmp_path / "ilias")
    core = tmp_path / "ilias" / "server" / "ilias_core"
    queries = ilias.image_query_items(core)
    positives = ilias.positive_items(core)
    texts = ilias.text_query_items(core)
    assert [i for i, _ in queries] == sorted(expected["queries"])
    assert [i for i, _ in positives] == sorted(expected["positives"])
    assert [i for i, _ in texts] == expected["texts"]
    assert texts[0][1] == "a red bird on the branch"
    ids = tmp_path / "ilias" / "server" / "image_ids"
    ilias.check_against_official([i for i, _ in queries], ilias.read_id_list(ids / "image_query_ids.txt"), "q")
    with pytest.raises(ValueError, match="missing e.g."):
        ilias.check_against_official([i for i, _ in positives][1:],
                                     ilias.read_id_list(ids / "positive_ids.txt"), "positives")
    all_queries = [i for i, _ in queries] + [i for i, _ in texts]
    truth = ilias.ground_truth(all_queries, [i for i, _ in positives])
    for q in all_queries:  # brute force: positives whose first path component matches
        assert truth[q] == sorted(p for p in expected["positives"] if p.split("/")[0] == q.split("/")[0])
    with pytest.raises(ValueError, match="no positive"):
        ilias.ground_truth(["zzz_999/query/Q999_00.jpg"], expected["positives"])
    shard = tmp_path / "ilias" / "hf" / "mini_ilias_yfcc100m-000001.tar"
    assert [i for i, _ in ilias.distractor_items(shard)] == [m for m in expected["mini"]
                                                             if m.startswith(shard.name)]


def test_ilias_text_queries_from_a_tar(tmp_path):
    tar = write_tar(tmp_path / "ilias_core.tar", {
        "ilias_core/bold_bimp_000/query/T000.txt": b"a red bird\n",
        "ilias_core/bold_bimp_000/query/Q000_00.jpg": jpeg_bytes(1),
        "ilias_core/bold_bimp_000/pos/P000_00.jpg": jpeg_bytes(2)})
    assert ilias.text_query_items(tar) == [("bold_bimp_000/query/T000.txt", "a red bird")]


def test_inquire_queries_annotations_and_pool(tmp_path):
    made = make_inquire(tmp_path / "inquire")
    queries = inquire.read_queries(tmp_path / "inquire" / "inquire_queries_test.csv")
    assert queries == INQUIRE_QUERIES
    truth = inquire.read_annotations(tmp_path / "inquire" / "inquire_annotations.csv", ["3", "4"])
    assert truth == {q: sorted(p) for q, p in made["truth"].items()}
    with pytest.raises(ValueError, match="no annotation"):
        inquire.read_annotations(tmp_path / "inquire" / "inquire_annotations.csv", ["3", "99"])
    pool = inquire.pool_items(tmp_path / "inquire" / "inat24")
    assert [i for i, _ in pool] == sorted(made["pool"])
    assert inquire.pool_id("train/a/b") == "train/a/b.jpg" == inquire.pool_id("train/a/b.jpg")


def test_clip_retrieval_folder_becomes_an_embedding_set(tmp_path):
    made = make_inquire(tmp_path / "inquire")
    rows = inquire.convert_clip_retrieval(made["precomputed"], tmp_path / "set")
    got = load_embedding_set(tmp_path / "set")
    assert rows == len(made["pool"]) and got.ids == made["pool"]
    reference = made["vectors"] / np.linalg.norm(made["vectors"], axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got.embeddings, np.float32), reference, atol=2e-3)
    import pandas as pd
    pd.DataFrame({"image_path": ["x"]}).to_parquet(Path(made["precomputed"]) / "metadata" / "metadata_1.parquet")
    with pytest.raises(ValueError, match="img_emb_1.npy has"):
        inquire.convert_clip_retrieval(made["precomputed"], tmp_path / "set2")


def test_rerank_parquet_candidates_relevance_and_images(tmp_path):
    expected = make_rerank(tmp_path / "test-00000-of-00001.parquet")
    split = inquire.read_rerank([tmp_path / "test-00000-of-00001.parquet"])
    assert split.queries == RERANK_QUERIES
    for q, (cands, rel) in expected.items():
        assert split.candidates[q] == cands and split.relevant[q] == rel
    assert len(split.images) == len(set(split.images)) == 9  # one image shared by both queries
    items = inquire.extract_rerank_images([tmp_path / "test-00000-of-00001.parquet"], tmp_path / "img")
    assert [i for i, _ in items] == split.images
    assert Path(items[0][1]).read_bytes() == jpeg_bytes(int(items[0][0]))


def test_rerank_queries_find_their_full_pool_positives_by_text(tmp_path):
    made = make_inquire(tmp_path / "inquire")
    make_rerank(tmp_path / "rerank.parquet")
    root = tmp_path / "inquire"
    csvs = [root / "inquire_queries_val.csv", root / "inquire_queries_test.csv"]
    annotations = root / "inquire_annotations.csv"
    queries = inquire.read_rerank([tmp_path / "rerank.parquet"]).queries
    counts = inquire.rerank_full_pool_positives(queries, csvs, annotations)
    # "9" (validation split, written differently) and "3" (test split), distinct images only
    assert counts == {RERANK_QUERIES[0]: len(set(made["val_truth"]["9"])),
                      RERANK_QUERIES[1]: len(made["truth"]["3"])} == {RERANK_QUERIES[0]: 4,
                                                                      RERANK_QUERIES[1]: 2}
    # a query whose Fullrank counterpart is in a file not given is named
    with pytest.raises(ValueError, match="1 INQUIRE-Rerank queries match no Fullrank query"
                                         r".*hu\u0308bner's wasp moth Mating"):
        inquire.rerank_full_pool_positives(queries, csvs[1:], annotations)
    # two Fullrank ids with one text would make the join ambiguous
    import pandas as pd
    pd.DataFrame({"query_id": [5], "query_text": ["A red bird  on a branch"]}).to_csv(
        tmp_path / "clash.csv")
    with pytest.raises(ValueError, match="belongs to query 3 .* and to query 5"):
        inquire.rerank_full_pool_positives(queries, [*csvs, tmp_path / "clash.csv"], annotations)
    assert inquire.query_text_key(" A  red\tbird ") == "a red bird"


def test_rerank_candidates_ranks_only_the_fixed_list(tmp_path):
    """Identity re-ranking of fixed candidates against a brute-force loop of the AP definition."""
    from quari.methods import get_method
    from quari.store import EmbeddingSet
    rng = np.random.default_rng(1)
    gallery_ids = [str(i) for i in range(30)]
    gallery = EmbeddingSet(rng.standard_normal((30, 8)).astype(np.float32), gallery_ids)
    gallery.embeddings /= np.linalg.norm(gallery.embeddings, axis=1, keepdims=True)
    queries = EmbeddingSet(gallery.embeddings[[0, 5, 9]] + 0.1, ["qa", "qb", "qc"])
    candidates = {q: [str(i) for i in rng.choice(30, 10, replace=False)] for q in queries.ids}
    relevant = {q: c[::3] for q, c in candidates.items()}
    method = get_method("identity")(device="cpu")
    result = inquire.rerank_candidates(method, queries, gallery, candidates, relevant)
    aps = []
    for n, q in enumerate(queries.ids):
        rows = [int(c) for c in candidates[q]]
        scores = gallery.embeddings[rows] @ queries.embeddings[n]
        ranked = [candidates[q][j] for j in np.argsort(-scores, kind="stable")]
        hits, precisions = 0, []
        for rank, c in enumerate(ranked, 1):
            if c in relevant[q]:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / len(relevant[q]))
    assert result["metrics"]["mAP@50"] == pytest.approx(np.mean(aps))
    assert result["shortlist"] == 10 and result["num_queries"] == 3
    assert "full_pool" not in result

    # the same ranking against all positives in the pool (P >= 4 relevant candidates), k = 5
    pool_positives = {"qa": 4, "qb": 7, "qc": 60}
    result = inquire.rerank_candidates(method, queries, gallery, candidates, relevant,
                                       full_pool_positives=pool_positives, k=5)
    aps = []
    for n, q in enumerate(queries.ids):
        rows = [int(c) for c in candidates[q]]
        scores = gallery.embeddings[rows] @ queries.embeddings[n]
        ranked = [candidates[q][j] for j in np.argsort(-scores, kind="stable")][:5]
        hits, precision_sum = 0, 0.0
        for rank, c in enumerate(ranked, 1):
            if c in relevant[q]:
                hits += 1
                precision_sum += hits / rank
        aps.append(precision_sum / min(5, pool_positives[q]))
    full = result["full_pool"]
    assert full["metrics"]["mAP@5"] == pytest.approx(np.mean(aps))
    assert set(full["metrics"]) == {"mAP@5", "nDCG@5", "MRR"} and full["k"] == 5
    assert full["num_positives"] == [4, 7, 60] and full["relevant_in_shortlist"] == [4, 4, 4]
    with pytest.raises(ValueError, match="'qb': 4 relevant candidates but only 3 positives"):
        inquire.rerank_candidates(method, queries, gallery, candidates, relevant,
                                  full_pool_positives={**pool_positives, "qb": 3})
    with pytest.raises(ValueError, match="no full-pool positive count"):
        inquire.rerank_candidates(method, queries, gallery, candidates, relevant,
                                  full_pool_positives={"qa": 4})


def test_training_collections_readers(tmp_path):
    sizes = make_collections(tmp_path)
    coco = collections.coco_pairs(tmp_path / "coco/annotations/captions_train2017.json",
                                  tmp_path / "coco/train2017", max_images=5)
    assert [i for i, _ in coco.images] == [f"coco/{n + 1:012d}.jpg" for n in range(5)]
    assert len(coco.captions) == 10 and all(coco.images[r][0].endswith(f"{int(c.split('/')[1]) // 2 - 49:012d}.jpg")
                                            for c, _, r in coco.captions)
    cc = collections.webdataset_pairs([tmp_path / "cc12m/cc12m-train-0000.tar"], max_images=4)
    assert len(cc.images) == 4 and cc.captions[2] == (f"{cc.images[2][0]}#0", "the bird bird", 2)
    uned = collections.uned_pairs(tmp_path / "uned/uned_paths_1M.txt", tmp_path / "uned/images")
    assert len(uned.images) == sizes["uned"] and not uned.captions
    assert uned.labels[0] == "uned/0/0" and uned.labels[7] == "uned/1/1"  # (class, domain) pairs
    import pandas as pd
    pd.DataFrame({"image_path": ["a.jpg", "b.jpg"], "caption": ["x", "y"],
                  "species": ["s1", None]}).to_csv(tmp_path / "t.csv", index=False)
    table = collections.table_pairs(tmp_path / "t.csv", tmp_path, "image_path", "caption", "species")
    assert table.labels == ["biotrove/s1", None] and table.captions[1] == ("biotrove/b.jpg#0", "y", 1)
    with pytest.raises(ValueError, match="missing column"):
        collections.table_pairs(tmp_path / "t.csv", tmp_path, "path", "caption")
    merged = collections.merge({"coco": coco, "cc12m": cc})
    assert merged.captions[-1][2] == len(coco.images) + 3
    train, valid = collections.split_valid(merged, 0.3)
    assert len(train.images) + len(valid.images) == len(merged.images)
    assert len(train.captions) + len(valid.captions) == len(merged.captions)
    for part in (train, valid):  # every caption still points at its own image
        for cid, text, row in part.captions:
            original = next(r for c, _, r in merged.captions if c == cid)
            assert part.images[row][0] == merged.images[original][0]
    again = collections.split_valid(merged, 0.3)[1]
    assert [i for i, _ in again.images] == [i for i, _ in valid.images]


def _exif_rotated_jpeg(orientation: int) -> bytes:
    """A 40 x 20 JPEG, red with a blue 10 x 10 block at its top-left corner, whose EXIF says
    the camera was rotated (orientation 6: display it turned 90 degrees clockwise)."""
    from PIL import Image
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def test_core_images_come_from_ilias_core_tar_with_exif_orientation(tmp_path):
    from PIL import Image, ImageOps
    data = _exif_rotated_jpeg(6)
    members = {"ilias_core/inst_a/query/Q000_00.jpg": data,
               "ilias_core/inst_a/query/Q000_00_bbox.txt": b"1 2 3 4\n",
               "ilias_core/inst_a/query/T000.txt": b"a red box\n",
               "ilias_core/inst_a/pos/P000_00.jpg": jpeg_bytes(3),
               "ilias_core/inst_a/pos/P000_00_bbox.txt": b"1 2 3 4\n"}
    tar = write_tar(tmp_path / "ilias_core.tar", members)
    queries = ilias.image_query_items(tar)
    positives = ilias.positive_items(tar)
    assert [i for i, _ in queries] == ["inst_a/query/Q000_00.jpg"]
    assert [i for i, _ in positives] == ["inst_a/pos/P000_00.jpg"]
    assert ilias.text_query_items(tar) == [("inst_a/query/T000.txt", "a red box")]
    image = queries[0][1]()
    # independent reference: Pillow's own transposition of the file, and the geometry by hand
    # (orientation 6 turns the 40 x 20 image to 20 x 40; the top-left block goes top-right)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert image.size == (20, 40) == reference.size
    assert image.tobytes() == reference.tobytes()
    r, g, b = image.getpixel((17, 3))
    assert b > 200 and r < 60
    r, g, b = image.getpixel((3, 3))
    assert r > 200 and b < 60


def test_distractors_are_decoded_without_exif_orientation(tmp_path):
    from quari.embedding_cache import open_image
    data = _exif_rotated_jpeg(6)
    shard = write_tar(tmp_path / "yfcc100m_000000.tar", {"123.jpg": data})
    (_, ref), = ilias.distractor_items(shard)
    assert open_image(ref).size == (40, 20)  # webdataset's "pilrgb": no transposition


def test_core_without_images_is_an_error(tmp_path):
    (tmp_path / "ilias_core" / "inst" / "query").mkdir(parents=True)
    with pytest.raises(ValueError, match="no core query images"):
        ilias.image_query_items(tmp_path / "ilias_core")


def test_precomputed_inquire_embeddings_must_be_of_the_backbones_own_weights(tmp_path):
    import dataclasses

    from quari.backbones import get_backbone
    made = make_inquire(tmp_path / "inquire")  # 24-d vectors in INQUIRE's "vit-b-16" folder
    clip_b = dataclasses.replace(get_backbone("clip-vit-b16@224"), embed_dim=24)
    assert inquire.check_precomputed(clip_b, made["precomputed"]) == "vit-b-16"
    # INQUIRE's data/README.md and src/utils.py: vit-l-14 is openai/clip-vit-large-patch14 at
    # 224 px. The 336 px model has the same width (768) but other weights: refused.
    l336 = get_backbone("clip-vit-l14@336")
    assert l336.embed_dim == get_backbone("clip-vit-l14@224").embed_dim == 768
    with pytest.raises(ValueError, match="publishes no precomputed iNat24 embeddings of backbone "
                                         "clip-vit-l14@336"):
        inquire.check_precomputed(l336, tmp_path / "vit-l-14")
    assert inquire.check_precomputed(get_backbone("clip-vit-l14@224")) == "vit-l-14"
    with pytest.raises(ValueError, match="publishes no precomputed"):
        inquire.check_precomputed(get_backbone("siglip2-vit-b16@512"))
    # a folder of another model (INQUIRE names each folder after its model) is refused
    with pytest.raises(ValueError, match="named 'vit-b-16'"):
        inquire.check_precomputed(dataclasses.replace(get_backbone("clip-vit-l14@224"),
                                                      embed_dim=24), made["precomputed"])
    with pytest.raises(ValueError, match="24-d embeddings"):
        inquire.check_precomputed(get_backbone("clip-vit-b16@224"), made["precomputed"])
    assert inquire.check_precomputed(get_backbone("siglip-so400m14@384")) == "siglip-so400m-14-384"


def test_rerank_candidates_are_decoded_as_the_datasets_library_decodes_them(tmp_path):
    # INQUIRE's eval_rerank_with_clip.py reads INQUIRE-Rerank with `datasets` (2.19.2), whose
    # Image feature applies the EXIF orientation: the reference is that library's own decoder
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.features import Image as DatasetsImage
    from quari.embedding_cache import open_image
    data = _exif_rotated_jpeg(6)
    table = pa.table({"image": [{"bytes": data, "path": None}], "query": ["a red box"],
                      "relevant": [1], "inat24_image_id": [42]})
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    (image_id, source), = inquire.rerank_gallery_items([tmp_path / "test-00000-of-00001.parquet"],
                                                       tmp_path / "img")
    reference = DatasetsImage().decode_example({"bytes": data, "path": None}).convert("RGB")
    image = open_image(source)
    assert image_id == "42" and image.size == reference.size == (20, 40)
    assert image.tobytes() == reference.tobytes()
