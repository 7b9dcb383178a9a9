"""The embedding cache: images and texts through a tiny random SigLIP into resumable shards."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quari import backbones
from quari.backbones import ilias_transform, load_backbone
from quari.embedding_cache import SKIPPED, embed_images, embed_texts, main, read_items_tsv
from quari.store import MANIFEST, embedding_set_meta, load_embedding_set
from tests.builders import save_tiny_siglip

Image = pytest.importorskip("PIL.Image")

TEXTS = ["a red bird", "photo of the cat", "the cat on a branch", "bird", "a photo of a bird"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random SigLIP saved locally, its registry entry, and a folder of small JPEGs."""
    model_dir = tmp_path_factory.mktemp("tiny_siglip")
    info = save_tiny_siglip(model_dir)

    image_dir = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    items = []
    for n in range(10):
        # three aspect ratios, so ILIAS batches mix tensor sizes
        h, w = [(48, 64), (64, 48), (50, 50)][n % 3]
        path = image_dir / f"im{n}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        items.append((f"im{n}", str(path)))
    (image_dir / "corrupt.jpg").write_bytes(b"this is not a jpeg" * 10)
    truncated = (image_dir / "im0.jpg").read_bytes()
    (image_dir / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    items.insert(2, ("corrupt", str(image_dir / "corrupt.jpg")))
    items.insert(9, ("truncated", str(image_dir / "truncated.jpg")))
    items.append(("missing", str(image_dir / "nope.jpg")))
    return model_dir, info, items


@pytest.fixture(scope="module")
def encoder(tiny):
    model_dir, info, _ = tiny
    return load_backbone(info, path=model_dir)


class CountingEncoder:
    """Wraps an encoder and counts the images and texts it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.images, self.texts = inner, 0, 0
        self.info, self.device, self.embed_dim = inner.info, inner.device, inner.embed_dim

    def encode_images(self, images):
        self.images += len(images)
        return self.inner.encode_images(images)

    def encode_texts(self, texts):
        self.texts += len(texts)
        return self.inner.encode_texts(texts)


BAD = {"corrupt", "truncated", "missing"}


def _folder_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_embed_images_matches_single_image_reference(tiny, encoder, tmp_path):
    _, info, items = tiny
    transform = ilias_transform(info)
    result = embed_images(encoder, items, tmp_path, transform, batch_size=3, shard_rows=4,
                          num_workers=2, progress=False)
    good = [(i, p) for i, p in items if i not in BAD]
    assert result.ids == [i for i, _ in good]
    assert result.embeddings.shape == (len(good), info.embed_dim)

    # independent reference: each image decoded here and encoded alone (batch of one)
    reference = torch.cat([encoder.encode_images(transform(Image.open(p).convert("RGB"))[None])
                           for _, p in good]).numpy()
    emb = np.asarray(result.embeddings, dtype=np.float32)
    np.testing.assert_allclose(emb, reference, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)

    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert len(manifest["shards"]) == 4  # 13 items in shards of 4 item positions
    for shard in manifest["shards"]:
        assert np.load(tmp_path / shard["file"]).dtype == np.float16
    assert [s["rows"] for s in manifest["shards"]] == [3, 4, 3, 0]  # the last holds only "missing"

    lines = (tmp_path / SKIPPED).read_text().splitlines()
    assert lines[0] == "id\treason"
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == ["corrupt", "truncated", "missing"]
    assert all(r[1] for r in rows) and "nope.jpg" in rows[2][1]
    meta = embedding_set_meta(tmp_path)
    assert (meta["requested"], meta["embedded"], meta["skipped"]) == (len(items), len(good), 3)
    assert meta["requested"] == meta["embedded"] + meta["skipped"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no state left behind


def test_bytes_and_callable_sources_equal_paths(tiny, encoder, tmp_path):
    _, info, items = tiny
    good = [(i, p) for i, p in items if i not in BAD][:4]
    transform = ilias_transform(info)
    by_path = embed_images(encoder, good, tmp_path / "paths", transform, num_workers=0,
                           progress=False)
    mixed = [(good[0][0], Path(good[0][1]).read_bytes()),
             (good[1][0], functools.partial(Path.read_bytes, Path(good[1][1]))),
             (good[2][0], functools.partial(Image.open, good[2][1])),
             good[3]]
    by_mixed = embed_images(encoder, mixed, tmp_path / "mixed", transform, num_workers=2,
                            progress=False)
    assert by_mixed.ids == by_path.ids
    np.testing.assert_array_equal(np.asarray(by_mixed.embeddings), np.asarray(by_path.embeddings))


class Interrupt(Exception):
    pass


def _stop_after(shard: int):
    def hook(k: int) -> None:
        if k == shard:
            raise Interrupt
    return hook


@pytest.mark.parametrize("stop_after", [0, 2])
def test_resume_skips_written_shards_and_matches_uninterrupted(tiny, encoder, tmp_path,
                                                               stop_after):
    _, info, items = tiny
    kwargs = dict(transform=ilias_transform(info), batch_size=3, shard_rows=4, num_workers=0,
                  progress=False)
    full = CountingEncoder(encoder)
    embed_images(full, items, tmp_path / "full", **kwargs)
    assert full.images == len(items) - len(BAD)

    first = CountingEncoder(encoder)
    with pytest.raises(Interrupt):
        embed_images(first, items, tmp_path / "cut", on_shard=_stop_after(stop_after), **kwargs)
    assert not (tmp_path / "cut" / MANIFEST).exists()
    assert not (tmp_path / "cut" / SKIPPED).exists()
    written = [i for i, _ in items[: 4 * (stop_after + 1)] if i not in BAD]
    assert first.images == len(written)

    second = CountingEncoder(encoder)
    embed_images(second, items, tmp_path / "cut", **kwargs)
    assert second.images == full.images - len(written)  # written shards are not recomputed
    assert _folder_bytes(tmp_path / "cut") == _folder_bytes(tmp_path / "full")

    # a complete folder is returned without encoding; other items in it are refused
    third = CountingEncoder(encoder)
    again = embed_images(third, items, tmp_path / "cut", **kwargs)
    assert third.images == 0 and len(again) == full.images
    with pytest.raises(FileExistsError):
        embed_images(encoder, items[:-1], tmp_path / "cut", **kwargs)


def test_partial_folder_of_other_items_is_refused(tiny, encoder, tmp_path):
    _, info, items = tiny
    kwargs = dict(transform=ilias_transform(info), shard_rows=4, num_workers=0, progress=False)
    with pytest.raises(Interrupt):
        embed_images(encoder, items, tmp_path, on_shard=_stop_after(0), **kwargs)
    with pytest.raises(ValueError, match="another job"):
        embed_images(encoder, items[1:], tmp_path, **kwargs)
    with pytest.raises(ValueError, match="unique"):
        embed_images(encoder, items + items[:1], tmp_path / "dup", **kwargs)


def test_embed_texts_round_trip_and_resume(encoder, tmp_path):
    items = [(f"q{n}", t) for n, t in enumerate(TEXTS)]
    result = embed_texts(encoder, items, tmp_path / "full", batch_size=2, shard_rows=3,
                         progress=False)
    assert result.ids == [i for i, _ in items]
    reference = torch.cat([encoder.encode_texts([t]) for t in TEXTS]).numpy()
    np.testing.assert_allclose(np.asarray(result.embeddings, dtype=np.float32), reference,
                               atol=2e-3)
    meta = embedding_set_meta(tmp_path / "full")
    assert (meta["kind"], meta["requested"], meta["embedded"], meta["skipped"]) == \
        ("texts", 5, 5, 0)

    with pytest.raises(Interrupt):
        embed_texts(encoder, items, tmp_path / "cut", batch_size=2, shard_rows=3,
                    on_shard=_stop_after(0), progress=False)
    counting = CountingEncoder(encoder)
    embed_texts(counting, items, tmp_path / "cut", batch_size=2, shard_rows=3, progress=False)
    assert counting.texts == 2
    assert _folder_bytes(tmp_path / "cut") == _folder_bytes(tmp_path / "full")


def test_empty_item_list_gives_empty_set(encoder, tmp_path):
    result = embed_texts(encoder, [], tmp_path, progress=False)
    assert len(result) == 0 and result.dim == encoder.embed_dim
    assert embedding_set_meta(tmp_path)["requested"] == 0


def test_command_line(tiny, tmp_path, monkeypatch):
    model_dir, info, items = tiny
    monkeypatch.setitem(backbones.BACKBONES, info.name, info)
    image_dir = Path(items[0][1]).parent
    (tmp_path / "images.tsv").write_text("".join(f"{i}\t{Path(p).name}\n" for i, p in items[:5]))
    (tmp_path / "texts.tsv").write_text("".join(f"q{n}\t{t}\n" for n, t in enumerate(TEXTS)))
    assert read_items_tsv(tmp_path / "images.tsv", root=image_dir)[0] == items[0]
    assert main(["--backbone", info.name, "--model-path", str(model_dir),
                 "--images", str(tmp_path / "images.tsv"), "--root", str(image_dir),
                 "--texts", str(tmp_path / "texts.tsv"), "--out", str(tmp_path / "out"),
                 "--workers", "0", "--device", "cpu"]) == 0
    images = load_embedding_set(tmp_path / "out" / "images")
    assert images.ids == [i for i, _ in items[:5] if i not in BAD]
    assert embedding_set_meta(tmp_path / "out" / "images")["skipped"] == 1
    assert load_embedding_set(tmp_path / "out" / "texts").ids == [f"q{n}" for n in range(5)]


@pytest.mark.gpu
def test_cuda_mixed_precision_matches_cpu(tiny, encoder, tmp_path):
    model_dir, info, items = tiny
    kwargs = dict(transform=ilias_transform(info), batch_size=4, num_workers=2, progress=False)
    cpu = embed_images(encoder, items, tmp_path / "cpu", **kwargs)
    gpu = embed_images(load_backbone(info, path=model_dir, device="cuda"), items,
                       tmp_path / "gpu", **kwargs)
    assert gpu.ids == cpu.ids
    np.testing.assert_allclose(np.asarray(gpu.embeddings, dtype=np.float32),
                               np.asarray(cpu.embeddings, dtype=np.float32), atol=2e-2)
