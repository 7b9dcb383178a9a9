"""The authors' released QuARI checkpoints as a method: QuARI rows without training.

The QuARI authors publish four hypernetworks on the Hugging Face hub (mvrl/QuARI
``download_ckpts.py``, ``MODEL_REPO_MAP``), each trained on the embeddings of ONE feature
extractor, named in its ``config.yml`` under ``feature_extractor`` (read by the authors'
``eval_ilias.py``: ``metadata['feature_extractor']``):

=============================================  =================================  =====================
hub repository                                 feature extractor (hub id)         registry backbone
=============================================  =================================  =====================
``EricX003/QuARI-clip-vit-base-patch16``        ``openai/clip-vit-base-patch16``   ``clip-vit-b16@224``
``EricX003/QuARI-clip-vit-large-patch14``       ``openai/clip-vit-large-patch14``  ``clip-vit-l14@224``
``EricX003/QuARI-google-siglip2-base-patch16-512``  ``google/siglip2-base-patch16-512``  ``siglip2-vit-b16@512``
``EricX003/QuARI-google-siglip2-large-patch16-512`` ``google/siglip2-large-patch16-512`` ``siglip2-vit-l16@512``
=============================================  =================================  =====================

The CLIP-L release adapts ``openai/clip-vit-large-patch14`` (224 px) features, not the 336 px
model of the paper's ``clip-vit-l14@336`` rows: it is offered for ``clip-vit-l14@224`` only. A
backbone whose weights (hub id) or embedding width differ from the checkpoint's is refused with
an error that names the backbone the checkpoint fits.

Loading never unpickles arbitrary objects (:func:`quari.checkpoint.load_released`:
``torch.load(weights_only=True)``). A download is pinned to one commit: the configured
``revision`` of that backbone, else the repository's current commit, resolved once and recorded
in ``release.json`` (with a warning to pin it).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from quari.checkpoint import (RELEASED_CONFIG_FILE, RELEASED_WEIGHTS_FILE, load_released)
from quari.methods import RetrievalMethod
from quari.quari_method import QuARIMethod
from quari.store import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    """One released checkpoint: its hub repository and the extractor it was trained on."""

    repo_id: str
    feature_extractor: str  # Hugging Face hub id of the backbone whose embeddings it adapts


#: mvrl/QuARI download_ckpts.py, MODEL_REPO_MAP (lines 4-9), keyed by the extractor each release
#: was trained on (its repository name; checked against config.yml's feature_extractor on load)
RELEASES = {r.feature_extractor: r for r in (
    Release("EricX003/QuARI-clip-vit-base-patch16", "openai/clip-vit-base-patch16"),
    Release("EricX003/QuARI-clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    Release("EricX003/QuARI-google-siglip2-base-patch16-512", "google/siglip2-base-patch16-512"),
    Release("EricX003/QuARI-google-siglip2-large-patch16-512",
            "google/siglip2-large-patch16-512"),
)}

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def released_backbones() -> dict[str, Release]:
    """Registry backbones that have a released checkpoint: {backbone name: release}."""
    from quari.backbones import BACKBONES
    return {name: RELEASES[info.model] for name, info in BACKBONES.items()
            if info.library == "transformers" and info.model in RELEASES}


def release_for(info) -> Release:
    """The release trained on backbone ``info``'s weights; a ValueError naming the backbones
    that have one otherwise."""
    if info.library == "transformers" and info.model in RELEASES:
        return RELEASES[info.model]
    fits = ", ".join(f"{b} ({r.repo_id})" for b, r in sorted(released_backbones().items()))
    raise ValueError(f"no released QuARI checkpoint was trained on backbone {info.name} "
                     f"({info.model}); released checkpoints fit: {fits}")


def download_release(release: Release, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(local folder, commit) of ``release`` fetched from the hub at one commit: ``revision``
    (a 40-hex commit) or, when None, the repository's current commit (resolved first, so the
    files all come from it). Only ``config.yml`` and ``weights.pt`` are fetched."""
    from huggingface_hub import HfApi, snapshot_download
    if revision is None:
        revision = HfApi().model_info(release.repo_id).sha
        log.warning("%s: no revision pinned; using its current commit %s (pin it in the method's "
                    "`revision` for a reproducible run)", release.repo_id, revision)
    elif not _COMMIT.match(revision):
        raise ValueError(f"{release.repo_id}: revision {revision!r} is not a 40-hex commit; pin "
                         "a commit, not a branch or tag")
    local = snapshot_download(release.repo_id, revision=revision, cache_dir=cache_dir,
                              allow_patterns=[RELEASED_CONFIG_FILE, RELEASED_WEIGHTS_FILE])
    return Path(local), revision


def check_fits(directory: str | os.PathLike, info) -> dict:
    """The ``config.yml`` of a released checkpoint folder, after checking that it was trained on
    backbone ``info``'s features: same extractor (hub id) and same embedding width."""
    path = Path(directory) / RELEASED_CONFIG_FILE
    meta = yaml.safe_load(path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("hparams"), dict):
        raise ValueError(f"{path}: not a released QuARI config (a mapping with 'hparams')")
    extractor = meta.get("feature_extractor")
    width = meta["hparams"].get("embedding_dim")
    if extractor != info.model:
        fits = [b for b, r in released_backbones().items() if r.feature_extractor == extractor]
        raise ValueError(
            f"{path}: this checkpoint was trained on features of {extractor!r}, but backbone "
            f"{info.name} is {info.model!r}; their embeddings differ, so it cannot adapt them"
            + (f" (it fits backbone {', '.join(fits)})" if fits else ""))
    if width != info.embed_dim:
        raise ValueError(f"{path}: this checkpoint adapts {width}-d embeddings, backbone "
                         f"{info.name} embeds at {info.embed_dim}")
    return meta


class ReleasedQuARI(QuARIMethod):
    """QuARI with the authors' released hypernetwork for the backbone being evaluated.

    ``revision``: backbone -> 40-hex commit of its release (recommended); ``checkpoint``:
    backbone -> local folder holding ``config.yml`` and ``weights.pt`` (a copy of the release,
    used instead of the hub). Nothing is trained: ``fit`` fetches, checks and loads.
    """

    name = "quari_released"
    label = "QuARI (authors' released checkpoint)"
    trainable = False
    #: fitted from a checkpoint and the backbone, never from a training collection
    uses_training_data = False
    #: ``fit`` needs the registry entry of the backbone, to pick and check its checkpoint
    side_inputs = ("backbone",)
    #: its settings are its own (revision, checkpoint), not QuARI's recipe
    shared_settings = ()
    nested_params = {}

    @classmethod
    def check_backbone(cls, backbone) -> None:
        """A released checkpoint runs only on the backbone it was trained on."""
        release_for(backbone)

    def __init__(self, revision: dict | None = None, checkpoint: dict | None = None,
                 device: str | None = None):
        RetrievalMethod.__init__(self, revision=dict(revision or {}),
                                 checkpoint=dict(checkpoint or {}), device=device)
        self.model_ = None
        self.release_: dict | None = None

    def fit(self, train=None, valid=None, workdir=None, backbone=None, **context):
        if backbone is None:
            raise ValueError("quari_released needs the backbone's registry entry (context "
                             "`backbone`) to pick and check its checkpoint")
        local = self.params["checkpoint"].get(backbone.name)
        if local is not None:
            directory, origin = Path(local), {"checkpoint": str(local)}
            if not directory.is_dir():
                raise FileNotFoundError(f"quari_released.checkpoint.{backbone.name}: {local} is "
                                        "not a folder holding config.yml and weights.pt")
        else:
            release = release_for(backbone)
            cache = None if workdir is None else Path(workdir) / "hub"
            directory, commit = download_release(release,
                                                 self.params["revision"].get(backbone.name), cache)
            origin = {"repo_id": release.repo_id, "revision": commit}
        meta = check_fits(directory, backbone)
        self.model_ = load_released(directory).to(self.device).eval()
        self.release_ = {**origin, "feature_extractor": meta["feature_extractor"],
                         "backbone": backbone.name, "hparams": meta["hparams"]}
        log.info("quari_released for %s: %s", backbone.name, self.release_)
        return self

    def save_state(self, directory: Path) -> None:
        super().save_state(directory)
        atomic_write_json(directory / "release.json", self.release_)
