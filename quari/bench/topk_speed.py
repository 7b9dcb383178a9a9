"""Speed of QuARI's full-gallery top-k: the pruned exact search and the full factored path
against plain cosine top-k, on random and on trained maps, for one query and for a batch.

    python -m quari.bench.topk_speed [--rows 1000000 --dim 512 --rank 64 --k 1000
                                      --batches 1 64 --maps random trained flat
                                      --checkpoint DIR --device cpu --threads N --no-full]

For each kind of map and each batch size B, one run prints the time of ``scoring.cosine_topk``
(the frozen backbone), of ``scoring.topk(method="full")`` (every row on all 2r factor
columns) and of ``scoring.topk`` (pruned, exact) over the same ``--rows`` x ``--dim`` fp16
memory-mapped gallery; the (query, row) pairs the pruned search scored exactly; the ratios; and
whether the pruned search returned the full path's rows and scores.

Maps: ``random`` are released-variant maps with Gaussian Frobenius-normalised factors (a flat,
small spectrum) over unit Gaussian rows. ``trained`` are the maps of a QuARI trained on the
synthetic world rendered at ``--dim`` (``--train-steps`` steps at rank ``--train-rank``,
the demo's recipe; or the model saved in ``--checkpoint``, which ``--save-checkpoint`` writes)
for the world's ILIAS queries, over a gallery of the world's images, each repeated with
isotropic jitter (``--jitter``) to ``--rows`` rows. ``flat`` are adversarial maps whose
U'V'^T = P S P^T spans 2 x PRUNE_MAX_DIRECTIONS + 4 orthonormal directions with signs +-1 (half
the eigenvalues of W W^T - a^2 I large and positive, half near -a^2: no choice of kept directions
leaves useful bounds, so the pruned search must fall back on the full path) over unit Gaussian
rows. With ``--dense-rows`` > 0 the factored scores are also checked against forming each
query's E x E matrix on that many rows. ``--no-full`` times only cosine and the pruned search
(quick repeated ratios; no comparison with the full path).
Every timing follows a warm-up on one chunk and is the best of ``--repeats`` runs. ``--gallery-file`` searches an existing fp16 [N, E]
raw memmap instead (e.g. 100M rows on a GPU machine's disk) for the random maps.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from quari import scoring
from quari.devices import synchronize
from quari.transform import QueryTransform

#: the synthetic backbone the trained maps live in (its dimension is --dim)
BACKBONE_NOISE = 0.025


def make_gallery(rows: int, dim: int, storage: str, directory: str, seed: int = 0,
                 base: np.ndarray | None = None, jitter: float = 0.0, name: str = "gallery"
                 ) -> np.ndarray | torch.Tensor:
    """Unit-norm fp16 rows, as an ``np.memmap`` in ``directory`` or an in-memory tensor: random
    Gaussian directions, or (``base`` given) the rows of ``base`` in turn, each plus isotropic
    noise of expected norm ``jitter``."""
    rng = np.random.default_rng(seed)
    if storage == "memmap":
        out = np.memmap(os.path.join(directory, f"{name}.f16"), dtype=np.float16, mode="w+",
                        shape=(rows, dim))
    else:
        out = np.empty((rows, dim), dtype=np.float16)
    step = 1 << 16
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = rng.standard_normal((n, dim), dtype=np.float32)
        if base is not None:
            block = (base[np.arange(start, start + n) % len(base)]
                     + jitter / np.sqrt(dim) * block)
        out[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    if storage == "memmap":
        out.flush()
        return np.memmap(out.filename, dtype=np.float16, mode="r", shape=(rows, dim))
    return torch.from_numpy(out)


def random_transform(queries: int, dim: int, rank: int, device: torch.device,
                     seed: int = 0) -> QueryTransform:
    """A released-variant transform: unit queries, Frobenius-normalised factors, a = 0.8."""
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(queries, dim, generator=g), dim=-1)
    left, right = (torch.randn(queries, dim, rank, generator=g) for _ in range(2))
    left = left / torch.linalg.matrix_norm(left, keepdim=True)
    right = right / torch.linalg.matrix_norm(right, keepdim=True)
    return QueryTransform(query, left, right, scale=0.8, anchor=1.0).to(device)


def flat_transform(queries: int, dim: int, device: torch.device, seed: int = 0
                   ) -> QueryTransform:
    """Adversarial released-variant maps with a spread spectrum (see the module docstring)."""
    rank = 2 * scoring.PRUNE_MAX_DIRECTIONS + 4
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(queries, dim, generator=g), dim=-1)
    basis = torch.linalg.qr(torch.randn(queries, dim, rank, generator=g))[0]
    signs = torch.where(torch.arange(rank) % 2 == 0, 1.0, -1.0)
    return QueryTransform(query, basis * signs, basis, scale=0.9, anchor=1.0).to(device)


def trained_world(dim: int, rank: int, steps: int, checkpoint: str | None,
                  save_checkpoint: str | None):
    """(model, query embeddings [Q, E], image embeddings [M, E]) of the synthetic world (seed 0)
    rendered at ``dim``: the QuARI in ``checkpoint``, or one trained here with the demo's
    recipe (``steps`` steps at rank ``rank``), saved to ``save_checkpoint`` if given."""
    from quari.checkpoint import load_pretrained, save_pretrained
    from quari.model import QuARIConfig
    from quari.quari_method import collection_training_data
    from quari.store import EmbeddingSet, TrainingCollection
    from quari.synthetic import BackboneSpec, WorldConfig, generate_world, render
    from quari.training import TrainConfig, train

    world = render(generate_world(WorldConfig(seed=0)),
                   BackboneSpec(name=f"syn-{dim}", dim=dim, noise=BACKBONE_NOISE))
    queries = np.concatenate([world.ilias_image_queries, world.ilias_text_queries])
    images = np.concatenate([world.ilias_gallery, world.inquire_gallery, world.train_images,
                             world.valid_images])
    if checkpoint:
        model = load_pretrained(checkpoint)
        if model.config.embedding_dim != dim:
            raise ValueError(f"{checkpoint} holds a QuARI for E={model.config.embedding_dim}, "
                             f"not --dim {dim}")
        return model.eval(), queries, images
    collection = TrainingCollection(
        images=EmbeddingSet(world.train_images, world.train_image_ids),
        image_labels=world.train_image_labels,
        captions=EmbeddingSet(world.train_captions, world.train_caption_ids),
        caption_image=world.train_caption_image)
    data = collection_training_data(collection, 0.5, 0)
    model_config = QuARIConfig(embedding_dim=dim, hidden_dim=64, nhead=4, num_layers=1,
                               num_steps=2, rank=rank, dropout=0.0)
    config = TrainConfig(lr_schedule="released", max_steps=steps, batch_size=128,
                         eval_every=max(steps, 1), noise_scale=0.03, use_semipositives=False,
                         hard_negative_clusters=8, group_positives=True, device="cpu")
    model = train(config, model_config, data, None).model.eval()
    if save_checkpoint:
        save_pretrained(model, save_checkpoint)
    return model, queries, images


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls of ``fn`` (synchronising CUDA) and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


@torch.no_grad()
def dense_topk(transform: QueryTransform, gallery, k: int, chunk_rows: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by forming each query's W = anchor*I + scale*L R^T and scoring normalize(d W)."""
    t = transform.to(device)
    eye = torch.eye(t.dim, device=device)
    maps = t.anchor * eye + t.scale * torch.bmm(t.left, t.right.transpose(1, 2))
    best_s = torch.empty(t.batch_size, 0, device=device)
    best_i = torch.empty(t.batch_size, 0, dtype=torch.int64, device=device)
    for start in range(0, gallery.shape[0], chunk_rows):
        rows = scoring.read_rows(gallery, start, min(start + chunk_rows, gallery.shape[0]),
                                 device, torch.float32)
        s = torch.stack([F.normalize(rows @ maps[b], dim=-1) @ t.query[b]
                         for b in range(t.batch_size)])
        ids = torch.arange(start, start + rows.shape[0], device=device)
        best_s, best_i = scoring.merge_topk(best_s, best_i, s, ids.expand(s.shape[0], -1), k)
    return best_s, best_i


def compare(transform: QueryTransform, gallery, args, device: torch.device, label: str
            ) -> dict[str, float]:
    """Time cosine, full and pruned top-k for one batch of maps; print and return the numbers."""
    k, chunk = args.k, args.chunk_rows
    repeats = args.repeats
    warm = gallery[:min(chunk, gallery.shape[0])]
    scoring.cosine_topk(transform.query, warm, k, chunk, device)
    if not args.no_full:
        scoring.topk(transform, warm, k, chunk, device, method="full")
    scoring.topk(transform, warm, k, chunk, device)
    out: dict[str, float] = {}
    out["cosine_s"], _ = timed(lambda: scoring.cosine_topk(transform.query, gallery, k, chunk,
                                                           device), repeats, device)
    stats: dict = {}
    out["pruned_s"], pruned = timed(lambda: scoring.topk(transform, gallery, k, chunk, device,
                                                         stats=stats), repeats, device)
    out["rescored"] = stats["rescored"] / stats["pairs"]
    if args.no_full:
        out["full_s"] = out["same_ids"] = out["same_id_sets"] = float("nan")
        out["max_score_diff"] = float("nan")
    else:
        out["full_s"], full = timed(lambda: scoring.topk(transform, gallery, k, chunk, device,
                                                         method="full"), repeats, device)
        out["same_ids"] = (pruned[1] == full[1]).float().mean().item()
        out["same_id_sets"] = float(np.mean([set(a) == set(b) for a, b in
                                             zip(pruned[1].tolist(), full[1].tolist())]))
        out["max_score_diff"] = (pruned[0] - full[0]).abs().max().item()
    directions = [d for d in stats["directions"] if d >= 0]
    out["bounded_queries"] = len(directions) / transform.batch_size
    out["mean_directions"] = float(np.mean(directions)) if directions else float("nan")
    print(f"{label:8s} B={transform.batch_size:<3d} cosine {out['cosine_s']:7.2f} s | "
          f"full {out['full_s']:7.2f} s ({out['full_s'] / out['cosine_s']:5.2f}x) | "
          f"pruned {out['pruned_s']:7.2f} s ({out['pruned_s'] / out['cosine_s']:5.2f}x cosine, "
          f"{out['full_s'] / out['pruned_s']:5.1f}x faster than full) | rescored "
          f"{100 * out['rescored']:.3f}% of pairs, j {out['mean_directions']:.1f} on "
          f"{100 * out['bounded_queries']:.0f}% of queries | same ids {out['same_ids']:.4f}, "
          f"same sets {out['same_id_sets']:.4f}, max |score diff| {out['max_score_diff']:.1e}",
          flush=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="gallery rows N")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension E")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64],
                   help="query batch sizes B")
    p.add_argument("--maps", nargs="+", choices=["random", "trained", "flat"],
                   default=["random", "trained"], help="kinds of maps")
    p.add_argument("--rank", type=int, default=64, help="rank r of the random maps")
    p.add_argument("--k", type=int, default=1000, help="results per query")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows streamed per chunk")
    p.add_argument("--repeats", type=int, default=1, help="timed runs (best is reported)")
    p.add_argument("--storage", choices=["memmap", "tensor"], default="memmap",
                   help="gallery as an fp16 np.memmap in a temp dir or an in-memory tensor")
    p.add_argument("--gallery-file", default=None,
                   help="an existing raw fp16 [N, --dim] file for the random and flat maps' gallery")
    p.add_argument("--checkpoint", default=None, help="QuARI (save_pretrained) for trained maps")
    p.add_argument("--save-checkpoint", default=None, help="save the QuARI trained here")
    p.add_argument("--train-steps", type=int, default=100, help="steps of the QuARI trained here")
    p.add_argument("--train-rank", type=int, default=16, help="rank of the QuARI trained here")
    p.add_argument("--jitter", type=float, default=0.5,
                   help="noise norm of the repeated world images of the trained maps' gallery")
    p.add_argument("--dense-rows", type=int, default=0,
                   help="rows for a check of the factored scores against dense E x E maps")
    p.add_argument("--no-full", action="store_true",
                   help="time cosine and the pruned search only (no full path, no comparison)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all available cores)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the benchmark, print a report and return its numbers by (maps, B)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = torch.device(args.device)
    results: dict[str, dict[str, float]] = {}
    print(f"device {device}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); {args.rows} x "
          f"{args.dim} fp16 rows ({args.storage}); k {args.k}, chunk {args.chunk_rows}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.maps:
            start = time.perf_counter()
            if kind in ("random", "flat"):
                t_all = (random_transform(max(args.batches), args.dim, args.rank, device)
                         if kind == "random" else flat_transform(max(args.batches), args.dim,
                                                                 device))
                if args.gallery_file:
                    size = os.path.getsize(args.gallery_file) // (2 * args.dim)
                    gallery = np.memmap(args.gallery_file, dtype=np.float16, mode="r",
                                        shape=(size, args.dim))
                else:
                    gallery = make_gallery(args.rows, args.dim, args.storage, tmp)
                about = (f"random maps, rank {args.rank}" if kind == "random" else
                         f"flat-spectrum maps, rank {t_all.rank}")
            else:
                model, queries, images = trained_world(args.dim, args.train_rank,
                                                       args.train_steps, args.checkpoint,
                                                       args.save_checkpoint)
                with torch.no_grad():
                    t_all = model(torch.from_numpy(queries[:max(args.batches)])).to(device)
                gallery = make_gallery(args.rows, args.dim, args.storage, tmp, seed=1,
                                       base=images, jitter=args.jitter, name="world")
                about = (f"trained maps ({args.checkpoint or f'{args.train_steps} steps here'}"
                         f", rank {t_all.rank}), gallery: {len(images)} world images + jitter "
                         f"{args.jitter}")
            values, _ = scoring.map_spectrum(t_all)
            top = values.abs().sort(dim=1, descending=True).values.median(dim=0).values
            print(f"{about}; ready in {time.perf_counter() - start:.0f} s; median |eigenvalues| "
                  f"of W W^T - a^2 I: {', '.join(f'{v:.3f}' for v in top[:6].tolist())}",
                  flush=True)
            for batch in args.batches:
                results[f"{kind}/B={batch}"] = compare(t_all[:batch], gallery, args, device,
                                                       kind)
            if args.dense_rows:
                sub = gallery[:min(args.dense_rows, gallery.shape[0])]
                t = t_all[:min(args.batches)]
                fac = scoring.topk(t, sub, args.k, args.chunk_rows, device)
                den = dense_topk(t, sub, args.k, args.chunk_rows, device)
                print(f"{kind}: pruned vs dense E x E on {len(sub)} rows: max |score diff| "
                      f"{(fac[0] - den[0]).abs().max().item():.1e}, same ids "
                      f"{(fac[1] == den[1]).float().mean().item():.4f}", flush=True)
            del gallery
    line = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"
    if device.type == "cuda":
        line += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    print(line)
    return results


if __name__ == "__main__":
    main()
