"""Speed of one QuARI training step: the batch scored with each query's factors formed in R^E
against the factors kept in the decoders' bases (:class:`quari.transform.BasisQueryTransform`,
what training uses).

    python -m quari.bench.training_step [--dim 384 --hidden 64 --layers 1 --refinements 2
                                         --rank 16 --batch 128 --device cpu --threads 1]
    python -m quari.bench.training_step --paper --dim 768 --device cuda   # the paper's size

Both forms run the same model on the same batch (unit Gaussian queries and targets, the demo's
loss: symmetric contrastive with grouped positives), forward, backward, gradient clipping and an
AdamW step. Each timing is the best of ``--repeats`` rounds of ``--steps`` steps after a warm-up,
the two forms alternating round by round so that a change in the machine's load hits both. The
run prints ms per step of each form, their ratio, and the largest difference of the two forms'
losses and gradients on the first step (they compute the same function, so it is round-off).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from quari.devices import resolve_device, synchronize
from quari.losses import symmetric_contrastive_loss
from quari.model import QuARI, QuARIConfig

#: the two forms timed: name -> ``in_basis``
FORMS = {"in R^E": False, "in bases": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384, help="embedding width E")
    parser.add_argument("--hidden", type=int, default=64, help="token width H")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--refinements", type=int, default=2, help="num_steps of the model")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--paper", action="store_true",
                        help="the paper's size: H 512, 8 heads, 4 layers, 4 refinements, rank 64, "
                             "batch 320")
    parser.add_argument("--steps", type=int, default=15, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.paper:
        args.hidden, args.heads, args.layers, args.refinements, args.rank, args.batch = (
            512, 8, 4, 4, 64, 320)
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = QuARIConfig(embedding_dim=args.dim, hidden_dim=args.hidden, nhead=args.heads,
                         num_layers=args.layers, num_steps=args.refinements, rank=args.rank,
                         dropout=0.0, token_dropout=0.0)
    model = QuARI(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    queries = F.normalize(torch.randn(args.batch, args.dim, device=device), dim=-1)
    targets = F.normalize(queries + 0.5 * torch.randn_like(queries), dim=-1)
    ids = torch.arange(args.batch, device=device) // 2  # pairs of positives, as grouped batches

    def loss_of(in_basis: bool) -> torch.Tensor:
        return symmetric_contrastive_loss(model(queries, in_basis=in_basis), targets, ids,
                                          group_positives=True)

    # the two forms compute the same function: compare loss and gradients before any update
    grads = []
    for in_basis in FORMS.values():
        loss = loss_of(in_basis)
        grads.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    loss_diff = (grads[0][0] - grads[1][0]).abs().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads[0][1], grads[1][1]))

    def step(in_basis: bool) -> None:
        loss = loss_of(in_basis)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    best = {form: float("inf") for form in FORMS}
    for in_basis in FORMS.values():  # warm-up
        for _ in range(3):
            step(in_basis)
    for _ in range(args.repeats):
        for form, in_basis in FORMS.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(in_basis)
            synchronize(device)
            best[form] = min(best[form], (time.perf_counter() - start) / args.steps)
    dense, bases = best["in R^E"], best["in bases"]
    result = {"ms_per_step_dense": 1000 * dense, "ms_per_step_bases": 1000 * bases,
              "speedup": dense / bases,
              "loss_diff": loss_diff, "grad_diff": grad_diff}
    print(f"QuARI training step, E {args.dim}, H {args.hidden}, {args.layers} layer(s), "
          f"{args.refinements} refinement(s), rank {args.rank}, batch {args.batch}, "
          f"{device}, {args.threads} thread(s); {model.num_parameters():,} parameters")
    print(f"  factors in R^E:          {result['ms_per_step_dense']:8.1f} ms/step")
    print(f"  factors in the bases:    {result['ms_per_step_bases']:8.1f} ms/step")
    print(f"  ratio (R^E / bases):     {result['speedup']:8.2f}x")
    print(f"  same function: |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")
    return result


if __name__ == "__main__":
    main()
