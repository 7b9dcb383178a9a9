"""Training the QuARI hypernetwork on precomputed embeddings.

One optimizer step draws ``grad_accum`` micro-batches of ``batch_size`` training pairs (each
micro-batch is one set of in-batch candidates for the loss), optionally adds modality-gap noise
to the queries, maps them with the hypernetwork and minimises
:func:`quari.losses.symmetric_contrastive_loss` against the targets and the queries' mined
semi-positives. Everything that decides the trajectory (model init, data order, noise, dropout)
is seeded, so a run on CPU is bit-for-bit reproducible, and a checkpoint holds all of it, so a
resumed run ends with the weights an uninterrupted one would have.

Data order: epoch e visits the pairs in a permutation drawn from a generator seeded by
(seed, e); its micro-batches are consecutive slices of ``batch_size`` and a last incomplete one is
dropped (a tiny batch has too few negatives), as are micro-batches left over when an epoch's
count is not a multiple of ``grad_accum``. A data set smaller than ``batch_size`` is one batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from quari.losses import symmetric_contrastive_loss
from quari.mining import SemiPositives, dedupe_images
from quari.devices import resolve_device
from quari.model import QuARI, QuARIConfig
from quari.store import FolderLock, atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

# (lr_max, lr_min) of each schedule. paper: cosine 1e-5 -> 2e-7 (section 4). released: OneCycle
# peaking at 5e-4, starting at 5e-4 / 25 = 2e-5 and ending at 2e-5 / 20 = 1e-6.
SCHEDULES = {"paper": (1e-5, 2e-7), "released": (5e-4, 1e-6)}
# The released OneCycle starts at lr_max / this.
RELEASED_DIV_FACTOR = 25.0
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Consecutive optimizer steps skipped by the fp16 loss scaler (non-finite gradients) before the
# run is declared diverged; each skip halves the scale, so 30 covers any transient overflow.
MAX_SKIPPED_STEPS = 30
CHECKPOINT_FILE = "checkpoint.pt"
# where a checkpoint of other training data is moved when a run starts over
PREVIOUS_CHECKPOINT_FILE = "checkpoint.previous.pt"
HISTORY_FILE = "history.json"
CHECKPOINT_FORMAT = 1
# TrainConfig fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("checkpoint_every", "device")


@dataclass
class TrainConfig:
    """How to train; defaults follow the paper, comments give the released code's value."""

    batch_size: int = 320  # training pairs per micro-batch = in-batch candidates (paper, released)
    max_steps: int | None = None  # optimizer steps; None = epochs x steps per epoch
    epochs: int = 10  # passes over the pairs when max_steps is None (released: at most 10)
    lr_schedule: str = "paper"  # "paper": cosine lr_max -> lr_min; "released": OneCycle
    lr_max: float | None = None  # peak learning rate; None = the schedule's (1e-5 / 5e-4)
    lr_min: float | None = None  # final learning rate; None = the schedule's (2e-7 / 1e-6)
    warmup_fraction: float = 0.01  # released schedule: share of steps rising from lr_max / 25
    weight_decay: float = 1e-2  # AdamW weight decay (paper and released)
    grad_clip: float = 1.0  # max global gradient norm, 0 = no clipping (released: 1.0)
    grad_accum: int = 1  # micro-batches per optimizer step (released: 2)
    temperature: float = 0.07  # tau of the contrastive loss (paper and released)
    use_noise: bool = True  # modality-gap noise on training queries (ablation "no noise": False)
    noise_scale: float = 1.0  # q <- q + s * noise_scale * n, s ~ U[0,1] per query, n ~ N(0, I)
    use_semipositives: bool = True  # semi-positives in the loss (ablation: False)
    group_positives: bool = False  # in-batch targets of one positive group (same image, or same
    # instance when the collection is labelled) are positives of each other, not masked out
    hard_negative_clusters: int = 0  # >0: k-means the target images into this many clusters and
    # draw each micro-batch from one cluster (harder in-batch negatives); 0 = uniform batches
    cluster_batch_fraction: float = 1.0  # with clusters: share of each micro-batch drawn from one
    # cluster; the rest are uniformly drawn pairs, so the per-query map also meets far negatives
    amp: bool = True  # mixed precision on CUDA (released: fp16 "16-mixed"); never on CPU
    amp_dtype: str = "float16"  # "float16" (with loss scaling, as released) or "bfloat16"
    eval_every: int = 500  # optimizer steps between validation losses (released: 500 batches)
    early_stopping_patience: int = 5  # validations without improvement; 0 = never (released: 5)
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (with a checkpoint_dir)
    seed: int = 0  # seeds model init, data order, noise and dropout
    device: str = "auto"  # "auto": cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {sorted(SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"TrainConfig.amp_dtype must be one of {sorted(AMP_DTYPES)}, "
                             f"got {self.amp_dtype!r}")
        for name in ("batch_size", "epochs", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"TrainConfig.max_steps must be at least 1, got {self.max_steps}")
        if self.hard_negative_clusters < 0:
            raise ValueError("TrainConfig.hard_negative_clusters must be >= 0")
        if not 0 <= self.cluster_batch_fraction <= 1:
            raise ValueError(f"TrainConfig.cluster_batch_fraction must be in [0, 1], "
                             f"got {self.cluster_batch_fraction}")
        if self.early_stopping_patience < 0 or self.grad_clip < 0 or self.noise_scale < 0:
            raise ValueError("early_stopping_patience, grad_clip and noise_scale must be >= 0")
        if not 0 < self.warmup_fraction < 1:
            raise ValueError(f"TrainConfig.warmup_fraction must be in (0, 1), "
                             f"got {self.warmup_fraction}")

    @property
    def learning_rates(self) -> tuple[float, float]:
        """(lr_max, lr_min) after filling in the schedule's defaults."""
        lr_max, lr_min = SCHEDULES[self.lr_schedule]
        return (self.lr_max if self.lr_max is not None else lr_max,
                self.lr_min if self.lr_min is not None else lr_min)


def one_step_config(model_config: QuARIConfig) -> QuARIConfig:
    """The "no iterative refinement" ablation (paper Table 4): the same model with one step.

    It is a model change, not a training one, so it lives here rather than in TrainConfig.
    """
    return replace(model_config, num_steps=1)


@dataclass
class TrainingData:
    """Training pairs as rows into a table of distinct images.

    A pair's target and semi-positives are rows of ``images`` rather than copies, so an image with
    five captions is stored once. The target row doubles as the image id for duplicate masking
    (``images`` holds each image once). Embeddings are cast to float32 batch by batch, so the
    tables may be float16.
    """

    queries: torch.Tensor  # [M, E] one query (caption or image view) per training pair
    images: torch.Tensor  # [N, E] distinct target images
    targets: torch.Tensor  # [M] int64 row of ``images`` each query belongs to
    semipositives: torch.Tensor | None = None  # [M, S] int64 rows of ``images``, -1 = absent
    semipositive_weights: torch.Tensor | None = None  # [M, S] weights, 0 where absent
    image_groups: torch.Tensor | None = None  # [N] int64 positive group of each image (e.g. its
    # instance): images of one group are never each other's negatives; None = each image alone

    def __post_init__(self) -> None:
        m, e = self.queries.shape
        if self.image_groups is not None and self.image_groups.shape != (len(self.images),):
            raise ValueError(f"image_groups must be [N={len(self.images)}], "
                             f"got {tuple(self.image_groups.shape)}")
        if self.images.dim() != 2 or self.images.shape[1] != e:
            raise ValueError(f"images must be [N, E={e}], got {tuple(self.images.shape)}")
        if self.targets.shape != (m,):
            raise ValueError(f"targets must be [M={m}], got {tuple(self.targets.shape)}")
        if m and (self.targets.min() < 0 or self.targets.max() >= len(self.images)):
            raise ValueError("targets point outside the image table")
        if (self.semipositives is None) != (self.semipositive_weights is None):
            raise ValueError("semi-positives and their weights go together")
        if self.semipositives is not None:
            if (self.semipositives.dim() != 2 or self.semipositives.shape[0] != m
                    or self.semipositive_weights.shape != self.semipositives.shape):
                raise ValueError(f"semi-positives and weights must be [M={m}, S], got "
                                 f"{tuple(self.semipositives.shape)} and "
                                 f"{tuple(self.semipositive_weights.shape)}")
            if self.semipositives.numel() and self.semipositives.max() >= len(self.images):
                raise ValueError("semi-positives point outside the image table")

    def __len__(self) -> int:
        return self.queries.shape[0]


def make_training_data(image_embeddings: np.ndarray, image_ids: Sequence,
                       query_embeddings: np.ndarray, query_image: np.ndarray,
                       semipositives: SemiPositives | None = None,
                       image_labels: np.ndarray | None = None) -> TrainingData:
    """Training pairs from queries and the rows of ``image_embeddings`` they describe.

    ``image_ids`` [Ni] may repeat; images are deduplicated by id (with ``semipositives``' own
    deduplication when given, which must come from mining these same images). ``query_image``
    [M] is each query's row in ``image_embeddings``. Images are L2-normalised; queries are kept
    as they are. ``image_labels`` [Ni] (e.g. instance labels, -1 = unknown) make images of one
    label positives of each other: they are never used as each other's in-batch negatives.
    """
    query_image = np.asarray(query_image, dtype=np.int64)
    if len(query_image) != len(query_embeddings):
        raise ValueError(f"{len(query_image)} image rows for {len(query_embeddings)} queries")
    if len(query_image) and (query_image.min() < 0 or query_image.max() >= len(image_ids)):
        raise ValueError("query_image points outside the images")
    deduped = dedupe_images(image_embeddings, image_ids)
    targets = deduped.inverse[query_image]
    semi_rows = semi_weights = None
    if semipositives is not None:
        if not (np.array_equal(semipositives.inverse, deduped.inverse)
                and np.array_equal(semipositives.source_rows, deduped.source_rows)):
            raise ValueError("semi-positives were mined from other images than these")
        semi_rows = torch.as_tensor(semipositives.indices[targets], dtype=torch.int64)
        semi_weights = torch.as_tensor(semipositives.weights[targets], dtype=torch.float32)
    groups = None
    if image_labels is not None:
        labels = np.asarray(image_labels, dtype=np.int64)[deduped.source_rows]
        unknown = labels < 0  # an unlabelled image is a group of its own
        labels[unknown] = labels.max(initial=0) + 1 + np.flatnonzero(unknown)
        groups = torch.as_tensor(labels)
    return TrainingData(queries=torch.as_tensor(np.asarray(query_embeddings, dtype=np.float32)),
                        images=torch.as_tensor(deduped.embeddings),
                        targets=torch.as_tensor(targets, dtype=torch.int64),
                        semipositives=semi_rows, semipositive_weights=semi_weights,
                        image_groups=groups)


@dataclass
class Batch:
    """One micro-batch on the training device, ready for the loss."""

    queries: torch.Tensor  # [B, E] (noisy during training)
    targets: torch.Tensor  # [B, E]
    target_ids: torch.Tensor  # [B] rows of the image table
    semipositives: torch.Tensor | None  # [B, S, E], zero rows where absent
    semipositive_weights: torch.Tensor | None  # [B, S], 0 where absent
    semipositive_ids: torch.Tensor | None  # [B, S] rows of the image table, -1 where absent


def add_modality_gap_noise(queries: torch.Tensor, scale: float,
                           generator: torch.Generator) -> torch.Tensor:
    """q + s * scale * n with s ~ U[0, 1] per query and n ~ N(0, I) (LinCIR; paper section 3.3).

    The noise is drawn on the CPU ``generator`` (the same numbers on any device).
    """
    s = torch.rand(queries.shape[0], 1, generator=generator)
    n = torch.randn(queries.shape, generator=generator)
    return queries + (scale * s * n).to(device=queries.device, dtype=queries.dtype)


def make_batch(data: TrainingData, rows: torch.Tensor, device: torch.device,
               use_semipositives: bool, noise_scale: float = 0.0,
               generator: torch.Generator | None = None) -> Batch:
    """The micro-batch of pairs ``rows``; noise only when ``generator`` is given."""
    queries = data.queries[rows].to(device=device, dtype=torch.float32)
    if generator is not None:
        queries = add_modality_gap_noise(queries, noise_scale, generator)
    target_rows = data.targets[rows]
    targets = data.images[target_rows].to(device=device, dtype=torch.float32)
    # ids compared by the loss's masks: the image row, or its positive group when known
    group = (lambda r: r) if data.image_groups is None else (lambda r: data.image_groups[r])
    target_ids = group(target_rows)
    if not use_semipositives or data.semipositives is None:
        return Batch(queries, targets, target_ids.to(device), None, None, None)
    semi_ids = data.semipositives[rows]
    present = semi_ids >= 0
    weights = torch.where(present, data.semipositive_weights[rows].float(), 0.0)
    semis = data.images[semi_ids.clamp_min(0)].float() * present[..., None]
    return Batch(queries, targets, target_ids.to(device), semis.to(device), weights.to(device),
                 torch.where(present, group(semi_ids.clamp_min(0)), -1).to(device))


class NonFiniteError(RuntimeError):
    """A training loss or gradient became NaN or infinite; ``step`` names the optimizer step."""

    def __init__(self, what: str, step: int) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step = step


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: QuARI  # best validated weights (final ones without validation data), in eval mode
    history: list[dict]  # one record per step: step, train_loss, val_loss (or None), lr
    steps: int  # optimizer steps taken
    best_step: int | None  # step of the best validation loss (None without validation data)
    best_val_loss: float | None  # that loss
    stopped_early: bool  # early stopping ended the run


@dataclass
class _State:
    """Everything besides model, optimizer, scheduler and RNGs that a resumed run needs."""

    step: int = 0
    best_val: float = math.inf
    best_step: int | None = None
    best_model: dict | None = None
    bad_evals: int = 0
    skipped: int = 0
    stopped_early: bool = False
    finished: bool = False
    history: list[dict] = field(default_factory=list)


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose (noise, an epoch's order) that differs from ``seed`` itself."""
    return zlib.crc32(f"{seed}:{purpose}".encode())


def epoch_order(seed: int, epoch: int, size: int, clusters: torch.Tensor | None = None,
                 batch_size: int = 1, cluster_fraction: float = 1.0) -> torch.Tensor:
    """An epoch's order of the pairs: a seeded permutation, or, with ``clusters`` [size],
    micro-batches of ``batch_size`` whose first ``round(cluster_fraction * batch_size)`` pairs come
    from one cluster (pairs grouped by cluster, shuffled inside each, batches in shuffled order)
    and whose remaining pairs are uniformly drawn. Every pair appears once per epoch."""
    generator = torch.Generator().manual_seed(derived_seed(seed, f"epoch{epoch}"))
    order = torch.randperm(size, generator=generator)
    if clusters is None:
        return order
    per_batch = max(1, round(cluster_fraction * batch_size))
    batches_per_epoch = max(1, size // batch_size)
    grouped = order[:per_batch * batches_per_epoch] if per_batch < batch_size else order
    uniform = order[len(grouped):]
    grouped = grouped[torch.sort(clusters[grouped], stable=True).indices]
    chunks = list(torch.split(grouped, per_batch))
    chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator)]
    if per_batch >= batch_size:
        return torch.cat(chunks)
    fill = batch_size - per_batch
    mixed = [torch.cat([chunk, uniform[i * fill:(i + 1) * fill]]) for i, chunk in enumerate(chunks)]
    return torch.cat(mixed + [uniform[len(chunks) * fill:]])


def cluster_pairs(data: TrainingData, clusters: int, seed: int) -> torch.Tensor:
    """The k-means cluster [M] of every pair's target image (exact, seeded faiss k-means)."""
    import faiss

    images = np.ascontiguousarray(data.images.float().numpy())
    k = min(clusters, len(images))
    kmeans = faiss.Kmeans(images.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(images)
    _, assign = kmeans.index.search(images, 1)
    return torch.from_numpy(assign[:, 0].astype(np.int64))[data.targets]


def _micro_batches_per_epoch(size: int, batch_size: int) -> int:
    return max(1, size // batch_size)


def total_steps(config: TrainConfig, size: int) -> int:
    """Optimizer steps of a run over ``size`` training pairs."""
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * steps_per_epoch(config, size)


def steps_per_epoch(config: TrainConfig, size: int) -> int:
    steps = _micro_batches_per_epoch(size, config.batch_size) // config.grad_accum
    if steps < 1:
        raise ValueError(f"{size} pairs make fewer than grad_accum={config.grad_accum} "
                         f"micro-batches of {config.batch_size}")
    return steps


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over ``steps`` optimizer steps (optimizer lr = lr_max).

    paper: cosine from lr_max at the first step to lr_min at the last. released: OneCycle as
    the released code configures it (warm-up from lr_max / 25 over ``warmup_fraction`` of the
    steps, cosine down to lr_min; it also cycles Adam's beta1 between 0.95 and 0.85).
    """
    lr_max, lr_min = config.learning_rates
    if config.lr_schedule == "released":
        initial = lr_max / RELEASED_DIV_FACTOR
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr_max, total_steps=steps, pct_start=config.warmup_fraction,
            div_factor=RELEASED_DIV_FACTOR, final_div_factor=initial / lr_min)

    def factor(step: int) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step / max(steps - 1, 1), 1.0)))
        return (lr_min + (lr_max - lr_min) * cosine) / lr_max

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batch_loss(model: QuARI, batch: Batch, config: TrainConfig,
                autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """The loss of one micro-batch; only the hypernetwork runs under mixed precision."""
    with autocast:  # maps in the decoders' bases: the same scores, fewer products
        transform = model(batch.queries, in_basis=True)
    return symmetric_contrastive_loss(
        transform.to(dtype=torch.float32), batch.targets, batch.target_ids, batch.semipositives,
        batch.semipositive_weights, config.temperature, semipositive_ids=batch.semipositive_ids,
        group_positives=config.group_positives)


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=AMP_DTYPES[config.amp_dtype])
    return contextlib.nullcontext()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batch_loss: Callable[[Batch], torch.Tensor],
              data: TrainingData, config: TrainConfig, device: torch.device) -> float:
    """Mean of ``batch_loss`` over ``data`` with ``model`` in eval mode, without noise, in fixed
    batches.

    Batches of ``batch_size`` follow one permutation seeded by ``config.seed`` (so a batch is
    not all captions of a few images), the last one possibly smaller; the mean weighs each
    batch by its size. Semi-positives count when ``use_semipositives``.
    """
    if len(data) == 0:
        raise ValueError("the validation set holds no training pairs")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(derived_seed(config.seed, "valid"))
    order = torch.randperm(len(data), generator=generator)
    total = 0.0
    for start in range(0, len(data), config.batch_size):
        rows = order[start:start + config.batch_size]
        batch = make_batch(data, rows, device, config.use_semipositives)
        total += batch_loss(batch).item() * len(rows)
    model.train(was_training)
    return total / len(data)


def validation_loss(model: QuARI, data: TrainingData, config: TrainConfig,
                    device: torch.device | str | None = None) -> float:
    """QuARI's mean loss over ``data`` (:func:`mean_loss`), as training validates it."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = _autocast(config, device)
    return mean_loss(model, lambda batch: _batch_loss(model, batch, config, autocast), data,
                     config, device)


def save_history(path: str | os.PathLike, history: list[dict]) -> None:
    """The per-step history as JSON (written atomically)."""
    atomic_write_json(path, {"history": history})


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, **payload) -> None:
    """torch.save through a temporary file in the same folder and ``os.replace``."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def data_fingerprint(*datas: TrainingData | None) -> str:
    """A digest of everything the training data holds (every tensor's dtype, shape and bytes,
    of the training and validation data and their semi-positives): a checkpoint is resumed only
    by a run on the very same data. Costs one read of the tensors."""
    digest = hashlib.blake2b(digest_size=16)
    for data in datas:
        if data is None:
            digest.update(b"none")
            continue
        for name in ("queries", "images", "targets", "semipositives", "semipositive_weights",
                     "image_groups"):
            tensor = getattr(data, name)
            digest.update(f"{name}:{None if tensor is None else (tensor.dtype, tuple(tensor.shape))}"
                          .encode())
            if tensor is None or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(len(tensor), -1) if tensor.dim() else tensor.reshape(1)
            for start in range(0, len(flat), 1 << 16):
                block = flat[start:start + (1 << 16)].cpu().contiguous()
                digest.update(block.view(torch.uint8).numpy() if block.dtype != torch.bool
                              else block.to(torch.uint8).numpy())
    return digest.hexdigest()


def _check_resumable(path: Path, saved: dict, config: TrainConfig,
                     model_config: QuARIConfig) -> None:
    """Raise when ``saved`` was written with other settings: naming the file and how to start
    over (a resumed run must continue the same training, never mix two)."""
    restart = (f"delete {path} to start this training over (or restore the settings to "
               "resume it)")
    if saved["model_config"] != asdict(model_config):
        now = asdict(model_config)
        changed = sorted(k for k in now if saved["model_config"].get(k) != now[k])
        raise ValueError(f"{path} was written for another model config: "
                         + ", ".join(f"{k}={saved['model_config'].get(k)!r} (now {now[k]!r})"
                                     for k in changed) + f"; {restart}")
    now = asdict(config)
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES
                     and saved["train_config"].get(k) != now[k])
    if changed:
        raise ValueError(f"{path} was written with other training settings: "
                         + ", ".join(f"{k}={saved['train_config'].get(k)!r} (now {now[k]!r})"
                                     for k in changed) + f"; {restart}")


class StepLoop:
    """The optimizer steps over training pairs that QuARI (:func:`train`) and the fine-tuned
    backbone (``baselines.finetuned_backbone``) share, so that both see the same training.

    Each step draws ``grad_accum`` micro-batches in the epoch's order (:func:`epoch_order`,
    cluster-grouped when ``hard_negative_clusters``), adds modality-gap noise to the queries when
    ``use_noise``, back-propagates ``batch_loss(batch)``, clips the gradient norm, steps AdamW
    (lr_max, ``weight_decay``) and the schedule (:func:`make_scheduler`); every ``eval_every``
    steps and after the last it validates (:func:`mean_loss`), keeps the best weights, and stops
    after ``early_stopping_patience`` validations without improvement. A non-finite loss or
    gradient raises :class:`NonFiniteError` (the fp16 loss scaler skips up to
    :data:`MAX_SKIPPED_STEPS` non-finite steps in a row first). ``mixed_precision`` allows fp16
    loss scaling on CUDA when the config asks for it (``amp``, ``amp_dtype="float16"``); the
    caller's ``batch_loss`` applies the autocast it wants.

    :meth:`state_dict` / :meth:`load_state_dict` hold what a resumed run needs besides the
    model (optimizer, schedule, scaler, noise RNG, progress), so that it ends as an
    uninterrupted run would.
    """

    def __init__(self, model: torch.nn.Module, batch_loss: Callable[[Batch], torch.Tensor],
                 config: TrainConfig, train_data: TrainingData,
                 valid_data: TrainingData | None, device: torch.device,
                 mixed_precision: bool = True) -> None:
        self.model, self.batch_loss, self.config = model, batch_loss, config
        self.train_data, self.valid_data, self.device = train_data, valid_data, device
        lr_max, _ = config.learning_rates
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr_max,
                                           weight_decay=config.weight_decay)
        self.steps = total_steps(config, len(train_data))
        self.per_epoch = steps_per_epoch(config, len(train_data))
        self.scheduler = make_scheduler(self.optimizer, config, self.steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(
            mixed_precision and config.amp and device.type == "cuda"
            and config.amp_dtype == "float16"))
        self.noise = torch.Generator().manual_seed(derived_seed(config.seed, "noise"))
        self.state = _State()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "noise": self.noise.get_state(),
                "state": asdict(self.state)}

    def load_state_dict(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.noise.set_state(saved["noise"])
        self.state = _State(**saved["state"])

    def _validate(self) -> float:
        state = self.state
        val = mean_loss(self.model, self.batch_loss, self.valid_data, self.config, self.device)
        if val < state.best_val:
            state.best_val, state.best_step, state.bad_evals = val, state.step, 0
            state.best_model = _cpu_state(self.model)
        else:
            state.bad_evals += 1
        logger.info("step %d: validation loss %.5f (best %.5f at step %s)", state.step, val,
                    state.best_val, state.best_step)
        return val

    def run(self, checkpoint: Callable[[], None] | None = None,
            on_step: Callable[[int, torch.nn.Module, float], None] | None = None,
            desc: str = "training", progress: bool = True) -> None:
        """Take the remaining steps; ``checkpoint()`` every ``checkpoint_every`` steps and at
        the end, ``on_step(step, model, training loss)`` after every step. Leaves the best
        validated weights (the last ones without validation data) in the model, in eval mode."""
        config, data, state, model = self.config, self.train_data, self.state, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        bar = tqdm(total=self.steps, initial=state.step, desc=desc, unit="step",
                   disable=not progress)
        order, order_epoch = None, -1
        clusters = (cluster_pairs(data, config.hard_negative_clusters, config.seed)
                    if config.hard_negative_clusters else None)
        model.train()
        try:
            while state.step < self.steps and not state.finished:
                step = state.step + 1
                epoch, position = divmod(state.step, self.per_epoch)
                if epoch != order_epoch:
                    order = epoch_order(config.seed, epoch, len(data), clusters,
                                        config.batch_size, config.cluster_batch_fraction)
                    order_epoch = epoch
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for micro in range(config.grad_accum):
                    start = (position * config.grad_accum + micro) * config.batch_size
                    rows = order[start:start + config.batch_size]
                    batch = make_batch(data, rows, self.device, config.use_semipositives,
                                       config.noise_scale, self.noise if config.use_noise else None)
                    loss = self.batch_loss(batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteError("training loss", step)
                    self.scaler.scale(loss / config.grad_accum).backward()
                    loss_sum += loss.item()
                self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(
                    params, config.grad_clip if config.grad_clip > 0 else math.inf)
                if not torch.isfinite(norm):
                    if not self.scaler.is_enabled():
                        raise NonFiniteError("gradient", step)
                    state.skipped += 1  # the scaler skips this update and lowers its scale
                    logger.warning("step %d: non-finite gradient, update skipped by the loss "
                                   "scaler", step)
                    if state.skipped > MAX_SKIPPED_STEPS:
                        raise NonFiniteError(f"gradient ({state.skipped} steps in a row)", step)
                else:
                    state.skipped = 0
                lr = self.optimizer.param_groups[0]["lr"]
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                state.step = step
                record = {"step": step, "train_loss": loss_sum / config.grad_accum,
                          "val_loss": None, "lr": lr}
                if self.valid_data is not None and (step % config.eval_every == 0
                                                    or step == self.steps):
                    record["val_loss"] = self._validate()
                    if (config.early_stopping_patience
                            and state.bad_evals >= config.early_stopping_patience):
                        state.stopped_early = True
                        logger.info("early stopping at step %d", step)
                state.history.append(record)
                state.finished = state.stopped_early or step == self.steps
                if checkpoint is not None and (step % config.checkpoint_every == 0
                                               or state.finished):
                    checkpoint()
                bar.update(1)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{lr:.2e}",
                                refresh=False)
                if on_step is not None:
                    on_step(step, model, record["train_loss"])
        finally:
            bar.close()
        if state.best_model is not None:
            model.load_state_dict(state.best_model)
        model.eval()


def _train(config: TrainConfig, model_config: QuARIConfig, train_data: TrainingData,
          valid_data: TrainingData | None = None, *,
          checkpoint_dir: str | os.PathLike | None = None,
          resume: bool = True, progress: bool = True,
          on_step: Callable[[int, QuARI, float], None] | None = None) -> TrainResult:
    """Train a fresh hypernetwork of ``model_config`` on ``train_data`` (:class:`StepLoop`).

    With ``valid_data`` the validation loss is computed every ``eval_every`` steps and after
    the last, the best weights are kept and returned, and ``early_stopping_patience``
    validations without improvement end the run. With ``checkpoint_dir`` a checkpoint (and
    ``history.json``) is written atomically every ``checkpoint_every`` steps and at the end;
    ``resume`` continues from it, giving the same weights as an uninterrupted run. ``on_step``
    is called after every optimizer step with (step, model, training loss), e.g. for logging.
    Raises :class:`NonFiniteError` naming the step when a loss or gradient is NaN or infinite.
    Seeds torch's global RNG (model init and dropout draw from it).
    """
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = QuARI(model_config).to(device)
    autocast = _autocast(config, device)
    loop = StepLoop(model, lambda batch: _batch_loss(model, batch, config, autocast), config,
                    train_data, valid_data, device)

    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    fingerprint = data_fingerprint(train_data, valid_data) if path is not None else None
    saved = None
    if path is not None and resume and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unsupported checkpoint format {saved.get('format')}; "
                             f"delete it to start this training over")
        _check_resumable(path, saved, config, model_config)
        if saved.get("data_fingerprint") != fingerprint:
            kept = path.with_name(PREVIOUS_CHECKPOINT_FILE)
            logger.warning("%s was written on other training data (fingerprint %s, now %s): "
                           "starting over from step 0; the old checkpoint is kept as %s",
                           path, saved.get("data_fingerprint"), fingerprint, kept)
            os.replace(path, kept)
            saved = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        loop.load_state_dict({**saved, "noise": saved["rng"]["noise"]})
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        logger.info("resumed from %s at step %d of %d", path, loop.state.step, loop.steps)

    def checkpoint() -> None:
        own = loop.state_dict()
        _save_checkpoint(
            path, format=CHECKPOINT_FORMAT, data_fingerprint=fingerprint,
            train_config=asdict(config),
            model_config=asdict(model_config), model=_cpu_state(model),
            optimizer=own["optimizer"], scheduler=own["scheduler"], scaler=own["scaler"],
            rng={"torch": torch.get_rng_state(), "noise": own["noise"],
                 "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
            state=own["state"])
        save_history(path.parent / HISTORY_FILE, loop.state.history)

    loop.run(checkpoint if path is not None else None, on_step, "training QuARI", progress)
    state = loop.state
    return TrainResult(model=model, history=copy.deepcopy(state.history), steps=state.step,
                       best_step=state.best_step,
                       best_val_loss=None if state.best_step is None else state.best_val,
                       stopped_early=state.stopped_early)


@functools.wraps(_train)
def train(config: TrainConfig, model_config: QuARIConfig, train_data: TrainingData,
          valid_data: TrainingData | None = None, *,
          checkpoint_dir: str | os.PathLike | None = None, **options) -> TrainResult:
    # one training per checkpoint folder: a second writer fails at once (quari.store.FolderLock)
    lock = FolderLock(checkpoint_dir, "training checkpoint") if checkpoint_dir is not None else None
    try:
        return _train(config, model_config, train_data, valid_data,
                      checkpoint_dir=checkpoint_dir, **options)
    finally:
        if lock is not None:
            lock.release()
