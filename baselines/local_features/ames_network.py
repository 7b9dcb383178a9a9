"""AMES (Suma, Kordopatis-Zilos, Iscen and Tolias, ECCV 2024): the learned local-descriptor
similarity of Table 3a, re-implemented to load the published weights.

AMES ("Asymmetric and Memory-Efficient Similarity") scores an image pair from the local
descriptors of both images with a small transformer. This module rebuilds the network its
official evaluation runs (``pavelsuma/ames``: ``src/models/matcher.py``, ``transformer_dec.py``,
``binarization_layer.py``, ``conf/model/ames.yaml``) with the same parameter names and shapes,
so that the published state dicts load with ``strict=True``, and its DINOv2 detector
(``extract/spatial_attention_2d.py``) used by :mod:`.descriptors`.

What the network consumes, per pair (a query image and a database image):

- local descriptors of both images: [Q, D] and [T, D], D = 768 for the DINOv2 models (ViT-B/14
  with registers, patch tokens after the final norm, selected and transformed by the AMES
  detector; see :mod:`.descriptors`). The official evaluation uses 600 per query and
  a few dozen to a hundred per database image (Table 3a: 100). Nothing else: positions, scales
  and detector weights stored beside the descriptors in the official files are not read;
- a padding mask per image (True = padding row, ignored).

How it computes the score (evaluation mode):

1. every descriptor is L2-normalised and mapped to 128 dimensions: ``Linear + LayerNorm``
   (full-precision "fp" models) or, for the binarised "dist" models, ``sign(x W)`` with a learned
   projection W [D, 128] followed by ``Linear + LayerNorm``. In the fp models the mapped
   *database* descriptors are rounded to float16 and back: the evaluation simulates
   half-precision storage of the database side (the asymmetric, memory-efficient part);
2. the sequence [match token, query descriptors, database descriptors] goes through 5 post-norm
   decoder layers (2 heads, feed-forward 1024, ReLU), each with a self-attention in which a
   descriptor only sees its own image, a cross-attention in which it only sees the other image,
   and a feed-forward block. The match token sees everything in both. There is no positional
   encoding, so the score does not depend on the order of an image's descriptors;
3. a linear classifier on the match token gives one logit per pair.

How the official evaluation combines the logit with the global similarity of the initial
ranking (``src/utils/metrics.py``), over the top-k shortlist only::

    score = lamb * global_similarity + (1 - lamb) * sigmoid(temp * logit)

with ``lamb`` and ``temp`` tuned on the GLDv2 public test split (its README): DINOv2 fp
lamb 0.55, temp 0.30; DINOv2 dist lamb 0.35, temp 0.10 (the CVNet models, not used here: fp
0.85 / 0.80, dist 0.65 / 0.20). :func:`combine_scores` is that formula, and
:data:`TUNED_HYPERPARAMETERS` holds the DINOv2 values.

Checkpoints: the official evaluation reads ``torch.load(...)["state"]`` with
``weights_only=False``; here they are read with ``weights_only=True``, allowing besides tensors
and plain containers (optimiser state included) only numpy scalars and dtypes. Anything else is
refused with an error naming the file and the offending globals; nothing is unpickled. A URL is
downloaded once into a cache (:mod:`quari.data.downloads`: atomic, resumable).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quari.checkpoint import load_state_strict
from quari.data.downloads import RemoteFile, check_file, fetch

logger = logging.getLogger(__name__)

#: where the authors publish their networks (fp and dist models, detectors)
NETWORKS_URL = "http://ptak.felk.cvut.cz/personal/sumapave/public/ames/networks/"
#: the full-precision AMES model trained on DINOv2 descriptors of GLDv2
DINOV2_AMES_URL = NETWORKS_URL + "dinov2_ames.pt"
#: the DINOv2 local-feature detector the AMES descriptors are selected with
DINOV2_DETECTOR_URL = NETWORKS_URL + "dinov2_detector.pt"

#: (lamb, temp) of the DINOv2 models by ``binarized``, tuned on GLDv2 (the official README)
TUNED_HYPERPARAMETERS = {False: (0.55, 0.30), True: (0.35, 0.10)}

# numpy scalars (e.g. a metric saved beside the weights) and the dtypes they are rebuilt with;
# both numpy 1 (numpy.core) and numpy 2 (numpy._core) module names, as pickles record either
_NUMPY_SCALAR = np._core.multiarray.scalar
_ALLOWED_GLOBALS = [
    _NUMPY_SCALAR, (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"), np.dtype,
    *(getattr(np.dtypes, f"{kind}DType") for kind in (
        "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
        "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128")),
]


# ----------------------------------------------------------------------------- the network

@dataclass(frozen=True)
class AMESConfig:
    """Shape of an AMES network; the defaults are the published models' (conf/model/ames.yaml)."""

    local_dim: int = 768         # descriptor width (DINOv2 ViT-B/14)
    model_dim: int = 128         # transformer width (also the number of bits of the dist models)
    nhead: int = 2               # attention heads (not recoverable from a state dict's shapes)
    num_layers: int = 5          # decoder layers
    dim_feedforward: int = 1024  # hidden width of each layer's feed-forward block (ReLU)
    binarized: bool = False      # the "dist" variant: descriptors binarised before the transformer


class Binarization(nn.Module):
    """``sign(normalize(x) @ W)``: the dist models' descriptor binarisation (evaluation form; the
    published W [local_dim, bits] is a learned ITQ-initialised projection)."""

    def __init__(self, dims: int, bits: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(dims, bits), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(F.normalize(x, dim=-1) @ self.W)


class DecoderLayer(nn.Module):
    """One post-norm AMES layer: masked self-attention, masked cross-attention, feed-forward.

    Both attentions run over the whole sequence [match token, query, database]; the masks decide
    who sees whom (:func:`attention_masks`).
    """

    def __init__(self, dim: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, nhead, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, cross_mask: torch.Tensor,
                padding: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x, attn_mask=self_mask, key_padding_mask=padding,
                                          need_weights=False)[0])
        x = self.norm2(x + self.cross_attn(x, x, x, attn_mask=cross_mask,
                                           key_padding_mask=padding, need_weights=False)[0])
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


class Decoder(nn.Module):
    """The stack of layers (the official module also has a final norm, absent in post-norm)."""

    def __init__(self, config: AMESConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config.model_dim, config.nhead,
                                                 config.dim_feedforward)
                                    for _ in range(config.num_layers))


def attention_masks(n_query: int, n_database: int, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (self-attention, cross-attention) masks over [match token, query, database]
    (True = may not attend): in self-attention a descriptor attends only to its own image, in
    cross-attention only to the other one; the match token attends to, and is attended by, all."""
    n = 1 + n_query + n_database
    query, database = slice(1, 1 + n_query), slice(1 + n_query, n)
    self_mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    self_mask[query, database] = True
    self_mask[database, query] = True
    cross_mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    cross_mask[query, query] = True
    cross_mask[database, database] = True
    return self_mask, cross_mask


class AMES(nn.Module):
    """The AMES similarity network (parameter names and shapes of the official ``AMES`` module).

    ``forward`` returns one logit per pair; :func:`combine_scores` turns it into the official
    re-ranking score. Inference only (the model is put in eval mode by :func:`load_ames`).
    """

    def __init__(self, config: AMESConfig = AMESConfig()):
        super().__init__()
        self.config = config
        d = config.model_dim
        self.mtc_token = nn.Parameter(0.02 * torch.randn(d))
        if config.binarized:
            self.remap_local = nn.Sequential(Binarization(config.local_dim, d), nn.Linear(d, d),
                                             nn.LayerNorm(d))
        else:
            self.remap_local = nn.Sequential(nn.Linear(config.local_dim, d), nn.LayerNorm(d))
        self.decoder = Decoder(config)
        self.classifier = nn.Linear(d, 1)

    def forward(self, query: torch.Tensor, database: torch.Tensor,
                query_padding: torch.Tensor | None = None,
                database_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] of B pairs: query descriptors [B, Q, D] against database descriptors
        [B, T, D]; the paddings [B, Q] / [B, T] are True on padding rows (None: no padding)."""
        b, n_query, n_database = query.shape[0], query.shape[1], database.shape[1]
        q = self.remap_local(F.normalize(query, dim=-1))
        db = self.remap_local(F.normalize(database, dim=-1))
        if not self.config.binarized and not self.training:
            db = db.half().float()  # the evaluation's float16 storage of the database side
        x = torch.cat([self.mtc_token.expand(b, 1, -1), q, db], dim=1)
        none = torch.zeros(b, 1, dtype=torch.bool, device=x.device)
        padding = torch.cat([
            none,
            none.expand(b, n_query) if query_padding is None else query_padding.bool(),
            none.expand(b, n_database) if database_padding is None else database_padding.bool(),
        ], dim=1)
        self_mask, cross_mask = attention_masks(n_query, n_database, x.device)
        for layer in self.decoder.layers:
            x = layer(x, self_mask, cross_mask, padding)
        return self.classifier(x[:, 0]).squeeze(-1)


def combine_scores(global_similarity: torch.Tensor, logits: torch.Tensor, lamb: float,
                   temp: float) -> torch.Tensor:
    """The official re-ranking score: ``lamb * global + (1 - lamb) * sigmoid(temp * logit)``."""
    return lamb * global_similarity + (1.0 - lamb) * torch.sigmoid(temp * logits)


class AMESDetector(nn.Module):
    """AMES's local-feature detector (``SpatialAttention2d``; parameter names of the official
    module): a pointwise conv + batch norm that *transforms* every patch token, and a second
    pointwise conv + softplus that scores it. The AMES models were trained on the transformed,
    L2-normalised tokens, selected by that score."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, 1, 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit descriptors [B, P, D], saliency [B, P]) of patch tokens [B, P, D]."""
        x = self.bn(self.conv1(tokens.transpose(1, 2)[..., None]))  # [B, D, P, 1]
        descriptors = F.normalize(x, dim=1, eps=1e-15)
        saliency = F.softplus(self.conv2(F.relu(x)))
        return descriptors[..., 0].transpose(1, 2), saliency[:, 0, :, 0]


# ----------------------------------------------------------------------------- checkpoints

def default_cache_dir() -> Path:
    """Where downloaded AMES networks are kept: ``$XDG_CACHE_HOME/quari/ames`` (default
    ``~/.cache/quari/ames``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quari" / "ames"


def resolve_checkpoint(path_or_url: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                       sha256: str | None = None, retries: int = 3) -> Path:
    """Local path of a checkpoint given as a path or a URL (http, https, ftp, file).

    A URL is fetched once into ``<cache_dir>/<hash of the URL>/<file name>`` and reused after
    (with ``sha256``, the copy must match it). A failed download raises RuntimeError naming the
    URL; a missing local path FileNotFoundError.
    """
    text = str(path_or_url)
    if urlparse(text).scheme in ("http", "https", "ftp", "file"):
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        name = Path(urlparse(text).path).name or "checkpoint.pt"
        target = folder / hashlib.sha256(text.encode()).hexdigest()[:16] / name
        try:
            return fetch(RemoteFile(text, str(target), sha256=sha256), retries=retries,
                         progress=False)
        except RuntimeError as err:
            raise RuntimeError(f"could not download the checkpoint {text} ({err}); fetch it "
                               f"yourself (published networks: {NETWORKS_URL}) and pass its "
                               "local path") from err
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (published AMES networks: "
                                f"{NETWORKS_URL})")
    if sha256 is not None:
        check_file(path, sha256=sha256)
    return path


def _global_name(entry) -> str:
    """The "module.name" a pickle records for an allowlist entry (object or (object, name))."""
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official checkpoint (``{"state": ..., ...}``) or of a plain state dict
    file, read with ``weights_only=True`` and a narrow allowlist (numpy scalars and dtypes).

    A file holding any other pickled object is refused with a ValueError naming the file and the
    globals it would have needed; nothing of it is unpickled.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # an unreadable listing must not hide the refusal itself
            wanted = []
        refused = sorted(set(wanted) - {_global_name(g) for g in _ALLOWED_GLOBALS})
        raise ValueError(f"{path} holds pickled objects that are not allowed "
                         f"({', '.join(refused) or err}); it was not loaded. Only tensors, plain "
                         "containers and numpy scalars are read from checkpoints. If you trust "
                         "the file, save its state dict alone (torch.save(ckpt['state'], ...)) "
                         "and pass that file.") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint: {err}") from err
    state = content["state"] if isinstance(content, dict) and "state" in content else content
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors), neither "
                         "at its top level nor under 'state'")
    return state


def config_from_state_dict(state: dict[str, torch.Tensor], nhead: int = 2) -> AMESConfig:
    """The :class:`AMESConfig` a state dict was saved from (``nhead`` cannot be read from
    shapes; the published models use 2)."""
    try:
        binarized = "remap_local.0.W" in state
        local_dim = (state["remap_local.0.W"].shape[0] if binarized
                     else state["remap_local.0.weight"].shape[1])
        layers = {int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")}
        return AMESConfig(local_dim=int(local_dim), model_dim=int(state["mtc_token"].shape[0]),
                          nhead=nhead, num_layers=len(layers),
                          dim_feedforward=int(state["decoder.layers.0.linear1.weight"].shape[0]),
                          binarized=binarized)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"not an AMES state dict (missing or malformed {err})") from err


def load_ames(path_or_url: str | os.PathLike = DINOV2_AMES_URL, binarized: bool | None = None,
              nhead: int = 2, device: torch.device | str = "cpu",
              cache_dir: str | os.PathLike | None = None, sha256: str | None = None,
              retries: int = 3) -> AMES:
    """An AMES network in eval mode from a published checkpoint (path or URL).

    The architecture is read from the state dict's shapes; ``binarized``, when given, must match
    it (a dist checkpoint for True, an fp one for False). Downloads go to ``cache_dir``
    (:func:`resolve_checkpoint`).
    """
    path = resolve_checkpoint(path_or_url, cache_dir, sha256, retries)
    state = read_checkpoint_state(path)
    try:
        config = config_from_state_dict(state, nhead)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if binarized is not None and config.binarized != binarized:
        raise ValueError(f"{path} holds the {'dist' if config.binarized else 'fp'} AMES model, "
                         f"but binarized={binarized} was asked for")
    if config.model_dim % nhead:
        raise ValueError(f"{path}: width {config.model_dim} is not divisible by nhead={nhead}")
    logger.info("AMES from %s: %s", path, config)
    return load_state_strict(AMES(config), state, path).to(device)


def load_ames_detector(path_or_url: str | os.PathLike = DINOV2_DETECTOR_URL,
                       device: torch.device | str = "cpu",
                       cache_dir: str | os.PathLike | None = None, sha256: str | None = None,
                       retries: int = 3) -> AMESDetector:
    """The AMES local-feature detector in eval mode from its checkpoint (path or URL), read with
    the same rules as :func:`load_ames`."""
    path = resolve_checkpoint(path_or_url, cache_dir, sha256, retries)
    state = read_checkpoint_state(path)
    if "conv1.weight" not in state:
        raise ValueError(f"{path} is not an AMES detector (no conv1.weight)")
    detector = AMESDetector(int(state["conv1.weight"].shape[0]))
    return load_state_strict(detector, state, path).to(device).requires_grad_(False)
