"""DINOv2 local descriptors for the local-feature re-rankers of Table 3a (Chamfer, spatial
verification, AMES): the ``n`` most salient patch tokens of every image, with their positions.

The paper re-ranks with DINOv2 patch descriptors, 100 per database image and 600 per query. Per
image this module:

1. resizes the long side to ``resolution`` keeping the aspect ratio, no crop, normalises with the
   ImageNet mean/std DINOv2 was trained with, and zero-pads bottom/right to a multiple of the
   patch size (the ILIAS protocol, :func:`quari.backbones.ilias_size`);
2. runs a transformers DINOv2 (``Dinov2Model``, or ``Dinov2WithRegistersModel`` for the
   ``-with-registers`` checkpoints; a hub id or a local directory, same code) and takes the
   last layer's patch tokens (after the final layer norm);
3. drops patches whose centre lies in the padding, ranks the others by a saliency and keeps the
   top ``n``;
4. stores them L2-normalised with each patch centre's (x, y).

Saliency (``saliency=``):

- ``"norm"`` (default): the L2 norm of the patch token. It is what the AMES extraction code
  (Suma et al., ECCV 2024, whose DINOv2 local descriptors ILIAS's local re-rankers build on)
  ranks patches by when no trained detector is given; it needs no attention maps, so the model
  runs with its fast attention kernel. Use it with the ``-with-registers`` models (the default,
  as AMES does): DINOv2 *without* registers has a few high-norm artefact tokens on background
  patches (Darcet et al., ICLR 2024) that a norm ranking would pick first.
- ``"cls_attention"``: the last layer's attention from the CLS token to each patch, averaged over
  heads: where the global representation looks. Needs eager attention (slower).
- ``"ames_detector"``: AMES's trained detector (:class:`.ames_network.AMESDetector`, published as
  ``dinov2_detector.pt``; ``detector=`` path or URL, default the published one). It *transforms*
  every patch token (pointwise conv + batch norm, L2-normalised) and ranks the tokens by a
  learned score, and the stored descriptors are the transformed ones. The official extraction
  command (its README) always passes this detector, so these are the descriptors the published
  AMES networks are evaluated with: use them with the ``ames`` re-ranker.

Compared with the official AMES extraction (``extract/extract_dino.py`` of pavelsuma/ames), with
``saliency="ames_detector"`` the model (torch hub ``dinov2_vitb14_reg`` = the hub's
``facebook/dinov2-with-registers-base``), the tokens (last layer after the final norm, registers
dropped), the detector, the top-n selection and the normalisation are the same. Two things
differ: (1) the official code resizes each side to a multiple of 14 (OpenCV, area/bilinear),
slightly changing the aspect ratio, and without ``--imsize`` (its README's command) keeps each
image at its stored resolution; here the long side becomes ``resolution`` (bicubic) and the image
is zero-padded, and patches centred in the padding are never kept. For the official scales, set
``resolution`` to the images' own long side. (2) the official files store float32 and AMES rounds
the *mapped* database descriptors to float16; here descriptors are stored in ``dtype`` (float16
by default) before the mapping, a rounding of the same size.

Output, in the layout :func:`.matching.load_local_descriptors` reads (one ``.npz``):
``ids``, ``descriptors`` [N, n, D] (float16 by default), ``xy`` [N, n, 2] patch centres in
*normalised* image coordinates (x / width, y / height of the original image, so the re-rankers'
thresholds do not depend on image size), ``counts`` [N]; plus ``image_sizes`` [N, 2] (original
width, height) so that ``xy * image_sizes`` gives the centres in original pixels. Beside it:
``<out>.skipped.tsv`` (images that could not be read) and ``<out>.json`` (what was extracted,
how). Work is written in parts under ``<out>.parts/`` as it goes, so an interrupted run resumes
after the last complete part; the final file is then streamed from the parts one at a time
(never whole in memory: ILIAS's shortlisted images are about 185 GB of descriptors), written
atomically, and the parts are removed only once it is in place. It is an uncompressed ``.npz``
that the re-rankers memory-map.

The parts resume as the embedding cache's shards do (:mod:`quari.embedding_cache`: consecutive
chunks of the item list, each written atomically when complete, a fingerprint of the ids and
settings, a skip list per chunk) and use its helpers for the ids, the fingerprint and the
batches. Two things keep them apart: a cache shard is a final file of its embedding set (the
manifest lists it), while a part is scratch, merged into the one ``[N, n, D]`` array the
re-rankers memory-map; and a part holds four arrays of its images, not one row each.
:mod:`quari.data.parts` is another idea again: independent jobs of a cluster, each writing a
whole embedding set, assembled as a view.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from quari.backbones import ilias_size
from quari.devices import resolve_device
from quari.embedding_cache import (ImageDataset, ImageSource, check_ids, ids_digest,
                                   read_items_tsv, shard_batches)
from baselines.local_features.matching import (LocalDescriptors, load_local_descriptors,
                                               save_local_descriptors)
from quari.store import (NpzWriter, atomic_write_json, atomic_write_npz, atomic_write_text,
                         load_npz_array, read_npz_arrays)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SALIENCIES = ("norm", "cls_attention", "ames_detector")
#: the paper's descriptor counts (Table 3a): per database image and per query
DATABASE_DESCRIPTORS = 100
QUERY_DESCRIPTORS = 600


@dataclass
class LocalDescriptorConfig:
    """How descriptors are extracted; recorded in ``<out>.json`` and in the resume fingerprint."""

    model: str = "facebook/dinov2-with-registers-base"  # ViT-B/14 with registers, as AMES uses
    num_descriptors: int = DATABASE_DESCRIPTORS  # top-n patches kept (paper: 100 db, 600 query)
    resolution: int = 518  # long side in pixels; DINOv2's high-resolution training size (37 patches)
    saliency: str = "norm"  # patch ranking: "norm", "cls_attention", "ames_detector" (docstring)
    dtype: str = "float16"  # stored descriptor type (halves the file; re-rankers convert the
    #                         rows they read to float32)
    detector: str | None = None  # AMES detector checkpoint, path or URL ("ames_detector" only;
    #                              None there: the published dinov2_detector.pt)


def config_from_options(options: dict, num_descriptors: int) -> LocalDescriptorConfig:
    """The config of the workflow's ``real.local_descriptors`` options (``model``,
    ``resolution``, ``saliency``, ``detector``, ``dtype``) for ``num_descriptors`` per image."""
    return LocalDescriptorConfig(model=options["model"], num_descriptors=num_descriptors,
                                 resolution=options["resolution"], saliency=options["saliency"],
                                 detector=options.get("detector"), dtype=options["dtype"])


# ----------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class ResizeMeta:
    """Original and resized (unpadded) size of one image, in pixels."""

    width: int
    height: int
    resized_width: int
    resized_height: int


@dataclass(frozen=True)
class LocalTransform:
    """ILIAS-style DINOv2 input: long side to ``resolution``, normalised, zero-padded bottom/right
    to a multiple of ``patch_size``. A picklable callable (it runs in DataLoader workers) that
    returns the pixels [3, H', W'] and the sizes needed to place patches in the original image."""

    resolution: int
    patch_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image) -> tuple[torch.Tensor, ResizeMeta]:
        from torchvision.transforms.functional import pil_to_tensor
        x = pil_to_tensor(image.convert("RGB")).float() / 255.0
        height, width = x.shape[-2:]
        h, w = ilias_size(height, width, self.resolution)
        x = F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False,
                          antialias=True)[0].clamp(0.0, 1.0)
        x = (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
        # padded after normalising, so padded pixels are exactly zero (as ILIAS does)
        x = F.pad(x, (0, -w % self.patch_size, 0, -h % self.patch_size))
        return x, ResizeMeta(width, height, w, h)


# ----------------------------------------------------------------------------- selection

def patch_centres(rows: int, cols: int, patch_size: int) -> torch.Tensor:
    """(x, y) pixel centre of every patch of a rows x cols grid, row-major: [rows * cols, 2]."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return (torch.stack([x, y], dim=-1).reshape(-1, 2).float() + 0.5) * patch_size


def select_patches(tokens: torch.Tensor, saliency: torch.Tensor, grid: tuple[int, int],
                   patch_size: int, meta: ResizeMeta, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n`` most salient patches of one image whose centre lies inside the image.

    ``tokens`` [rows * cols, D] and ``saliency`` [rows * cols] are row-major over the patch
    ``grid``. Returns (L2-normalised descriptors [m, D], normalised (x, y) centres [m, 2] in
    [0, 1] of the original image, saliency [m]), most salient first, m = min(n, valid patches).
    Patches centred in the zero padding carry no image content and are never kept.
    """
    centres = patch_centres(*grid, patch_size).to(tokens.device)
    size = torch.tensor([meta.resized_width, meta.resized_height], device=tokens.device)
    valid = (centres < size).all(dim=1)
    scores = saliency.float().masked_fill(~valid, -float("inf"))
    top = torch.topk(scores, k=min(n, int(valid.sum())), sorted=True).indices
    # relative to the resized image = relative to the original (the resize keeps proportions)
    xy = centres[top] / size
    return F.normalize(tokens[top].float(), dim=-1), xy, scores[top]


# ----------------------------------------------------------------------------- model

class DinoLocalExtractor:
    """A frozen DINOv2 that turns preprocessed images into selected local descriptors.

    ``detector`` (path or URL of an AMES detector checkpoint; None: the published one) is read
    only with ``saliency="ames_detector"``; a URL is downloaded once into ``cache_dir``
    (:func:`.ames_network.resolve_checkpoint`).
    """

    def __init__(self, source: str, device: torch.device | str = "cpu", saliency: str = "norm",
                 detector: str | None = None, cache_dir: str | os.PathLike | None = None):
        if saliency not in SALIENCIES:
            raise ValueError(f"unknown saliency {saliency!r}; use one of {SALIENCIES}")
        if detector is not None and saliency != "ames_detector":
            raise ValueError(f"a detector is only used with saliency 'ames_detector', not "
                             f"{saliency!r}")
        from transformers import AutoConfig, AutoModel
        config = AutoConfig.from_pretrained(source)
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"{source} is a {config.model_type!r} model, not DINOv2")
        self.device = torch.device(device)
        self.saliency = saliency
        # attention maps are only returned by the eager implementation
        extra = {"attn_implementation": "eager"} if saliency == "cls_attention" else {}
        self.model = AutoModel.from_pretrained(source, **extra).to(self.device).eval()
        self.model.requires_grad_(False)
        self.patch_size = int(config.patch_size)
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0))
        self.dim = int(config.hidden_size)
        self.detector = None
        if saliency == "ames_detector":
            from baselines.local_features.ames_network import DINOV2_DETECTOR_URL, load_ames_detector
            self.detector = load_ames_detector(detector or DINOV2_DETECTOR_URL, self.device,
                                               cache_dir=cache_dir)
            if self.detector.conv1.in_channels != self.dim:
                raise ValueError(f"the AMES detector {detector or DINOV2_DETECTOR_URL} takes "
                                 f"{self.detector.conv1.in_channels}-dimensional tokens, "
                                 f"{source} gives {self.dim}")

    def transform(self, resolution: int) -> LocalTransform:
        """The preprocessing this model needs at ``resolution``."""
        return LocalTransform(resolution, self.patch_size)

    def tokens_and_saliency(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens [B, P, D] (last layer, after the final norm) and their saliency [B, P] for
        a batch of equally sized images [B, 3, H, W]."""
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported()
                                   else torch.float16)
                    if self.device.type == "cuda" else torch.autocast("cpu", enabled=False))
        first = 1 + self.num_register_tokens  # CLS, then the registers, then the patches
        with torch.inference_mode(), autocast:
            out = self.model(pixel_values=pixels.to(self.device),
                             output_attentions=self.saliency == "cls_attention")
        tokens = out.last_hidden_state[:, first:].float()
        if self.saliency == "norm":
            return tokens, tokens.norm(dim=-1)
        if self.saliency == "ames_detector":  # in float32, as the official extraction
            with torch.inference_mode():
                return self.detector(tokens)
        return tokens, out.attentions[-1][:, :, 0, first:].float().mean(dim=1)

    def extract(self, pixels: torch.Tensor, metas: Sequence[ResizeMeta], n: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(descriptors [m, D], normalised xy [m, 2]) of each image of an equally sized batch."""
        rows, cols = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        tokens, saliency = self.tokens_and_saliency(pixels)
        out = []
        for b, meta in enumerate(metas):
            desc, xy, _ = select_patches(tokens[b], saliency[b], (rows, cols), self.patch_size,
                                         meta, n)
            out.append((desc.cpu().numpy(), xy.cpu().numpy()))
        return out


# ----------------------------------------------------------------------------- extraction driver

def _fingerprint(config: LocalDescriptorConfig, ids: Sequence[str], part_images: int) -> str:
    fields = asdict(config)
    if fields["detector"] is None:  # jobs from before the detector option keep their fingerprint
        del fields["detector"]
    return ids_digest(ids, json.dumps({**fields, "part_images": part_images},
                                      sort_keys=True).encode())


def _save(path: Path, ids: Sequence[str], results: Sequence[tuple[np.ndarray, np.ndarray]],
          sizes: np.ndarray, n: int, dim: int, dtype: str) -> None:
    """Write one part in the layout of :mod:`.matching` (padded to ``n`` rows) plus
    image sizes. A part holds ``part_images`` images, so it is built in memory."""
    descriptors = np.zeros((len(ids), n, dim), dtype=dtype)
    xy = np.zeros((len(ids), n, 2), dtype=np.float32)
    counts = np.zeros(len(ids), dtype=np.int64)
    for r, (desc, pos) in enumerate(results):
        counts[r] = len(desc)
        descriptors[r, :len(desc)] = desc
        xy[r, :len(desc)] = pos
    save_local_descriptors(path, ids, descriptors, xy, counts,
                           extra={"image_sizes": np.asarray(sizes, dtype=np.int64).reshape(-1, 2)})


def _merge_parts(out_path: Path, part_paths: Sequence[Path]) -> int:
    """Write the parts' images, in order, into one file at ``out_path`` (atomically); returns
    the number of images. Only the parts' ids, counts and sizes are held in memory: the
    descriptors and positions are copied part by part from memory maps, in blocks."""
    small = [read_npz_arrays(p, ["ids", "counts", "image_sizes"]) for p in part_paths]
    total = sum(len(part["ids"]) for part in small)
    first = load_npz_array(part_paths[0], "descriptors")  # memory-mapped: shape and dtype only
    (n, dim), dtype = first.shape[1:], first.dtype
    del first

    def fill(npz: NpzWriter) -> None:
        npz.write("ids", np.concatenate([part["ids"] for part in small]).astype(str))
        for key in ("counts", "image_sizes"):
            npz.write(key, np.concatenate([part[key] for part in small]).astype(np.int64))
        for key, shape, key_dtype in (("descriptors", (total, n, dim), dtype),
                                      ("xy", (total, n, 2), np.float32)):
            with npz.rows(key, shape, key_dtype) as append:
                for part in part_paths:
                    append(load_npz_array(part, key))

    atomic_write_npz(out_path, fill)
    return total


def _extract_part(extractor: DinoLocalExtractor, dataset: ImageDataset, part: range, n: int,
                  batch_size: int, num_workers: int, bar
                  ) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray] | None, tuple, str]]:
    """(position, result or None, (width, height), skip reason) of each item of a part, in order."""
    loader = DataLoader(dataset, batch_sampler=shard_batches(part.start, part.stop, len(part),
                                                             batch_size),
                        num_workers=num_workers, collate_fn=list)
    for samples in loader:
        results: dict[int, tuple] = {}
        groups: dict[tuple[int, ...], list] = {}  # one forward pass per input size
        for i, transformed, _ in samples:
            if transformed is not None:  # (pixels, resize meta)
                pixels, meta = transformed
                groups.setdefault(tuple(pixels.shape), []).append((i, pixels, meta))
        for members in groups.values():
            extracted = extractor.extract(torch.stack([p for _, p, _ in members]),
                                          [m for _, _, m in members], n)
            results.update({i: (r, (m.width, m.height)) for (i, _, m), r in zip(members, extracted)})
        for i, transformed, reason in samples:
            if transformed is None:
                yield i, None, (0, 0), " ".join(reason.split())
            else:
                yield i, results[i][0], results[i][1], ""
        bar.update(len(samples))


def extract_local_descriptors(extractor: DinoLocalExtractor,
                              items: Sequence[tuple[str, ImageSource]], out_path: str | os.PathLike,
                              config: LocalDescriptorConfig, batch_size: int = 16,
                              num_workers: int = 2, part_images: int = 10_000,
                              progress: bool = True) -> LocalDescriptors:
    """Extract the top-``config.num_descriptors`` DINOv2 local descriptors of (id, image source)
    items into ``out_path`` (``.npz``, layout in the module docstring) and return them
    (memory-mapped, :func:`.matching.load_local_descriptors`).

    Sources are what :mod:`quari.embedding_cache` takes (a path, encoded bytes, or a callable).
    Unreadable images are logged, listed in ``<out>.skipped.tsv`` and absent from the file.
    Parts of ``part_images`` items are written under ``<out>.parts/`` as they complete; a rerun
    with the same items and config resumes after the last one. An existing output of the same
    job is returned as is; one of another job is never overwritten (FileExistsError).
    """
    ids = [str(i) for i, _ in items]
    if not ids:
        raise ValueError("no images to extract local descriptors from")
    check_ids(ids)
    if part_images < 1:
        raise ValueError("part_images must be positive")
    out_path = Path(out_path)
    meta_path = out_path.with_name(out_path.name + ".json")
    skipped_path = out_path.with_name(out_path.name + ".skipped.tsv")
    parts_dir = out_path.with_name(out_path.name + ".parts")
    fingerprint = _fingerprint(config, ids, part_images)
    if out_path.exists():
        done = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if done.get("fingerprint") != fingerprint:
            raise FileExistsError(f"{out_path} holds local descriptors of another job; remove it "
                                  "or choose another file")
        logger.info("%s is complete; nothing to extract", out_path)
        return load_local_descriptors(out_path)

    parts_dir.mkdir(parents=True, exist_ok=True)
    state_path = parts_dir / "state.json"
    if state_path.exists() and json.loads(state_path.read_text())["fingerprint"] != fingerprint:
        raise ValueError(f"{parts_dir} holds parts of another job; remove it first")
    atomic_write_json(state_path, {"fingerprint": fingerprint})

    n, dim = config.num_descriptors, extractor.dim
    dataset = ImageDataset([s for _, s in items], extractor.transform(config.resolution))
    parts = [range(s, min(s + part_images, len(ids))) for s in range(0, len(ids), part_images)]
    bar = tqdm(total=len(ids), unit="img", desc="local descriptors", disable=not progress,
               dynamic_ncols=True)
    try:
        for k, part in enumerate(parts):
            part_path = parts_dir / f"part-{k:05d}.npz"
            if part_path.exists():  # written atomically: present means complete
                bar.update(len(part))
                continue
            kept, results, sizes, skipped = [], [], [], []
            for i, result, size, reason in _extract_part(extractor, dataset, part, n, batch_size,
                                                         num_workers, bar):
                if result is None:
                    logger.warning("skipping %s: %s", ids[i], reason)
                    skipped.append(f"{ids[i]}\t{reason or 'unknown error'}\n")
                else:
                    kept.append(ids[i])
                    results.append(result)
                    sizes.append(size)
            # the part's skip list first: a part file without one is never complete
            atomic_write_text(parts_dir / f"part-{k:05d}.skipped.tsv", "".join(skipped))
            _save(part_path, kept, results, np.asarray(sizes), n, dim, config.dtype)
    finally:
        bar.close()

    skipped_lines = [(parts_dir / f"part-{k:05d}.skipped.tsv").read_text()
                     for k in range(len(parts))]
    atomic_write_text(skipped_path, "id\treason\n" + "".join(skipped_lines))
    extracted = _merge_parts(out_path, [parts_dir / f"part-{k:05d}.npz" for k in range(len(parts))])
    n_skipped = sum(text.count("\n") for text in skipped_lines)
    atomic_write_json(meta_path, {**asdict(config), "fingerprint": fingerprint,
                                  "requested": len(ids), "extracted": extracted,
                                  "skipped": n_skipped, "patch_size": extractor.patch_size,
                                  "dim": dim, "xy": "normalised (x / width, y / height)"})
    shutil.rmtree(parts_dir)
    if n_skipped:
        logger.warning("%s: %d of %d images skipped, listed in %s", out_path, n_skipped,
                       len(ids), skipped_path)
    return load_local_descriptors(out_path)


def assemble_local_descriptors(part_paths: Sequence[str | os.PathLike], ids: Sequence[str],
                               out_path: str | os.PathLike, config: LocalDescriptorConfig,
                               part_images: int = 10_000) -> LocalDescriptors:
    """Write ``out_path`` (and its ``.json`` and ``.skipped.tsv``) as one
    :func:`extract_local_descriptors` of ``ids`` would, from the files of a fanned-out
    extraction: part k extracted the k-th of ``len(part_paths)`` consecutive slices of ``ids``
    (:func:`quari.data.parts.even_slices`) with the same ``config`` and ``part_images``.

    Every part is verified first (PartError otherwise, and nothing is written): its record names
    exactly its slice of ids and this config (the resume fingerprint), its ids and skip list
    cover that slice, its counts add up, and all parts come from one model (patch size, width).
    The ``.npz`` is one file that the re-rankers memory-map, so the parts are streamed into it
    block by block (a copy, never whole in memory)."""
    from quari.data.parts import PartError, even_slices
    out_path, ids = Path(out_path), [str(i) for i in ids]
    slices = even_slices(len(ids), len(part_paths))
    skipped, extracted, model = [], 0, None
    for k, (path, (start, stop)) in enumerate(zip(map(Path, part_paths), slices)):
        meta_path = path.with_name(path.name + ".json")
        skipped_path = path.with_name(path.name + ".skipped.tsv")
        if not (path.is_file() and meta_path.is_file() and skipped_path.is_file()):
            raise PartError(f"{path}: not a complete part; rerun its job")
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != _fingerprint(config, ids[start:stop], part_images):
            raise PartError(f"{path} was extracted from other images or settings than part {k} "
                            f"(ids {start} to {stop} of {len(ids)}, this configuration); rerun "
                            "its job")
        lines = skipped_path.read_text().splitlines()[1:]
        kept = read_npz_arrays(path, ["ids"])["ids"].astype(str).tolist()
        if (len(kept) != meta["extracted"] or len(lines) != meta["skipped"]
                or meta["requested"] != len(kept) + len(lines)
                or set(kept) | {line.split("\t")[0] for line in lines} != set(ids[start:stop])):
            raise PartError(f"{path}: {len(kept)} images and {len(lines)} skipped do not cover "
                            f"its {stop - start} ids (record: {meta['requested']} requested, "
                            f"{meta['extracted']} extracted, {meta['skipped']} skipped)")
        this = {"patch_size": meta["patch_size"], "dim": meta["dim"]}
        if model is not None and this != model:
            raise PartError(f"{path}: descriptors of another model ({this} vs {model})")
        model = this
        skipped += lines
        extracted += len(kept)
    atomic_write_text(out_path.with_name(out_path.name + ".skipped.tsv"),
                      "id\treason\n" + "".join(f"{line}\n" for line in skipped))
    _merge_parts(out_path, [Path(p) for p in part_paths])
    atomic_write_json(out_path.with_name(out_path.name + ".json"), {
        **asdict(config), "fingerprint": _fingerprint(config, ids, part_images),
        "requested": len(ids), "extracted": extracted, "skipped": len(skipped), **model,
        "xy": "normalised (x / width, y / height)"})
    logger.info("%s: %d images over %d parts (%d skipped)", out_path, extracted, len(part_paths),
                len(skipped))
    return load_local_descriptors(out_path)


def shortlist_ids(queries, gallery, k: int, chunk_rows: int = 65536, batch_size: int = 64
                  ) -> list[str]:
    """Ids of the gallery images that are in some query's cosine top-``k``, sorted: the only
    database images a local-feature re-ranker of that shortlist needs descriptors of.

    ``queries`` and ``gallery`` are embedding sets (:func:`quari.store.load_embedding_set`). The
    top-k is computed as :func:`quari.evaluation.evaluate_rerank` computes the shortlist it
    re-ranks (same function, same query batches).
    """
    from quari.evaluation import cosine_shortlist
    if k < 1:
        raise ValueError("k must be positive")
    rows: set[int] = set()
    for start in tqdm(range(0, len(queries), batch_size), desc="shortlists", unit="batch",
                      disable=None):
        q = np.asarray(queries.embeddings[start:start + batch_size], dtype=np.float32)
        _, top = cosine_shortlist(q, gallery.embeddings, k, chunk_rows)
        rows.update(int(r) for r in np.unique(top))
    return sorted(gallery.ids[r] for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: extract DINOv2 local descriptors of an image list into one .npz file."""
    defaults = LocalDescriptorConfig()
    parser = argparse.ArgumentParser(prog="python -m baselines.local_features.descriptors",
                                     description=main.__doc__)
    parser.add_argument("--images", required=True,
                        help="TSV: id<TAB>image path (relative to --root)")
    parser.add_argument("--root", help="folder relative image paths start from (default: TSV's)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--model", default=defaults.model, help="hub id or local directory")
    parser.add_argument("--num-descriptors", type=int, default=defaults.num_descriptors,
                        help=f"patches kept per image (paper: {DATABASE_DESCRIPTORS} database, "
                             f"{QUERY_DESCRIPTORS} query)")
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--saliency", choices=SALIENCIES, default=defaults.saliency)
    parser.add_argument("--dtype", choices=("float16", "float32"), default=defaults.dtype)
    parser.add_argument("--detector", help="AMES detector checkpoint, path or URL (saliency "
                                           "ames_detector; default: the published one)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--part-images", type=int, default=10_000)
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = LocalDescriptorConfig(model=args.model, num_descriptors=args.num_descriptors,
                                   resolution=args.resolution, saliency=args.saliency,
                                   dtype=args.dtype, detector=args.detector)
    extractor = DinoLocalExtractor(args.model, device=resolve_device(args.device), saliency=args.saliency,
                                   detector=args.detector)
    extract_local_descriptors(extractor, read_items_tsv(args.images, args.root), args.out, config,
                              batch_size=args.batch_size, num_workers=args.workers,
                              part_images=args.part_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
