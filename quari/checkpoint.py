"""Saving and loading hypernetworks: our own safetensors format and the authors' released one.

Our format (``save_pretrained`` / ``load_pretrained``) is a directory with ``model.safetensors``
(the state dict) and ``config.json`` (the :class:`~quari.model.QuARIConfig` fields plus
``format_version``). The released checkpoints (Hugging Face ``EricX003/QuARI-*``) are a directory
with ``config.yml`` (the constructor arguments under ``hparams``) and ``weights.pt`` (a pickled
state dict); :func:`load_released` reads them without ever unpickling arbitrary objects.
:class:`~quari.model.QuARI` uses the released parameter names, so no key is renamed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch
import yaml

from quari.model import QuARI, QuARIConfig
from quari.store import atomic_write

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RELEASED_CONFIG_FILE = "config.yml"
RELEASED_WEIGHTS_FILE = "weights.pt"

# Released constructor argument -> QuARIConfig field. Arguments left out of a config.yml take the
# released defaults, which are also QuARIConfig's.
RELEASED_HPARAMS = {
    "embedding_dim": "embedding_dim",
    "low_rank_dim": "rank",
    "hidden_dim": "hidden_dim",
    "num_steps": "num_steps",
    "nhead": "nhead",
    "num_layers": "num_layers",
    "dropout": "dropout",
    "query_residual_weight": "query_residual_weight",
    "use_fro_norm": "fro_norm",
    "anchor_scale": "anchor_scale",
}


def released_config(hparams: dict) -> QuARIConfig:
    """The :class:`QuARIConfig` (variant "released") of a released ``hparams`` mapping."""
    if not isinstance(hparams, dict):
        raise ValueError(f"released hparams must be a mapping, got {type(hparams).__name__}")
    unknown = sorted(set(hparams) - set(RELEASED_HPARAMS))
    if unknown:
        raise ValueError(f"unknown released hparams {unknown}; known: {sorted(RELEASED_HPARAMS)}")
    if "embedding_dim" not in hparams:
        raise ValueError("released hparams lack embedding_dim")
    fields = {RELEASED_HPARAMS[k]: v for k, v in hparams.items()}
    return QuARIConfig(**fields, variant="released")


def _check_state_dict(state: object, source: Path) -> dict[str, torch.Tensor]:
    """``state`` itself when it is a flat mapping of str -> Tensor; a ValueError otherwise."""
    if not isinstance(state, dict):
        raise ValueError(f"{source} must hold a state dict (a mapping of names to tensors), "
                         f"got {type(state).__name__}")
    bad = [repr(k) for k, v in state.items() if not isinstance(k, str)
           or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source} is not a flat mapping of str -> Tensor; offending entries: "
                         f"{', '.join(bad[:10])}")
    return state


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                      source: str | os.PathLike) -> torch.nn.Module:
    """``module.load_state_dict(state, strict=True)`` with an error that names ``source`` and
    lists every missing, unexpected and misshapen key; returns the module in eval mode."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
                         for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(f"state dict in {source} does not fit {type(module).__name__}: "
                         f"missing keys {missing}; unexpected keys {unexpected}; "
                         f"shape mismatches {wrong_shape}")
    module.load_state_dict(state, strict=True)
    return module.eval()


def load_released(directory: str | os.PathLike) -> QuARI:
    """A released checkpoint (``config.yml`` + ``weights.pt``) as a :class:`QuARI` in eval mode.

    ``weights.pt`` is read with ``torch.load(weights_only=True)``: anything other than plain
    tensors in a flat mapping is refused with a ValueError.
    """
    directory = Path(directory)
    with open(directory / RELEASED_CONFIG_FILE) as f:
        meta = yaml.safe_load(f)
    if not isinstance(meta, dict) or "hparams" not in meta:
        raise ValueError(f"{directory / RELEASED_CONFIG_FILE} must be a mapping with 'hparams'")
    config = released_config(meta["hparams"])
    weights = directory / RELEASED_WEIGHTS_FILE
    try:
        state = torch.load(weights, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise ValueError(f"{weights} holds objects other than tensors and was refused "
                         f"(weights_only loading): {err}") from err
    state = _check_state_dict(state, weights)
    logger.info("loading released checkpoint %s (%s)", directory, config)
    return load_state_strict(QuARI(config), state, weights)


def save_pretrained(model: QuARI, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE,
                  lambda p: safetensors.torch.save_file(state, p, metadata={"format": "pt"}))
    config = {"format_version": FORMAT_VERSION, **asdict(model.config)}

    def write_config(p: str) -> None:
        with open(p, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    atomic_write(directory / CONFIG_FILE, write_config)
    return directory


def load_pretrained(directory: str | os.PathLike) -> QuARI:
    """A model written by :func:`save_pretrained`, in eval mode on the CPU."""
    directory = Path(directory)
    with open(directory / CONFIG_FILE) as f:
        fields = json.load(f)
    version = fields.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_FILE}: unsupported format_version {version!r} "
                         f"(this code reads {FORMAT_VERSION})")
    try:
        config = QuARIConfig(**fields)
    except TypeError as err:
        raise ValueError(f"{directory / CONFIG_FILE} does not describe a QuARIConfig: {err}") from err
    state = safetensors.torch.load_file(directory / WEIGHTS_FILE, device="cpu")
    return load_state_strict(QuARI(config), state, directory / WEIGHTS_FILE)


def load_directory(directory: str | os.PathLike) -> QuARI:
    """Load whichever layout ``directory`` holds: ours, else the released one."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
        return load_pretrained(directory)
    if (directory / RELEASED_CONFIG_FILE).is_file() and (directory / RELEASED_WEIGHTS_FILE).is_file():
        return load_released(directory)
    raise ValueError(f"{directory} holds neither {CONFIG_FILE} + {WEIGHTS_FILE} nor "
                     f"{RELEASED_CONFIG_FILE} + {RELEASED_WEIGHTS_FILE}")


def push_to_hub(model: QuARI, repo_id: str, token: str | None = None,
                private: bool = False) -> str:
    """Upload ``model`` in our format to the Hugging Face model repo ``repo_id``; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        api.upload_folder(folder_path=tmp, repo_id=repo_id,
                          commit_message="Upload QuARI hypernetwork")
    return f"https://huggingface.co/{repo_id}"


def from_hub(repo_id: str | os.PathLike, revision: str | None = None,
             cache_dir: str | os.PathLike | None = None) -> QuARI:
    """A model from a Hugging Face repo id or a local directory, in either layout.

    Released repos (``config.yml`` + ``weights.pt``) go through :func:`load_released`.
    """
    if Path(repo_id).is_dir():
        return load_directory(repo_id)
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        str(repo_id), revision=revision, cache_dir=cache_dir,
        allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, RELEASED_CONFIG_FILE, RELEASED_WEIGHTS_FILE])
    return load_directory(local)
