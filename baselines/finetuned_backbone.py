"""Table 4's "fine-tuned backbone" ablation, on precomputed embeddings.

The paper fine-tunes the backbone itself on QuARI's training data. On a cache of embeddings the
closest equivalent is to fine-tune the backbone's output projection: one learnable E x E linear
map W, initialised at the identity (so training starts from the frozen backbone), applied to
queries and gallery alike, then L2-normalised. It is trained on exactly what QuARI sees: the same
training pairs (:func:`quari.quari_method.training_pairs`), modality-gap noise, semi-positives,
cluster-grouped batches, learning-rate schedule and symmetric contrastive loss
(:func:`quari.losses.contrastive_loss_from_logits`); only the scorer differs, a static cosine in
the projected space instead of a per-query map. So the row measures what a static map trained on
QuARI's data buys, and the gap to QuARI what query adaptivity buys.

Choices: W = I + D and AdamW's weight decay acts on D, so regularisation pulls towards the
frozen backbone rather than towards the zero map (whose cosine is undefined). A linear map
trains in float32 without mixed precision, and runs are short enough that training is not
checkpointed mid-run (``workdir`` receives the per-step history).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from quari import training
from quari.losses import contrastive_loss_from_logits
from quari.methods import StaticProjectionMethod
from quari.mining import SemiPositives
from quari.quari_method import fit_inputs
from quari.store import TrainingCollection, atomic_write_json
from quari.training import Batch, TrainConfig, TrainingData

log = logging.getLogger(__name__)


def projection_loss(weight: torch.Tensor, batch: Batch, config: TrainConfig) -> torch.Tensor:
    """QuARI's symmetric contrastive loss with every query and candidate mapped by ``weight``.

    S_ij = normalize(W q_i) . normalize(W d_j) / tau, and the semi-positives likewise; masks,
    duplicate handling and group positives are those of :mod:`quari.losses`.
    """
    queries = F.normalize(batch.queries @ weight.T, dim=-1)
    logits = queries @ F.normalize(batch.targets @ weight.T, dim=-1).T / config.temperature
    if batch.semipositives is None:
        return contrastive_loss_from_logits(logits, batch.target_ids,
                                            group_positives=config.group_positives)
    semis = F.normalize(batch.semipositives @ weight.T, dim=-1)
    semi_logits = torch.einsum("be,bse->bs", queries, semis) / config.temperature
    return contrastive_loss_from_logits(logits, batch.target_ids, semi_logits,
                                        batch.semipositive_weights, batch.semipositive_ids,
                                        config.group_positives)


class Projection(torch.nn.Module):
    """W = I + delta, E x E; delta starts at zero (the frozen backbone)."""

    def __init__(self, dim: int):
        super().__init__()
        self.delta = torch.nn.Parameter(torch.zeros(dim, dim))
        self.register_buffer("eye", torch.eye(dim), persistent=False)

    def weight(self) -> torch.Tensor:
        return self.eye + self.delta


@dataclass
class ProjectionResult:
    """What :func:`train_projection` returns."""

    weight: torch.Tensor  # [E, E] best validated map (final one without validation data)
    history: list[dict]  # one record per step: step, train_loss, val_loss (or None), lr
    steps: int  # optimizer steps taken
    best_step: int | None  # step of the best validation loss (None without validation data)
    stopped_early: bool  # early stopping ended the run


def train_projection(config: TrainConfig, train_data: TrainingData,
                     valid_data: TrainingData | None = None, device: torch.device | str = "cpu",
                     progress: bool = True) -> ProjectionResult:
    """Fine-tune an E x E projection, from the identity, in QuARI's own step loop
    (:class:`quari.training.StepLoop`): the same epochs, batches (cluster-grouped when
    ``hard_negative_clusters``), noise, gradient accumulation and clipping, AdamW, schedule,
    validation and early stopping; in float32 (no mixed precision).
    """
    device = torch.device(device)
    projection = Projection(train_data.queries.shape[1]).to(device)
    loop = training.StepLoop(projection,
                             lambda batch: projection_loss(projection.weight(), batch, config),
                             config, train_data, valid_data, device, mixed_precision=False)
    loop.run(desc="fine-tuning the backbone projection", progress=progress)
    state = loop.state
    with torch.no_grad():
        weight = projection.weight().cpu()
    return ProjectionResult(weight=weight, history=state.history, steps=state.step,
                            best_step=state.best_step, stopped_early=state.stopped_early)


class FinetunedBackbone(StaticProjectionMethod):
    """The backbone's embedding through a fine-tuned E x E projection, then cosine.

    Parameters are QuARI's: ``train`` (a :class:`quari.training.TrainConfig` as a dict) and
    ``image_query_fraction``; give it the same values as the ``quari`` entry it is compared with.
    """

    name = "finetuned_backbone"
    label = "fine-tuned backbone"
    #: QuARI's training data (semi-positives included) and recipe, without the hypernetwork
    side_inputs = ("semipositives",)
    shared_settings = ("train", "image_query_fraction")
    nested_params = {"train": TrainConfig}

    @classmethod
    def check_settings(cls, params: dict) -> None:
        super().check_settings(params)
        TrainConfig(**params.get("train", {}))

    def __init__(self, train: dict | None = None, image_query_fraction: float = 0.5,
                 device: str | None = None):
        # train: TrainConfig overrides, as for QuARI (batches, noise, semi-positives, schedule)
        # image_query_fraction: share of image-view queries among training pairs, as for QuARI
        super().__init__(train=dict(train or {}), image_query_fraction=image_query_fraction,
                         device=device)
        self.weight_: torch.Tensor | None = None  # [E, E]; a row x maps to x @ weight_.T

    def fit(self, train: TrainingCollection, valid: TrainingCollection | None = None,
            workdir=None, semipositives: SemiPositives | None = None, **context):
        config, train_data, valid_data = fit_inputs(
            {**self.params["train"], "device": str(self.device)},
            self.params["image_query_fraction"], train, valid, semipositives,
            "finetuned_backbone.train")
        result = train_projection(config, train_data, valid_data, self.device)
        self.weight_ = result.weight.to(self.device)
        self.history_ = result.history
        log.info("fine-tuned backbone projection: %d pairs, %d steps, best step %s, "
                 "final training loss %.4f", len(train_data), result.steps, result.best_step,
                 result.history[-1]["train_loss"])
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            training.save_history(Path(workdir) / training.HISTORY_FILE, result.history)
            atomic_write_json(Path(workdir) / "training_summary.json",
                              {"steps": result.steps, "best_step": result.best_step,
                               "stopped_early": result.stopped_early})
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_ is None:
            raise RuntimeError("finetuned_backbone is not fitted")
        return x @ self.weight_.T

    def save_state(self, directory: Path) -> None:
        save_file({"weight": self.weight_.detach().cpu().contiguous()},
                  str(directory / "projection.safetensors"))

    def load_state(self, directory: Path) -> None:
        self.weight_ = load_file(str(directory / "projection.safetensors"))["weight"].to(self.device)
