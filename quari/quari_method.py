"""QuARI behind the common method interface: training pairs, fitting, ranking, saving.

Training pairs come from a :class:`~quari.store.TrainingCollection`: every caption paired with
its image (text queries, as in the paper), plus, with ``image_query_fraction`` > 0, image queries
that are another view of the target's instance (the labelled-collection recipe used for Table 1b
and for the offline world). Semi-positives, mined once per collection, come in through ``fit``.
Ablations are configuration: ``train: {use_noise: false}``, ``train: {use_semipositives: false}``,
``model: {num_steps: 1}``.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from quari.checkpoint import load_pretrained, save_pretrained
from quari.methods import TransformMethod
from quari.mining import SemiPositives
from quari.model import QuARI, QuARIConfig
from quari.store import TrainingCollection, atomic_write_json
from quari import training
from quari.training import TrainConfig, TrainingData, make_training_data, save_history
from quari.transform import QueryTransform

log = logging.getLogger(__name__)


def training_pairs(collection: TrainingCollection, image_query_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings [M, E], target image row [M]) of a collection's training pairs.

    All captions pair with their image. For a fraction f > 0 of image queries, f / (1 - f) x
    (number of captions) extra pairs are drawn (seeded): a target image of an instance with at
    least two views, queried by another view of the same instance. With f = 1 every image with
    another view is a target once, and captions are not used.
    """
    if not 0 <= image_query_fraction <= 1:
        raise ValueError("image_query_fraction must lie in [0, 1]")
    images = np.asarray(collection.images.embeddings, dtype=np.float32)
    captions = np.asarray(collection.captions.embeddings, dtype=np.float32)
    rng = np.random.default_rng(seed)
    labels = collection.image_labels
    groups: dict[int, np.ndarray] = {}
    if image_query_fraction > 0:
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        for rows in np.split(order, bounds):
            if len(rows) >= 2 and labels[rows[0]] >= 0:
                groups[int(labels[rows[0]])] = rows
    if image_query_fraction > 0 and not groups:
        raise ValueError("image queries need instances with at least two labelled views")
    eligible = np.concatenate(list(groups.values())) if groups else np.zeros(0, dtype=np.int64)
    if image_query_fraction == 1:
        n_image, use_captions = len(eligible), False
        targets = eligible
    else:
        n_image = int(round(image_query_fraction / (1 - image_query_fraction) * len(captions)))
        use_captions = True
        targets = rng.choice(eligible, size=n_image, replace=n_image > len(eligible)) if n_image else eligible[:0]
    views = np.empty(len(targets), dtype=np.int64)
    for n, t in enumerate(targets):
        others = groups[int(labels[t])]
        others = others[others != t]
        views[n] = others[rng.integers(len(others))]
    queries = [images[views]]
    query_image = [targets]
    if use_captions:
        queries.insert(0, captions)
        query_image.insert(0, collection.caption_image)
    return np.concatenate(queries), np.concatenate(query_image).astype(np.int64)


def collection_training_data(collection: TrainingCollection, image_query_fraction: float,
                             seed: int, semipositives: SemiPositives | None = None) -> TrainingData:
    """QuARI's training data from a collection: its :func:`training_pairs`, images deduplicated,
    instance labels as positive groups, semi-positives when given."""
    queries, rows = training_pairs(collection, image_query_fraction, seed)
    return make_training_data(np.asarray(collection.images.embeddings, dtype=np.float32),
                              collection.images.ids, queries, rows, semipositives,
                              image_labels=collection.image_labels)


def fit_inputs(train_params: dict, image_query_fraction: float, train: TrainingCollection,
               valid: TrainingCollection | None, semipositives: SemiPositives | None, where: str
               ) -> tuple[TrainConfig, TrainingData, TrainingData | None]:
    """The :class:`~quari.training.TrainConfig` of ``train_params`` and QuARI's training and
    validation data (:func:`collection_training_data`; validation pairs drawn with seed + 1 and
    without semi-positives): what QuARI and the fine-tuned backbone both train on. ``where``
    names the configuration entry in errors."""
    try:
        config = TrainConfig(**train_params)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None
    if config.use_semipositives and semipositives is None:
        log.warning("%s: no semi-positives given: training without them", where)
    train_data = collection_training_data(train, image_query_fraction, config.seed, semipositives)
    valid_data = (collection_training_data(valid, image_query_fraction, config.seed + 1)
                  if valid is not None else None)
    return config, train_data, valid_data


class QuARIMethod(TransformMethod):
    """QuARI: a per-query low-rank map of the gallery and an adapted query."""

    name = "quari"
    label = "QuARI"
    #: neighbours mined from the training images (used when ``train.use_semipositives``)
    side_inputs = ("semipositives",)
    #: the config's ``quari:`` block is this method's settings (an entry of its own overrides it)
    shared_settings = ("model", "train", "image_query_fraction")
    nested_params = {"model": QuARIConfig, "train": TrainConfig}
    #: a hypernetwork trained for thousands of steps: the longest fit of the paper's methods
    fit_cost = 10

    def __init__(self, model: dict | None = None, train: dict | None = None,
                 image_query_fraction: float = 0.5, device: str | None = None):
        super().__init__(model=dict(model or {}), train=dict(train or {}),
                         image_query_fraction=image_query_fraction, device=device)
        self.model_: QuARI | None = None

    @classmethod
    def check_settings(cls, params: dict) -> None:
        """Also the model's and the training's settings, as ``fit`` builds them (with a small
        width, so that only the other values are checked)."""
        super().check_settings(params)
        if "model" in params:
            QuARIConfig(embedding_dim=8, **{**params["model"], "hidden_dim": 8, "nhead": 1})
        if "train" in params:
            TrainConfig(**params["train"])

    def model_size(self) -> str:
        """Hidden width, layers and rank of the hypernetwork when they are not the paper's
        released ones (H 512, 4 layers, rank 64), e.g. "H 64, 1 layer, rank 16; CPU-size" for a
        model smaller than the paper's; "" at the paper's size."""
        paper = {f.name: f.default for f in fields(QuARIConfig)
                 if f.name in ("hidden_dim", "num_layers", "rank")}
        size = {**paper, **{k: v for k, v in self.params["model"].items() if k in paper}}
        if size == paper:
            return ""
        layers = size["num_layers"]
        text = f"H {size['hidden_dim']}, {layers} layer{'' if layers == 1 else 's'}, rank {size['rank']}"
        smaller = all(size[k] <= paper[k] for k in paper)
        return text + ("; CPU-size" if smaller else "")

    def fit(self, train: TrainingCollection, valid: TrainingCollection | None = None,
            workdir=None, semipositives: SemiPositives | None = None, **context):
        try:
            model_config = QuARIConfig(embedding_dim=train.dim, **self.params["model"])
        except TypeError as err:
            raise ValueError(f"quari.model: {err}") from None
        config, train_data, valid_data = fit_inputs(
            {"device": str(self.device), **self.params["train"]},
            self.params["image_query_fraction"], train, valid, semipositives, "quari.train")
        log.info("QuARI %s: %d training pairs (%d distinct images), %d validation pairs, %s params",
                 model_config.variant, len(train_data), len(train_data.images),
                 0 if valid_data is None else len(valid_data), f"{QuARI(model_config).num_parameters():,}")
        result = training.train(config, model_config, train_data, valid_data,
                                checkpoint_dir=None if workdir is None else Path(workdir), progress=True)
        self.model_ = result.model.to(self.device).eval()
        self.history_ = result.history
        self.summary_ = {"steps": result.steps, "best_step": result.best_step,
                         "best_val_loss": result.best_val_loss, "stopped_early": result.stopped_early,
                         "first_val_loss": next((h["val_loss"] for h in result.history
                                                 if h.get("val_loss") is not None), None)}
        log.info("QuARI trained: %s", self.summary_)
        return self

    def transform(self, queries: torch.Tensor, query_ids=None) -> QueryTransform:
        if self.model_ is None:
            raise RuntimeError("quari is not fitted")
        with torch.no_grad():
            return self.model_.transform(queries.to(self.device))

    def save_state(self, directory: Path) -> None:
        save_pretrained(self.model_, directory / "model")
        if getattr(self, "history_", None) is not None:
            save_history(directory / "history.json", self.history_)
            atomic_write_json(directory / "training_summary.json", self.summary_)

    def load_state(self, directory: Path) -> None:
        self.model_ = load_pretrained(directory / "model").to(self.device).eval()

