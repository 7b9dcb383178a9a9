"""Backbone registry, ILIAS/INQUIRE preprocessing and loading through tiny random local models."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from quari.backbones import (
    BACKBONES, BackboneInfo, as_open_clip, get_backbone, ilias_transform, list_backbones,
    load_backbone, model_transform, pad_collate)
from tests.builders import PAPER_CSV, save_tiny_clip, save_tiny_siglip

TEXTS = ["A red bird", "photo of the cat on a branch", "unseen words here"]


def test_registry_names_are_the_papers():
    expected = {"clip-vit-b16@224", "clip-vit-l14@336", "openclip-vit-l14@384",
                "siglip-vit-b16@512", "siglip-vit-l16@384", "siglip-so400m14@384",
                "siglip2-vit-b16@512", "siglip2-vit-l16@512"}
    assert expected <= set(list_backbones())
    with PAPER_CSV.open() as f:
        used = {row["backbone"].split(" ")[0] for row in csv.DictReader(f)}
    assert {n for n in used if "@" in n} <= set(list_backbones())
    for name, info in BACKBONES.items():
        assert info.name == name and get_backbone(name) is info


def test_unknown_backbone_lists_registry():
    with pytest.raises(KeyError) as err:
        get_backbone("resnet-50@224")
    for name in list_backbones():
        assert name in str(err.value)


def test_open_clip_names_exist_in_open_clip_registry():
    open_clip = pytest.importorskip("open_clip")
    models, pretrained = set(open_clip.list_models()), set(open_clip.list_pretrained())
    for info in BACKBONES.values():
        if info.library == "open_clip":
            assert info.model in models and (info.model, info.pretrained) in pretrained
        assert (info.open_clip_model, info.open_clip_pretrained) in pretrained, info.name
        oc = as_open_clip(info)
        assert oc.library == "open_clip" and oc.model in models


def test_registry_values_are_consistent():
    for info in BACKBONES.values():
        assert info.library in ("transformers", "open_clip")
        assert info.test_resolution >= info.train_resolution
        # the name ends with the resolution the paper labels it by (train, or ILIAS test for openclip)
        assert int(info.name.split("@")[1]) in (info.train_resolution, info.test_resolution)
        assert str(info.patch_size) in info.name.split("@")[0]


def test_ilias_transform_normalises_and_defaults_to_the_test_resolution():
    info = get_backbone("siglip-vit-b16@512")
    # a constant image maps to (c - mean) / std (c on the 8-bit grid: 0.75 -> 191 / 255)
    flat = ilias_transform(info, resolution=64)(torch.full((3, 64, 32), 0.75))
    value = (round(0.75 * 255) / 255 - 0.5) / 0.5
    assert torch.allclose(flat, torch.full((3, 64, 32), value), atol=1e-5)
    # default resolution is the ILIAS test resolution; 724 pads to 736 for patch 16
    assert ilias_transform(info)(torch.rand(3, 50, 100)).shape == (3, 368, 736)


def test_ilias_transform_accepts_pil_and_landscape():
    Image = pytest.importorskip("PIL.Image")
    info = get_backbone("clip-vit-l14@336")  # ILIAS tests it at 512
    out = ilias_transform(info)(Image.new("RGB", (640, 480), (255, 0, 0)))
    assert out.shape == (3, 392, 518)  # 512 x 384 padded to multiples of 14, centred
    expected_red = (1.0 - info.mean[0]) / info.std[0]
    assert torch.allclose(out[0, 4:388, 3:515], torch.full((384, 512), expected_red), atol=1e-3)


def test_pad_collate_pads_to_common_size():
    batch = pad_collate([torch.ones(3, 32, 16), torch.ones(3, 16, 48)])
    assert batch.shape == (2, 3, 32, 48)
    assert batch[0, :, :32, :16].eq(1).all() and batch[0, :, :, 16:].eq(0).all()
    assert batch[1, :, :16, :].eq(1).all() and batch[1, :, 16:, :].eq(0).all()


def test_model_transform_is_the_square_eval_transform():
    clip = model_transform(get_backbone("clip-vit-b16@224"))(torch.rand(3, 300, 450))
    siglip = model_transform(get_backbone("siglip-vit-l16@384"))(torch.rand(3, 300, 450))
    assert clip.shape == (3, 224, 224) and siglip.shape == (3, 384, 384)


# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory) -> tuple[Path, BackboneInfo]:
    directory = tmp_path_factory.mktemp("tiny_siglip")
    return directory, save_tiny_siglip(directory)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, BackboneInfo]:
    directory = tmp_path_factory.mktemp("tiny_clip")
    save_tiny_clip(directory)
    info = dataclasses.replace(get_backbone("clip-vit-b16@224"), name="tiny-clip", embed_dim=24,
                               patch_size=8, train_resolution=32, test_resolution=40)
    return directory, info


@pytest.mark.parametrize("fixture", ["tiny_siglip", "tiny_clip"])
def test_transformers_encoder_from_local_dir(fixture, request):
    directory, info = request.getfixturevalue(fixture)
    encoder = load_backbone(info, path=directory)
    assert encoder.embed_dim == info.embed_dim

    transform = ilias_transform(info)
    images = [transform(torch.rand(3, 60, 30, generator=torch.Generator().manual_seed(s)))
              for s in range(3)]
    assert images[0].shape == (3, 40, 24)  # dynamic, non-square, patch multiple
    batch = pad_collate(images)
    emb = encoder.encode_images(batch)
    assert emb.shape == (3, info.embed_dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(emb, encoder.encode_images(batch))  # deterministic
    assert not torch.allclose(emb[0], emb[1])  # inputs matter
    # batch composition does not change an image's embedding when sizes agree
    assert torch.allclose(encoder.encode_images(batch[:1]), emb[:1], atol=1e-5)
    square = model_transform(info)(torch.rand(3, 50, 70))
    assert encoder.encode_images(square[None]).shape == (1, info.embed_dim)

    text = encoder.encode_texts(TEXTS)
    assert text.shape == (3, info.embed_dim)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(text, encoder.encode_texts(TEXTS))
    assert not torch.allclose(text[0], text[1])
    # a text's embedding does not depend on the rest of the batch
    assert torch.allclose(encoder.encode_texts(TEXTS[:1]), text[:1], atol=1e-5)


def test_siglip_text_is_canonicalised(tiny_siglip):
    directory, info = tiny_siglip
    encoder = load_backbone(info, path=directory)
    assert torch.equal(encoder.encode_texts(["RED, BIRD!"]), encoder.encode_texts(["red bird"]))
    cased = load_backbone(dataclasses.replace(info, text_clean="none"), path=directory)
    # the tiny vocabulary is lower case, so without lowercasing the words become [UNK]
    assert not torch.allclose(cased.encode_texts(["RED BIRD"]), cased.encode_texts(["red bird"]))


def test_registry_dim_mismatch_is_reported(tiny_clip):
    directory, info = tiny_clip
    with pytest.raises(ValueError, match="registry says"):
        load_backbone(dataclasses.replace(info, embed_dim=7), path=directory)


def test_open_clip_encoder_from_local_dir(tmp_path):
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                          "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(2)
    torch.save(CLIP(**cfg).state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    info = dataclasses.replace(as_open_clip(get_backbone("clip-vit-b16@224")), name="tiny-oc",
                               embed_dim=16, patch_size=8, train_resolution=32)
    encoder = load_backbone(info, path=tmp_path)
    images = torch.stack([model_transform(info)(torch.rand(3, 40, 50)) for _ in range(2)])
    emb = encoder.encode_images(images)
    assert emb.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(emb, encoder.encode_images(images))
    text = encoder.encode_texts(TEXTS)
    assert text.shape == (3, 16) and torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="dynamic"):
        encoder.encode_images(torch.zeros(1, 3, 40, 24))


def test_cuda_request_falls_back_to_cpu(tiny_clip):
    if torch.cuda.is_available():
        pytest.skip("CUDA present; fallback not exercised")
    directory, info = tiny_clip
    assert load_backbone(info, path=directory, device="cuda").device.type == "cpu"


@pytest.mark.gpu
def test_cuda_mixed_precision_matches_cpu(tiny_siglip):
    directory, info = tiny_siglip
    images = pad_collate([ilias_transform(info)(torch.rand(3, 60, 30)) for _ in range(2)])
    cpu = load_backbone(info, path=directory).encode_images(images)
    gpu = load_backbone(info, path=directory, device="cuda").encode_images(images).cpu()
    assert gpu.dtype == torch.float32
    assert torch.allclose(cpu, gpu, atol=2e-2)
