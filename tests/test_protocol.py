"""The feature protocols against independent references (docs/protocol.md).

- mean/std, train resolution, patch size, embedding width, context length and text cleaning of
  every registry backbone against open_clip's and timm's OWN pretrained configurations for the
  same weights (not against the harness's constants);
- the ILIAS test resolution against the values of ILIAS's feature_extraction/scripts/models.sh
  (copied below with their line numbers: the official file, not the harness);
- the ILIAS resize and padding against sizes worked out by hand from the official rule
  (LargeSideResize: the short side is int(resolution * ratio); MultiplierPadding: pad // 2
  before, the rest after) for several aspect ratios.
"""

import numpy as np
import pytest
import torch

from quari.backbones import (BACKBONES, center_pad, clean_text, get_backbone, ilias_size,
                             ilias_transform, model_transform)

# ILIAS feature_extraction/scripts/models.sh (commit e81029e): timm tag -> --resolution
ILIAS_MODELS_SH = {
    "vit_base_patch16_clip_224.openai": 384,          # line 40
    "vit_large_patch14_clip_224.openai": 384,         # line 42
    "vit_large_patch14_clip_336.openai": 512,         # line 44
    "vit_large_patch14_clip_224.laion2b": 384,        # line 46
    "vit_base_patch16_siglip_512.webli": 724,         # line 116
    "vit_large_patch16_siglip_384.webli": 512,        # line 120
    "vit_base_patch16_siglip_512.v2_webli": 724,      # line 138
    "vit_large_patch16_siglip_512.v2_webli": 724,     # line 142
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_matches_open_clip_pretrained_config(name):
    open_clip = pytest.importorskip("open_clip")
    info = get_backbone(name)
    pretrained = open_clip.get_pretrained_cfg(info.open_clip_model, info.open_clip_pretrained)
    model = open_clip.get_model_config(info.open_clip_model)
    assert tuple(pretrained["mean"]) == pytest.approx(info.mean)
    assert tuple(pretrained["std"]) == pytest.approx(info.std)
    assert model["embed_dim"] == info.embed_dim
    assert model["vision_cfg"]["image_size"] == info.train_resolution
    assert model["text_cfg"]["context_length"] == info.text_context_length
    clean = (model["text_cfg"].get("tokenizer_kwargs") or {}).get("clean", "none")
    assert clean in ("none", "lower", "whitespace", "canonicalize")
    # open_clip's SimpleTokenizer (CLIP) lower-cases itself, as transformers' CLIP tokenizer does
    assert info.text_clean == ("canonicalize" if clean == "canonicalize" else "none")
    expected_resize = {"shortest": "shortest_crop", "squash": "squash"}[pretrained["resize_mode"]]
    assert info.eval_resize == expected_resize
    assert pretrained["interpolation"] == "bicubic"


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_matches_timm_pretrained_config(name):
    timm = pytest.importorskip("timm")
    info = get_backbone(name)
    cfg = timm.models.get_pretrained_cfg(info.timm_model)
    assert cfg is not None, info.timm_model
    # ILIAS normalises with timm's default_cfg mean/std (extractors/timm.py lines 26-27)
    assert tuple(cfg.mean) == pytest.approx(info.mean)
    assert tuple(cfg.std) == pytest.approx(info.std)
    assert cfg.input_size[-1] == info.train_resolution
    # ILIAS takes the patch size from the name: 16 if "patch16" in it, else 14 (timm.py line 37)
    assert info.patch_size == (16 if "patch16" in info.timm_model else 14)
    # the open_clip entry names the same weights: open_clip's hf_hub is timm's copy or the hub id
    open_clip = pytest.importorskip("open_clip")
    hub = open_clip.get_pretrained_cfg(info.open_clip_model, info.open_clip_pretrained)["hf_hub"]
    assert hub.rstrip("/") in (cfg.hf_hub_id, f"timm/{info.open_clip_model}", info.model)


def test_ilias_test_resolutions_are_those_of_models_sh():
    for info in BACKBONES.values():
        if info.timm_model in ILIAS_MODELS_SH:
            assert info.test_resolution == ILIAS_MODELS_SH[info.timm_model], info.name
    # SO400M is INQUIRE-only: the ILIAS rule for models trained at 384 (models.sh 114, 120, 136)
    assert get_backbone("siglip-so400m14@384").test_resolution == 512


# (width, height, resolution) -> (h, w) by hand from LargeSideResize:
# ratio = height / width; if ratio <= 1: h = int(resolution * ratio), w = resolution;
# else h = resolution, w = int(resolution / ratio)
HAND_SIZES = [
    ((640, 480, 512), (384, 512)),   # 512 * 0.75 = 384.0
    ((480, 640, 384), (384, 288)),   # 384 / 1.333.. = 288.00000000000006 -> 288
    ((200, 300, 100), (100, 66)),    # 100 / 1.5 = 66.67 -> 66 (rounding would give 67)
    ((1000, 333, 384), (127, 384)),  # 384 * 0.333 = 127.87 -> 127 (rounding: 128)
    ((50, 1000, 384), (384, 19)),    # 384 / 20 = 19.2 -> 19
    ((300, 300, 724), (724, 724)),   # square
    ((7000, 1, 384), (1, 384)),      # 384 / 7000 = 0.05 -> 0 -> at least 1
]


@pytest.mark.parametrize("size,expected", HAND_SIZES)
def test_ilias_size_is_the_official_truncating_rule(size, expected):
    width, height, resolution = size
    assert ilias_size(height, width, resolution) == expected


def test_center_pad_splits_like_multiplier_padding():
    # MultiplierPadding: new = ceil(size / m) * m; before = (new - size) // 2; after = the rest
    assert center_pad(66, 16) == (7, 7)
    assert center_pad(19, 16) == (6, 7)
    assert center_pad(384, 14) == (4, 4)   # 392 - 384 = 8
    assert center_pad(512, 14) == (3, 3)   # 518 - 512 = 6
    assert center_pad(724, 16) == (6, 6)   # 736 - 724 = 12
    assert center_pad(127, 14) == (6, 7)   # 140 - 127 = 13
    assert center_pad(32, 16) == (0, 0)


@pytest.mark.parametrize("width,height,name,content,padding", [
    (200, 300, "siglip-vit-b16@512", (100, 66), ((6, 6), (7, 7))),
    (1000, 333, "clip-vit-l14@336", (170, 512), ((6, 6), (3, 3))),  # 512 * 0.333 = 170.5
    (50, 1000, "clip-vit-b16@224", (384, 19), ((0, 0), (6, 7))),
])
def test_ilias_transform_centres_the_image_in_its_padding(width, height, name, content,
                                                          padding):
    from PIL import Image
    info = get_backbone(name)
    resolution = 100 if height == 300 else None
    out = ilias_transform(info, resolution)(Image.new("RGB", (width, height), (255, 255, 255)))
    (top, bottom), (left, right) = padding
    h, w = content
    assert out.shape == (3, top + h + bottom, left + w + right)
    white = torch.tensor([(1 - m) / s for m, s in zip(info.mean, info.std)]).view(3, 1, 1)
    inside = out[:, top:top + h, left:left + w]
    assert torch.allclose(inside, white.expand_as(inside), atol=1e-5)
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[:, top:top + h, left:left + w] = False
    assert torch.all(out[mask] == 0)


def test_ilias_resize_is_pil_bicubic_of_the_8bit_image():
    from PIL import Image
    info = get_backbone("siglip-vit-l16@384")  # mean = std = 0.5: x = 2 * pixel - 1
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(300, 411, 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    out = ilias_transform(info)(image)
    # by hand: 411 x 300 at 512 -> ratio 0.7299 -> h = int(373.72) = 373, w = 512
    resized = np.array(image.resize((512, 373), Image.Resampling.BICUBIC))
    expected = torch.from_numpy(resized).permute(2, 0, 1).float() / 255
    top, _ = center_pad(373, 16)
    assert torch.allclose(out[:, top:top + 373, :], expected * 2 - 1, atol=1e-6)


def test_clip_eval_crop_is_the_hugging_face_processors():
    # 303 x 200 -> short side 224, long side int(224 * 303 / 200) = int(339.36) = 339; the
    # processor's crop starts at (339 - 224) // 2 = 57 (torchvision's CenterCrop: round(57.5) = 58)
    from PIL import Image
    ramp = np.tile(np.arange(303, dtype=np.uint8)[None, :, None], (200, 1, 3))
    image = Image.fromarray(ramp)
    out = model_transform(get_backbone("clip-vit-b16@224"))(image)
    resized = image.resize((339, 224), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.array(resized.crop((57, 0, 281, 224)))).permute(2, 0, 1) / 255
    mean = torch.tensor(get_backbone("clip-vit-b16@224").mean).view(3, 1, 1)
    std = torch.tensor(get_backbone("clip-vit-b16@224").std).view(3, 1, 1)
    assert torch.allclose(out, (expected - mean) / std, atol=1e-5)


def test_model_transform_sizes_by_hand():
    from PIL import Image
    clip = model_transform(get_backbone("clip-vit-b16@224"))(Image.new("RGB", (450, 300)))
    siglip = model_transform(get_backbone("siglip-vit-l16@384"))(Image.new("RGB", (450, 300)))
    assert clip.shape == (3, 224, 224) and siglip.shape == (3, 384, 384)


def test_siglip_text_is_canonicalised_as_open_clip_does():
    pytest.importorskip("open_clip")
    # open_clip's SigLIP tokenizers clean with canonicalize: punctuation out, lower case
    assert clean_text("A Red-tailed  Hawk, perched!", "canonicalize") == "a redtailed hawk perched"
    assert clean_text("A Red Hawk.", "none") == "A Red Hawk."
    with pytest.raises(ValueError, match="unknown text cleaning"):
        clean_text("x", "upper")


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_position_embeddings_are_resampled_as_timm_does(kind, tmp_path):
    """ILIAS's timm ViTs (dynamic_img_size) resample the position table with timm's
    resample_abs_pos_embed (bicubic with antialias, i.e. PyTorch's PIL-like kernel) for every
    input size; transformers' own interpolate_pos_encoding uses the plain bicubic kernel, which
    gives other values at every size but the native one, growing or shrinking."""
    timm = pytest.importorskip("timm")
    from tests.builders import save_tiny_clip, save_tiny_siglip
    from quari.backbones import load_backbone
    if kind == "siglip":
        info = save_tiny_siglip(tmp_path)
    else:
        import dataclasses
        save_tiny_clip(tmp_path)
        info = dataclasses.replace(get_backbone("clip-vit-b16@224"), embed_dim=24, patch_size=8,
                                   train_resolution=32, test_resolution=40)
    encoder = load_backbone(info, path=tmp_path)
    embeddings = [m for m in encoder.model.modules() if hasattr(m, "patch_embedding")][0]
    original = type(embeddings).interpolate_pos_encoding.__get__(embeddings)
    prefix = 1 if kind == "clip" else 0
    table = embeddings.position_embedding.weight.unsqueeze(0)
    with torch.no_grad():
        for grid in ((5, 6), (2, 5), (4, 4)):  # grown, shrunk in one dimension, native
            tokens = torch.zeros(1, prefix + grid[0] * grid[1], table.shape[-1])
            got = embeddings.interpolate_pos_encoding(tokens, grid[0] * 8, grid[1] * 8)
            reference = timm.layers.resample_abs_pos_embed(table, new_size=grid, old_size=(4, 4),
                                                           num_prefix_tokens=prefix)
            torch.testing.assert_close(got, reference, rtol=0, atol=0)
            theirs = original(tokens, grid[0] * 8, grid[1] * 8)
            assert torch.allclose(got, theirs, atol=1e-6) == (grid == (4, 4)), grid
    # and the encoder uses it
    assert encoder.encode_images(torch.zeros(1, 3, 16, 40)).shape == (1, info.embed_dim)
