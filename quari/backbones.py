"""Named frozen vision-language backbones: registry, preprocessing and loading.

QuARI never trains the backbone; it only needs L2-normalised image and text embeddings. This
module names the backbones of the paper (the names are those of the backbone column of
`paper-numbers.csv`), records what is needed to reproduce each benchmark's feature protocol, and
loads any of them through one small `Encoder` interface.

Two preprocessing protocols (each value and its official source: docs/protocol.md):
- ILIAS (`ilias_transform`): PIL bicubic resize of the long side to the test resolution keeping
  the aspect ratio (short side truncated), no crop, normalise with the model's mean/std, zero-pad
  to a multiple of the patch size, padding centred; images of a batch may differ in size.
  Text queries are the raw description, no prompt template, cleaned as open_clip's tokenizer
  of the model cleans them (`clean_text`).
- INQUIRE (`model_transform`): the model's own evaluation transform at its train resolution.

Loading (`load_backbone`) goes through Hugging Face transformers (`AutoModel`) or open_clip
(`create_model_and_transforms`); a local directory or checkpoint passed as `path` takes the same
code path as a hub name. Heavy imports happen inside the loaders.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a frozen backbone and how its inputs must be prepared.

    `library` says which loader `load_backbone` uses; `model` is a Hugging Face hub id for
    "transformers" and an open_clip model name for "open_clip" (then `pretrained` is the open_clip
    pretrained tag). `open_clip_model`/`open_clip_pretrained` name the same weights in open_clip's
    registry (verified offline with `open_clip.list_pretrained()`), so `as_open_clip` can switch
    loader without a second registry. Every value's official source is in docs/protocol.md.
    """

    name: str                      # registry key, as spelt in paper-numbers.csv
    library: str                   # "transformers" or "open_clip"
    model: str                     # hub id (transformers) or open_clip model name
    pretrained: str | None         # open_clip pretrained tag; None for transformers
    embed_dim: int                 # joint embedding dimension E
    patch_size: int                # ViT patch size; ILIAS pads inputs to a multiple of it
    train_resolution: int          # square input side the model was trained at
    test_resolution: int           # long-side resolution of the ILIAS protocol (models.sh)
    mean: tuple[float, float, float]  # per-channel normalisation mean
    std: tuple[float, float, float]   # per-channel normalisation std
    eval_resize: str               # own eval transform: "shortest_crop" (CLIP) or "squash" (SigLIP)
    text_context_length: int       # tokens the text tower takes
    text_padding: str              # "max_length" (SigLIP was trained on fixed-length text) or "longest"
    text_clean: str                # "none", or "canonicalize" (open_clip's SigLIP tokenizers:
                                   # lower case, punctuation removed, whitespace collapsed)
    open_clip_model: str | None = None       # same weights in open_clip's registry
    open_clip_pretrained: str | None = None  # open_clip pretrained tag of those weights
    timm_model: str | None = None  # the timm tag ILIAS extracts image features with (models.sh)
    inquire_precomputed: str | None = None   # INQUIRE's name of its published iNat24
                                             # embeddings of these exact weights, if any
    notes: str = ""                # provenance and what could not be verified offline


TEXT_CLEANING = ("none", "canonicalize")


def _clip(name: str, hub_id: str, oc_model: str, oc_tag: str, timm_model: str, dim: int,
          patch: int, train_res: int, test_res: int, notes: str, mean=OPENAI_MEAN,
          std=OPENAI_STD, inquire: str | None = None) -> BackboneInfo:
    """A CLIP entry loaded through transformers."""
    return BackboneInfo(
        name=name, library="transformers", model=hub_id, pretrained=None, embed_dim=dim,
        patch_size=patch, train_resolution=train_res, test_resolution=test_res,
        mean=mean, std=std, eval_resize="shortest_crop", text_context_length=77,
        text_padding="longest", text_clean="none", open_clip_model=oc_model,
        open_clip_pretrained=oc_tag, timm_model=timm_model, inquire_precomputed=inquire,
        notes=notes)


def _siglip(name: str, hub_id: str, oc_model: str, timm_model: str, dim: int, patch: int,
            train_res: int, test_res: int, notes: str, inquire: str | None = None
            ) -> BackboneInfo:
    """A SigLIP/SigLIP2 entry (WebLI weights) loaded through transformers."""
    return BackboneInfo(
        name=name, library="transformers", model=hub_id, pretrained=None, embed_dim=dim,
        patch_size=patch, train_resolution=train_res, test_resolution=test_res,
        mean=SIGLIP_MEAN, std=SIGLIP_STD, eval_resize="squash", text_context_length=64,
        text_padding="max_length", text_clean="canonicalize", open_clip_model=oc_model,
        open_clip_pretrained="webli", timm_model=timm_model, inquire_precomputed=inquire,
        notes=notes)


# Hub ids cannot be checked offline (the hub is unreachable here); they follow the public model
# cards and the ids the released QuARI code loads (openai/clip-*, google/siglip2-*). The
# open_clip names and tags, the timm tags and every mean/std, resolution and context length are
# checked against open_clip's and timm's own pretrained configurations in the tests.
# Test resolutions are those of ILIAS's feature_extraction/scripts/models.sh for the same timm
# tag; SO400M is not in ILIAS (INQUIRE only) and gets the ILIAS rule for 384-trained models.
# transformers is the default loader because its ViTs take any patch-multiple input size
# (interpolate_pos_encoding), which the ILIAS protocol needs; open_clip's own ViT does not.
_ENTRIES = (
    _clip("clip-vit-b16@224", "openai/clip-vit-base-patch16", "ViT-B-16", "openai",
          "vit_base_patch16_clip_224.openai", 512, 16, 224, 384,
          "OpenAI CLIP ViT-B/16; QuARI release clip-vit-base-patch16.", inquire="vit-b-16"),
    _clip("clip-vit-l14@224", "openai/clip-vit-large-patch14", "ViT-L-14", "openai",
          "vit_large_patch14_clip_224.openai", 768, 14, 224, 384,
          "OpenAI CLIP ViT-L/14 at 224: the weights of the QuARI CLIP-L release and of "
          "INQUIRE's vit-l-14 embeddings; not a row of the paper's tables.", inquire="vit-l-14"),
    _clip("clip-vit-l14@336", "openai/clip-vit-large-patch14-336", "ViT-L-14-336", "openai",
          "vit_large_patch14_clip_336.openai", 768, 14, 336, 512,
          "OpenAI CLIP ViT-L/14 at 336; ILIAS tests it at 512."),
    _clip("openclip-vit-l14@384", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "ViT-L-14",
          "laion2b_s32b_b82k", "vit_large_patch14_clip_224.laion2b", 768, 14, 224, 384,
          "OpenCLIP ViT-L/14 LAION-2B, trained at 224, tested at 384 (ILIAS "
          "vit_large_patch14_clip_224.laion2b); Inception mean/std 0.5. That the hub repo "
          "carries transformers weights is not verifiable offline; as_open_clip() loads the "
          "open_clip copy instead.", mean=SIGLIP_MEAN, std=SIGLIP_STD),
    _siglip("siglip-vit-b16@512", "google/siglip-base-patch16-512", "ViT-B-16-SigLIP-512",
            "vit_base_patch16_siglip_512.webli", 768, 16, 512, 724,
            "SigLIP ViT-B/16 WebLI at 512."),
    _siglip("siglip-vit-l16@384", "google/siglip-large-patch16-384", "ViT-L-16-SigLIP-384",
            "vit_large_patch16_siglip_384.webli", 1024, 16, 384, 512,
            "SigLIP ViT-L/16 WebLI at 384.", inquire="siglip-vit-l-16-384"),
    _siglip("siglip-so400m14@384", "google/siglip-so400m-patch14-384",
            "ViT-SO400M-14-SigLIP-384", "vit_so400m_patch14_siglip_384.webli", 1152, 14, 384,
            512, "SigLIP SO400M/14 WebLI at 384 (INQUIRE only; not in ILIAS's models.sh).",
            inquire="siglip-so400m-14-384"),
    _siglip("siglip2-vit-b16@512", "google/siglip2-base-patch16-512", "ViT-B-16-SigLIP2-512",
            "vit_base_patch16_siglip_512.v2_webli", 768, 16, 512, 724,
            "SigLIP2 ViT-B/16 at 512; QuARI release google-siglip2-base-patch16-512. The "
            "fixed-resolution SigLIP2 hub checkpoints load as SiglipModel (unverified offline)."),
    _siglip("siglip2-vit-l16@512", "google/siglip2-large-patch16-512", "ViT-L-16-SigLIP2-512",
            "vit_large_patch16_siglip_512.v2_webli", 1024, 16, 512, 724,
            "SigLIP2 ViT-L/16 at 512; QuARI release google-siglip2-large-patch16-512."),
)

BACKBONES: dict[str, BackboneInfo] = {info.name: info for info in _ENTRIES}


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(BACKBONES)


def get_backbone(name: str) -> BackboneInfo:
    """The registry entry called `name`; KeyError naming every known backbone otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None


def as_open_clip(info: BackboneInfo) -> BackboneInfo:
    """The same weights loaded through open_clip instead of transformers."""
    if info.library == "open_clip":
        return info
    if info.open_clip_model is None:
        raise ValueError(f"{info.name} has no open_clip equivalent")
    return dataclasses.replace(info, library="open_clip", model=info.open_clip_model,
                               pretrained=info.open_clip_pretrained)


# ----------------------------------------------------------------------------- preprocessing

def _to_pil(image):
    """A PIL RGB image from a PIL image or a [3, H, W] float tensor in [0, 1] (quantised to
    8 bits, as a decoded JPEG is)."""
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image
        return to_pil_image(image.clamp(0.0, 1.0))
    return image.convert("RGB")


def _pil_to_tensor(image) -> torch.Tensor:
    """torchvision's ToTensor: uint8 [H, W, 3] to float [3, H, W] in [0, 1]."""
    from torchvision.transforms.functional import pil_to_tensor
    return pil_to_tensor(image).float() / 255.0


def ilias_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) after ILIAS's LargeSideResize to `resolution`: the long side becomes `resolution`,
    the other side is the aspect ratio times it, truncated (``int``), at least 1; computed in
    the same floating-point order as the official code so that the truncation agrees."""
    ar = float(height) / float(width)
    h = int(resolution * ar) if ar <= 1 else resolution
    w = int(resolution / ar) if ar > 1 else resolution
    return max(1, h), max(1, w)


def center_pad(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) zero padding that brings `size` to the next multiple of `multiple`, split
    as ILIAS's MultiplierPadding does: the smaller half before, the rest after."""
    pad = -size % multiple
    return pad // 2, pad - pad // 2


def ilias_transform(info: BackboneInfo, resolution: int | None = None) -> Callable:
    """The ILIAS feature transform (feature_extraction, RESIZE_LARGE + the ViT extractor's
    MultiplierPadding): long side to `resolution` (default: the model's ILIAS test resolution)
    with PIL's bicubic resize of the 8-bit image, aspect ratio kept, no crop; ToTensor;
    normalised with the model's mean/std; zero-padded to a multiple of the patch size, the
    padding split between both sides (centred). Output sizes vary per image; batch them with
    `pad_collate` or in groups of equal size."""
    from PIL import Image
    resolution = resolution or info.test_resolution
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    patch = info.patch_size

    def transform(image) -> torch.Tensor:
        image = _to_pil(image)
        h, w = ilias_size(image.height, image.width, resolution)
        x = _pil_to_tensor(image.resize((w, h), Image.Resampling.BICUBIC))
        x = (x - mean) / std
        # pad after normalising so padded pixels are exactly zero, as ILIAS does
        top, bottom = center_pad(h, patch)
        left, right = center_pad(w, patch)
        return F.pad(x, (left, right, top, bottom))

    return transform


def pad_collate(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack [3, h_i, w_i] tensors into [B, 3, H, W], zero-padding bottom/right to the largest.

    Padding beyond an image's own patch-multiple size adds zero tokens that the encoder attends
    to, so batch size 1 reproduces ILIAS exactly; larger batches are an approximation unless the
    images share a size (use it with size-bucketed batches)."""
    height = max(x.shape[-2] for x in images)
    width = max(x.shape[-1] for x in images)
    return torch.stack([F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2])) for x in images])


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``size`` square, the offsets floored as the
    Hugging Face image processors' ``center_crop`` computes them (``(h - size) // 2``), which
    INQUIRE's ``hf_clip`` models and the QuARI authors' CLIP features use."""
    top, left = (height - size) // 2, (width - size) // 2
    return left, top, left + size, top + size


def model_transform(info: BackboneInfo) -> Callable:
    """The model's own evaluation transform at its train resolution (INQUIRE protocol), on the
    8-bit PIL image as open_clip and the Hugging Face image processors apply it: CLIP resizes
    the short side (bicubic, long side truncated) and centre-crops (:func:`center_crop_box`);
    SigLIP squashes to a square (bicubic); then ToTensor and the model's mean/std."""
    from torchvision import transforms as T
    size = info.train_resolution
    if info.eval_resize == "shortest_crop":
        resize = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                  T.Lambda(lambda im: im.crop(center_crop_box(im.height, im.width, size)))]
    elif info.eval_resize == "squash":
        resize = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        raise ValueError(f"unknown eval_resize {info.eval_resize!r}")
    return T.Compose([T.Lambda(_to_pil), *resize, T.Lambda(_pil_to_tensor),
                      T.Normalize(info.mean, info.std)])


def clean_text(text: str, how: str) -> str:
    """A text query as the benchmark's tokenizer sees it: unchanged ("none"), or open_clip's
    SigLIP cleaning ("canonicalize": ftfy/HTML fix-up, punctuation removed, lower case,
    whitespace collapsed), through open_clip's own functions."""
    if how == "none":
        return text
    if how == "canonicalize":
        from open_clip.tokenizer import basic_clean, canonicalize_text
        return canonicalize_text(basic_clean(text))
    raise ValueError(f"unknown text cleaning {how!r}; known: {', '.join(TEXT_CLEANING)}")


# ----------------------------------------------------------------------------- encoders

def _autocast(device: torch.device):
    """fp16 mixed precision on CUDA, as both benchmarks extract features (ILIAS extract.py:
    ``torch.amp.autocast("cuda")``, INQUIRE eval_rerank_with_clip.py: ``torch.autocast``; both
    fp16 by default); full precision on CPU."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16)


class Encoder:
    """A frozen backbone: images and texts to L2-normalised float32 embeddings [B, E]."""

    def __init__(self, info: BackboneInfo, device: torch.device):
        self.info = info
        self.device = device

    @property
    def embed_dim(self) -> int:
        """Embedding dimension E."""
        return self.info.embed_dim

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels to unit-norm [B, E] float32 embeddings."""
        with torch.inference_mode(), _autocast(self.device):
            features = self._image_features(images.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw query strings (no prompt template) to unit-norm [B, E] float32 embeddings."""
        texts = [clean_text(t, self.info.text_clean) for t in texts]
        with torch.inference_mode(), _autocast(self.device):
            features = self._text_features(texts)
        return F.normalize(features.float(), dim=-1)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding;
    older versions return the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _timm_position_resampler(embeddings, num_prefix_tokens: int):
    """A replacement for a transformers ViT embeddings module's ``interpolate_pos_encoding`` that
    resamples the position table with timm's ``resample_abs_pos_embed`` (bicubic, antialiased),
    the function ILIAS's timm models (``dynamic_img_size=True``) call for every input size; the
    transformers one does not antialias, which matters where the patch grid shrinks."""
    from timm.layers import resample_abs_pos_embed

    def interpolate_pos_encoding(patches, height: int, width: int):
        table = embeddings.position_embedding.weight.unsqueeze(0)
        side = round((table.shape[1] - num_prefix_tokens) ** 0.5)
        new_size = (height // embeddings.patch_size, width // embeddings.patch_size)
        return resample_abs_pos_embed(table, new_size=new_size, old_size=(side, side),
                                      num_prefix_tokens=num_prefix_tokens)

    return interpolate_pos_encoding


class _TransformersEncoder(Encoder):
    """CLIP / SigLIP / SigLIP2 through transformers' AutoModel and AutoTokenizer."""

    def __init__(self, info: BackboneInfo, source: str, device: torch.device):
        super().__init__(info, device)
        from transformers import AutoModel, AutoTokenizer
        self.model = AutoModel.from_pretrained(source).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        config = self.model.config
        self.context_length = min(info.text_context_length,
                                  config.text_config.max_position_embeddings)
        # CLIP projects to projection_dim; SigLIP embeds at the vision width
        dim = getattr(config, "projection_dim", None) or config.vision_config.hidden_size
        if dim != info.embed_dim:
            raise ValueError(f"{info.name}: model embeds at {dim}, registry says {info.embed_dim}")
        # ILIAS resamples position embeddings with timm for every input size (section 2 of
        # docs/protocol.md): CLIP has a class-token position in front of the grid, SigLIP none
        vision = [m for m in self.model.modules()
                  if hasattr(m, "patch_embedding") and hasattr(m, "interpolate_pos_encoding")]
        if len(vision) != 1:
            raise ValueError(f"{info.name}: expected one vision embedding module, found {len(vision)}")
        prefix = 1 if hasattr(vision[0], "class_embedding") else 0
        vision[0].interpolate_pos_encoding = _timm_position_resampler(vision[0], prefix)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        # interpolate_pos_encoding lets the ViT take the ILIAS dynamic (patch-multiple) sizes
        return _pooled(self.model.get_image_features(pixel_values=images,
                                                     interpolate_pos_encoding=True))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=self.info.text_padding, truncation=True,
                                max_length=self.context_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()
                  if k in ("input_ids", "attention_mask")}
        if self.info.text_padding == "max_length":
            # SigLIP was trained without a text attention mask on fixed-length padded text
            tokens.pop("attention_mask", None)
        return _pooled(self.model.get_text_features(**tokens))


class _OpenClipEncoder(Encoder):
    """Any open_clip model; inputs must have the model's configured image size."""

    def __init__(self, info: BackboneInfo, path: str | None, device: torch.device):
        super().__init__(info, device)
        import open_clip
        if path is not None and Path(path).is_dir():
            model_name, kwargs = f"local-dir:{path}", {}
        else:
            model_name, kwargs = info.model, {"pretrained": path or info.pretrained}
        model, _, _ = open_clip.create_model_and_transforms(model_name, **kwargs)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.image_size = tuple(getattr(self.model.visual, "image_size", ()))

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size and tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"open_clip {self.info.model} takes {self.image_size} inputs, got "
                f"{tuple(images.shape[-2:])}; load through transformers for dynamic ILIAS sizes")
        return self.model.encode_image(images)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def load_backbone(name_or_info: str | BackboneInfo, path: str | Path | None = None,
                  device: str | torch.device = "cpu") -> Encoder:
    """Load a frozen backbone as an `Encoder`.

    `path` (a local model directory, or for open_clip a checkpoint file) replaces the hub id or
    pretrained tag and goes through the same loader. CUDA falls back to CPU when unavailable."""
    info = name_or_info if isinstance(name_or_info, BackboneInfo) else get_backbone(name_or_info)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("CUDA unavailable; loading %s on CPU", info.name)
        device = torch.device("cpu")
    path = None if path is None else str(path)
    logger.info("loading %s via %s from %s", info.name, info.library, path or info.model)
    if info.library == "transformers":
        encoder: Encoder = _TransformersEncoder(info, path or info.model, device)
    elif info.library == "open_clip":
        encoder = _OpenClipEncoder(info, path, device)
    else:
        raise ValueError(f"unknown library {info.library!r} for {info.name}")
    return encoder


__all__ = [
    "BACKBONES", "BackboneInfo", "Encoder", "TEXT_CLEANING", "as_open_clip", "center_pad",
    "center_crop_box", "clean_text", "get_backbone", "ilias_size", "ilias_transform", "list_backbones", "load_backbone", "model_transform", "pad_collate",
]
