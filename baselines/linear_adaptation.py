"""Static linear task adaptation (ILIAS): Linear(E -> 512) + L2 norm, learned as a cosine classifier.

Follows the ILIAS recipe: the adaptation layer (Xavier-uniform weights, zero bias) feeds a
bias-free classifier whose weights are L2-normalised, so logits are cosines; a normalised-softmax
(CosFace with margin 0) loss at scale 16; Adam, lr 1e-3, weight decay 1e-6, batch 128, a few
epochs, drop-last batches. The same layer is applied to queries and gallery. Trained on the
training collection's image labels (instances; (class, domain) pairs for UnED).

It keeps its own few-line loop rather than the step loop QuARI and the fine-tuned backbone share
(:class:`quari.training.StepLoop`): ILIAS's recipe classifies single images into instance labels
with Adam at a fixed learning rate, without QuARI's training pairs, schedule, noise, clipping or
validation, so the shared loop would be a different training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from quari.methods import StaticProjectionMethod, as_tensor

log = logging.getLogger(__name__)


class LinearAdaptation(StaticProjectionMethod):
    """One static linear map for every query and gallery row."""

    name = "linear_adaptation"
    label = "static linear adaptation"

    def __init__(self, out_dim: int = 512, epochs: int = 5, batch_size: int = 128, lr: float = 1e-3,
                 weight_decay: float = 1e-6, scale: float = 16.0, margin: float = 0.0,
                 seed: int = 0, device: str | None = None):
        if epochs < 1 or batch_size < 1 or out_dim < 1:  # 0 epochs = an untrained layer
            raise ValueError(f"epochs, batch_size and out_dim must be at least 1, got {epochs}, "
                             f"{batch_size} and {out_dim}")
        super().__init__(out_dim=out_dim, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, scale=scale, margin=margin, seed=seed,
                         device=device)
        self.layer_: torch.nn.Linear | None = None

    def _new_layer(self, in_dim: int) -> torch.nn.Linear:
        layer = torch.nn.Linear(in_dim, self.params["out_dim"])
        torch.nn.init.xavier_uniform_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
        return layer.to(self.device)

    def fit(self, train, valid=None, workdir=None, **context):
        p = self.params
        labels_np = np.asarray(train.image_labels)
        keep = labels_np >= 0
        if keep.sum() == 0:
            raise ValueError("linear adaptation needs labelled training images (image_labels >= 0)")
        classes, labels_np = np.unique(labels_np[keep], return_inverse=True)
        x = as_tensor(np.asarray(train.images.embeddings)[keep], self.device)
        y = torch.from_numpy(labels_np).to(self.device)
        torch.manual_seed(p["seed"])
        gen = torch.Generator().manual_seed(p["seed"])
        self.layer_ = self._new_layer(x.shape[1])
        classifier = torch.nn.Linear(p["out_dim"], len(classes), bias=False).to(self.device)
        params = list(self.layer_.parameters()) + list(classifier.parameters())
        opt = torch.optim.Adam(params, lr=p["lr"], weight_decay=p["weight_decay"])
        n, bs = x.shape[0], min(p["batch_size"], x.shape[0])
        steps = (n // bs) * p["epochs"]
        bar = tqdm(total=steps, desc="linear adaptation", disable=None)
        for epoch in range(p["epochs"]):
            order = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n - bs + 1, bs):
                idx = order[start:start + bs]
                z = F.normalize(self.layer_(x[idx]), dim=-1)
                cos = z @ F.normalize(classifier.weight, dim=-1).T
                cos = cos - p["margin"] * F.one_hot(y[idx], len(classes))
                loss = F.cross_entropy(p["scale"] * cos, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        bar.close()
        self.layer_.eval()
        log.info("linear adaptation: %d images, %d classes, %d steps, final loss %.4f",
                 n, len(classes), steps, loss.item() if steps else float("nan"))
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_ is None:
            raise RuntimeError("linear_adaptation is not fitted")
        return self.layer_(x)

    def save_state(self, directory: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.layer_.state_dict().items()},
                  str(directory / "layer.safetensors"))

    def load_state(self, directory: Path) -> None:
        state = load_file(str(directory / "layer.safetensors"))
        self.layer_ = self._new_layer(state["weight"].shape[1])
        self.layer_.load_state_dict(state)
        self.layer_.eval()
