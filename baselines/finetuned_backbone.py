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
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from quari import training
from quari.losses import contrastive_loss_from_logits
from quari.methods import StaticProjectionMethod
from quari.mining import SemiPositives
from quari.quari_method import collection_training_data
from quari.store import TrainingCollection, atomic_write_json
from quari.training import Batch, TrainConfig, TrainingData, make_batch

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


@torch.no_grad()
def projection_validation_loss(weight: torch.Tensor, data: TrainingData, config: TrainConfig
                               ) -> float:
    """Mean loss over ``data`` without noise, in the fixed batches QuARI's validation uses."""
    generator = torch.Generator().manual_seed(training.derived_seed(config.seed, "valid"))
    order = torch.randperm(len(data), generator=generator)
    total = 0.0
    for start in range(0, len(data), config.batch_size):
        rows = order[start:start + config.batch_size]
        batch = make_batch(data, rows, weight.device, config.use_semipositives)
        total += projection_loss(weight, batch, config).item() * len(rows)
    return total / len(data)


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
    """Fine-tune an E x E projection, from the identity, as :func:`quari.training.train` trains
    QuARI: the same epochs, batches (cluster-grouped when ``hard_negative_clusters``), noise,
    gradient accumulation and clipping, AdamW, schedule, validation and early stopping.
    """
    device = torch.device(device)
    dim = train_data.queries.shape[1]
    eye = torch.eye(dim, device=device)
    delta = torch.zeros(dim, dim, device=device, requires_grad=True)  # W = I + delta
    lr_max, _ = config.learning_rates
    optimizer = torch.optim.AdamW([delta], lr=lr_max, weight_decay=config.weight_decay)
    steps = training.total_steps(config, len(train_data))
    per_epoch = training.steps_per_epoch(config, len(train_data))
    scheduler = training.make_scheduler(optimizer, config, steps)
    noise = torch.Generator().manual_seed(training.derived_seed(config.seed, "noise"))
    clusters = (training.cluster_pairs(train_data, config.hard_negative_clusters, config.seed)
                if config.hard_negative_clusters else None)
    history: list[dict] = []
    best_val, best_step, best_delta, bad_evals, stopped_early = math.inf, None, None, 0, False
    order, order_epoch = None, -1
    bar = tqdm(total=steps, desc="fine-tuning the backbone projection", unit="step",
               disable=not progress)
    for step in range(1, steps + 1):
        epoch, position = divmod(step - 1, per_epoch)
        if epoch != order_epoch:
            order = training.epoch_order(config.seed, epoch, len(train_data), clusters,
                                          config.batch_size, config.cluster_batch_fraction)
            order_epoch = epoch
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            start = (position * config.grad_accum + micro) * config.batch_size
            batch = make_batch(train_data, order[start:start + config.batch_size], device,
                               config.use_semipositives, config.noise_scale,
                               noise if config.use_noise else None)
            loss = projection_loss(eye + delta, batch, config)
            if not torch.isfinite(loss):
                raise training.NonFiniteError("training loss", step)
            (loss / config.grad_accum).backward()
            loss_sum += loss.item()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([delta], config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        record = {"step": step, "train_loss": loss_sum / config.grad_accum, "val_loss": None,
                  "lr": lr}
        if valid_data is not None and (step % config.eval_every == 0 or step == steps):
            val = projection_validation_loss(eye + delta.detach(), valid_data, config)
            record["val_loss"] = val
            if val < best_val:
                best_val, best_step, best_delta, bad_evals = val, step, delta.detach().clone(), 0
            else:
                bad_evals += 1
            stopped_early = bool(config.early_stopping_patience
                                 and bad_evals >= config.early_stopping_patience)
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", refresh=False)
        if stopped_early:
            log.info("early stopping at step %d", step)
            break
    bar.close()
    final = best_delta if best_delta is not None else delta.detach()
    return ProjectionResult(weight=(eye + final).cpu(), history=history, steps=len(history),
                            best_step=best_step, stopped_early=stopped_early)


class FinetunedBackbone(StaticProjectionMethod):
    """The backbone's embedding through a fine-tuned E x E projection, then cosine.

    Parameters are QuARI's: ``train`` (a :class:`quari.training.TrainConfig` as a dict) and
    ``image_query_fraction``; give it the same values as the ``quari`` entry it is compared with.
    """

    name = "finetuned_backbone"
    label = "fine-tuned backbone"

    def __init__(self, train: dict | None = None, image_query_fraction: float = 0.5,
                 device: str | None = None):
        # train: TrainConfig overrides, as for QuARI (batches, noise, semi-positives, schedule)
        # image_query_fraction: share of image-view queries among training pairs, as for QuARI
        super().__init__(train=dict(train or {}), image_query_fraction=image_query_fraction,
                         device=device)
        self.weight_: torch.Tensor | None = None  # [E, E]; a row x maps to x @ weight_.T

    def _train_config(self) -> TrainConfig:
        try:
            return TrainConfig(**{**self.params["train"], "device": str(self.device)})
        except TypeError as err:
            raise ValueError(f"finetuned_backbone.train: {err}") from None

    def _data(self, collection: TrainingCollection, seed: int,
              semipositives: SemiPositives | None) -> TrainingData:
        return collection_training_data(collection, self.params["image_query_fraction"], seed,
                                        semipositives)

    def fit(self, train: TrainingCollection, valid: TrainingCollection | None = None,
            workdir=None, semipositives: SemiPositives | None = None, **context):
        config = self._train_config()
        if config.use_semipositives and semipositives is None:
            log.warning("no semi-positives given: fine-tuning without them")
        train_data = self._data(train, config.seed, semipositives)
        valid_data = self._data(valid, config.seed + 1, None) if valid is not None else None
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
