"""On-disk formats: round trips, sharding, resumable writing, refusal of incomplete sets."""

import numpy as np
import pytest

from quari.store import (EmbeddingSetWriter, iter_shards, load_embedding_set, load_positives,
                         load_training_collection, save_embedding_set, save_positives,
                         save_training_collection)

from tests.builders import random_collection


def test_embedding_set_round_trip_with_shards(tmp_path, rng):
    emb = rng.standard_normal((25, 8)).astype(np.float32)
    ids = [f"id{i}" for i in range(25)]
    save_embedding_set(tmp_path / "set", emb, ids, shard_rows=10)
    assert len(list(iter_shards(tmp_path / "set"))) == 3
    loaded = load_embedding_set(tmp_path / "set")
    assert loaded.ids == ids
    assert loaded.embeddings.dtype == np.float16
    np.testing.assert_allclose(loaded.embeddings, emb, atol=2e-3)


def test_incomplete_set_is_refused_and_resumes(tmp_path, rng):
    writer = EmbeddingSetWriter(tmp_path / "set", dim=4)
    writer.add_shard(rng.standard_normal((3, 4)), ["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="not a complete embedding set"):
        load_embedding_set(tmp_path / "set")
    # a new writer (a restarted job) sees the completed shard and continues after it
    again = EmbeddingSetWriter(tmp_path / "set", dim=4)
    assert again.completed_rows == 3
    again.add_shard(rng.standard_normal((2, 4)), ["d", "e"])
    again.close()
    assert load_embedding_set(tmp_path / "set").ids == ["a", "b", "c", "d", "e"]


def test_shard_shape_and_id_checks(tmp_path, rng):
    writer = EmbeddingSetWriter(tmp_path / "set", dim=4)
    with pytest.raises(ValueError):
        writer.add_shard(rng.standard_normal((3, 5)), ["a", "b", "c"])
    with pytest.raises(ValueError):
        writer.add_shard(rng.standard_normal((3, 4)), ["a", "b"])
    with pytest.raises(ValueError):
        writer.add_shard(rng.standard_normal((1, 4)), ["a\nb"])


def test_training_collection_and_positives_round_trip(tmp_path, rng):
    coll = random_collection(rng)
    save_training_collection(tmp_path / "c", coll)
    again = load_training_collection(tmp_path / "c")
    assert again.images.ids == coll.images.ids
    np.testing.assert_array_equal(again.caption_image, coll.caption_image)
    np.testing.assert_array_equal(again.image_labels, coll.image_labels)
    save_positives(tmp_path / "gt.json", {"q1": ["b", "a"], "q2": []})
    assert load_positives(tmp_path / "gt.json") == {"q1": {"a", "b"}, "q2": set()}


def test_a_sharded_set_loads_as_a_view_that_reads_like_the_concatenation(tmp_path, rng):
    """Several shards are never concatenated on load; slices, rows and gathers of the view equal
    those of the concatenated array, and a streaming search and a re-ranking over it agree."""
    import torch

    from quari.methods import get_method
    from quari.scoring import cosine_topk
    from quari.store import ShardedRows

    x = rng.standard_normal((23, 6)).astype(np.float16)
    writer = EmbeddingSetWriter(tmp_path / "set", dim=6)
    for start in range(0, 23, 5):
        writer.add_shard(x[start:start + 5], [f"r{i}" for i in range(start, min(start + 5, 23))])
    writer.close()
    loaded = load_embedding_set(tmp_path / "set")
    rows = loaded.embeddings
    assert isinstance(rows, ShardedRows) and rows.shape == (23, 6) and len(loaded.ids) == 23
    for sl in (slice(0, 23), slice(3, 17), slice(4, 5), slice(20, 40), slice(7, 7), slice(1, 20, 3)):
        np.testing.assert_array_equal(rows[sl], x[sl])
    np.testing.assert_array_equal(rows[12], x[12])
    np.testing.assert_array_equal(rows[-1], x[-1])
    gather = rng.integers(0, 23, size=(4, 7))
    np.testing.assert_array_equal(rows[gather], x[gather])
    np.testing.assert_array_equal(np.asarray(rows), x)
    with pytest.raises(IndexError):
        rows[np.array([23])]
    np.testing.assert_array_equal(load_embedding_set(tmp_path / "set", mmap=False).embeddings, x)

    queries = torch.from_numpy(rng.standard_normal((3, 6)).astype(np.float32))
    s_view, i_view = cosine_topk(queries, rows, k=8, chunk_rows=4)
    s_full, i_full = cosine_topk(queries, x, k=8, chunk_rows=4)
    assert torch.equal(i_view, i_full) and torch.allclose(s_view, s_full)
    method = get_method("identity")(device="cpu")
    assert torch.allclose(method.rerank(queries, rows, gather[:3]), method.rerank(queries, x, gather[:3]))


# -- compact, memory-mapped ids -------------------------------------------------------------------

def test_ids_load_as_a_memory_mapped_column_that_reads_like_the_list(tmp_path, monkeypatch):
    import quari.store as store
    from quari.store import IdColumn, find_rows

    monkeypatch.setattr(store, "ID_BLOCK_ROWS", 3)  # several blocks per shard
    ids = [f"inst_{i:03d}/pos/é{i}" for i in range(17)] + ["x", "a much longer id than the others"]
    save_embedding_set(tmp_path / "set", np.zeros((19, 4)), ids, shard_rows=7)
    loaded = load_embedding_set(tmp_path / "set")
    assert isinstance(loaded.ids, IdColumn) and len(loaded.ids.parts) == 3
    assert all(isinstance(p, np.memmap) for p in loaded.ids.parts)
    assert loaded.ids == ids and ids == loaded.ids and list(loaded.ids) == ids
    assert loaded.ids != ids[:-1] + ["y"]
    assert loaded.ids[5] == ids[5] and loaded.ids[-1] == ids[-1] and loaded.ids[3:9] == ids[3:9]
    rows = np.array([[18, 0, 7], [6, 6, 17]])
    np.testing.assert_array_equal(loaded.ids.take(rows), np.array(ids, dtype=object)[rows])
    with pytest.raises(IndexError):
        loaded.ids.take([19])
    # ids to rows in one pass: every match, nothing for absent or truncated-prefix ids
    wanted = {ids[2], ids[9], ids[18], "x", "inst_00", "absent", ids[17][:-1]}
    found = find_rows(loaded.ids, wanted)
    assert found.keys() == {ids[2], ids[9], ids[18], "x"}
    assert {i: r.tolist() for i, r in found.items()} == {ids[2]: [2], ids[9]: [9], ids[18]: [18],
                                                         "x": [17]}
    assert {i: r.tolist() for i, r in find_rows(ids, wanted).items()} == {
        i: r.tolist() for i, r in found.items()}
    assert find_rows(loaded.ids, []) == {}
    assert load_embedding_set(tmp_path / "set", mmap=False).ids == ids
    assert IdColumn.from_strings(["b", "a", "b"]).find(["b"])[0].tolist() == [0, 2]


def test_sets_written_before_id_arrays_still_load(tmp_path):
    import json

    ids = [f"id{i}" for i in range(9)]
    save_embedding_set(tmp_path / "set", np.ones((9, 3)), ids, shard_rows=4)
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    for shard in manifest["shards"]:  # the previous format: text ids only
        (tmp_path / "set" / shard.pop("id_array")).unlink()
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_embedding_set(tmp_path / "set")
    assert loaded.ids == ids and isinstance(loaded.ids, list)


def test_ids_must_not_end_with_nul(tmp_path):
    with pytest.raises(ValueError, match="NUL"):
        save_embedding_set(tmp_path / "set", np.ones((1, 3)), ["a\0"])


# -- streamed, uncompressed .npz files -------------------------------------------------------------

def npz_arrays(rng, images):
    """Arrays of the local-descriptor layout (and a few more dtypes) for ``images`` images."""
    return {"ids": np.array([f"img-{i}" for i in range(images)], dtype=str),
            "descriptors": rng.standard_normal((images, 5, 7)).astype(np.float16),
            "xy": rng.random((images, 5, 2)).astype(np.float32),
            "counts": rng.integers(0, 6, images).astype(np.int64),
            "wide": rng.standard_normal((images, 3)),  # float64
            "flags": rng.random(images) > 0.5}


def streamed_npz(path, arrays, block_rows=2):
    """Write ``arrays`` with NpzWriter: the 3-d ones appended ``block_rows`` rows at a time."""
    from quari.store import atomic_write_npz

    def fill(npz):
        for name, array in arrays.items():
            if array.ndim == 3:
                with npz.rows(name, array.shape, array.dtype) as append:
                    for start in range(0, len(array), block_rows):
                        append(array[start:start + block_rows])
            else:
                npz.write(name, array)
    atomic_write_npz(path, fill)


@pytest.mark.parametrize("images", [0, 1, 5])
def test_streamed_npz_reads_back_as_np_savez_writes_it(tmp_path, rng, images):
    import zipfile

    arrays = npz_arrays(rng, images)
    streamed_npz(tmp_path / "streamed.npz", arrays)
    np.savez(tmp_path / "reference.npz", **arrays)
    with np.load(tmp_path / "streamed.npz") as got, np.load(tmp_path / "reference.npz") as ref:
        assert got.files == ref.files == list(arrays)
        for name in arrays:
            assert got[name].dtype == ref[name].dtype == arrays[name].dtype
            assert got[name].shape == ref[name].shape
            np.testing.assert_array_equal(got[name], ref[name])
    with zipfile.ZipFile(tmp_path / "streamed.npz") as archive:  # uncompressed members, CRCs valid
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
        assert archive.testzip() is None


def test_a_memmapped_member_equals_np_load_and_is_aligned(tmp_path, rng):
    from quari.store import NPZ_ALIGNMENT, load_npz_array, memmap_npz_array

    arrays = npz_arrays(rng, 6)
    streamed_npz(tmp_path / "streamed.npz", arrays, block_rows=4)
    np.savez(tmp_path / "np_savez.npz", **arrays)  # files written before keep their layout
    for name in ("streamed.npz", "np_savez.npz"):
        for key, array in arrays.items():
            mapped = memmap_npz_array(tmp_path / name, key)
            assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
            assert mapped.dtype == array.dtype
            np.testing.assert_array_equal(mapped, array)
            if name == "streamed.npz":
                assert mapped.offset % NPZ_ALIGNMENT == 0  # offset of the data in the file
    # the memmap reads the file's bytes: change them on disk and the map sees it
    mapped = load_npz_array(tmp_path / "streamed.npz", "descriptors")
    with open(tmp_path / "streamed.npz", "r+b") as f:
        f.seek(mapped.offset)
        f.write(np.float16(1234.0).tobytes())
    assert memmap_npz_array(tmp_path / "streamed.npz", "descriptors")[0, 0, 0] == 1234.0


def test_a_compressed_member_is_read_into_memory(tmp_path, rng, caplog):
    import logging

    from quari.store import load_npz_array, memmap_npz_array

    x = rng.standard_normal((4, 3)).astype(np.float16)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    assert memmap_npz_array(tmp_path / "c.npz", "x") is None
    with caplog.at_level(logging.INFO, logger="quari.store"):
        got = load_npz_array(tmp_path / "c.npz", "x")
    assert not isinstance(got, np.memmap) and got.dtype == np.float16
    np.testing.assert_array_equal(got, x)
    assert "compressed" in caplog.text and "c.npz" in caplog.text


def test_truncated_or_missing_arrays_are_named(tmp_path, rng):
    from quari.store import NpzFormatError, load_npz_array, read_npz_arrays

    streamed_npz(tmp_path / "whole.npz", npz_arrays(rng, 5))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    for mmap in (True, False):
        with pytest.raises(NpzFormatError, match="cut.npz.*truncated"):
            load_npz_array(tmp_path / "cut.npz", "descriptors", mmap=mmap)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(NpzFormatError, match="empty.npz"):
        read_npz_arrays(tmp_path / "empty.npz", ["ids"])
    for mmap in (True, False):
        with pytest.raises(KeyError, match="whole.npz.*'nope'"):
            load_npz_array(tmp_path / "whole.npz", "nope", mmap=mmap)


def test_rows_must_match_the_declared_shape_and_a_failed_write_keeps_the_old_file(tmp_path, rng):
    from quari.store import atomic_write_npz

    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    atomic_write_npz(tmp_path / "a.npz", lambda npz: npz.write("x", x))
    before = (tmp_path / "a.npz").read_bytes()

    def too_few(npz):
        with npz.rows("x", (6, 2, 3), np.float32) as append:
            append(x)

    def too_many(npz):
        with npz.rows("x", (4, 2, 3), np.float32) as append:
            append(x)

    def wrong_width(npz):
        with npz.rows("x", (5, 2, 4), np.float32) as append:
            append(x)

    for fill, message in ((too_few, "5 rows appended, 6 declared"),
                          (too_many, "more than the declared 4 rows"),
                          (wrong_width, r"expected rows of shape \(2, 4\)")):
        with pytest.raises(ValueError, match=message):
            atomic_write_npz(tmp_path / "a.npz", fill)
        assert (tmp_path / "a.npz").read_bytes() == before  # untouched, no temporary left
        assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_a_large_array_is_written_in_blocks(tmp_path, rng, monkeypatch):
    """A memory-mapped input is copied block by block: the writer never asks for more rows at
    once than fit in NPZ_BLOCK_BYTES."""
    import quari.store as store

    x = rng.standard_normal((50, 4, 8)).astype(np.float16)  # 64 bytes per row
    np.save(tmp_path / "x.npy", x)
    source = np.load(tmp_path / "x.npy", mmap_mode="r")
    monkeypatch.setattr(store, "NPZ_BLOCK_BYTES", 64 * 7)
    reads = []

    class Recording:
        shape, dtype, ndim = source.shape, source.dtype, source.ndim

        def __getitem__(self, index):
            reads.append(index)
            return source[index]

    def fill(npz):
        with npz.rows("x", x.shape, x.dtype) as append:
            append(Recording())
    store.atomic_write_npz(tmp_path / "out.npz", fill)
    assert all(isinstance(r, slice) and r.stop - r.start <= 7 for r in reads) and len(reads) == 8
    with np.load(tmp_path / "out.npz") as f:
        np.testing.assert_array_equal(f["x"], x)


def test_ids_at_decodes_only_the_rows_asked():
    from quari.store import IdColumn, encode_ids, ids_at
    ids = ["a", "bb", "ccc", "d\u00e9"]
    column = IdColumn([encode_ids(ids[:3]), encode_ids(ids[3:])])
    for rows in ([3, 0, 2], np.array([1]), []):
        assert ids_at(column, rows) == ids_at(ids, rows) == [ids[r] for r in rows]
