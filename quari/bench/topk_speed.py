"""Speed of query-adaptive top-k search: factored low-rank scoring against plain cosine search
and against the dense E x E map the released code forms.

    python -m quari.bench.topk_speed [--rows 1000000 --dim 512 --queries 64 --rank 64
                                      --dense-rows 100000 --k 1000 --device cpu]

Prints, from one run on random data: the time of ``scoring.topk`` over ``--rows`` fp16 rows,
of ``scoring.cosine_topk`` on the same rows and their ratio; on the first ``--dense-rows`` rows,
the time of the factored scoring against applying each query's dense matrix W (then normalising
and scoring), their ratio and the largest score difference; and the peak resident memory.
Every timing follows a warm-up on one chunk and is the best of ``--repeats`` runs.
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
from quari.transform import QueryTransform


def make_gallery(rows: int, dim: int, storage: str, directory: str,
                 seed: int = 0) -> np.ndarray | torch.Tensor:
    """Random unit-norm fp16 rows, as an ``np.memmap`` in ``directory`` or an in-memory tensor."""
    rng = np.random.default_rng(seed)
    if storage == "memmap":
        out = np.memmap(os.path.join(directory, "gallery.f16"), dtype=np.float16, mode="w+",
                        shape=(rows, dim))
    else:
        out = np.empty((rows, dim), dtype=np.float16)
    step = 1 << 16
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), dim), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
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


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls of ``fn`` (synchronising CUDA) and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="gallery rows N")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension E")
    p.add_argument("--queries", type=int, default=64, help="queries B per batch")
    p.add_argument("--rank", type=int, default=64, help="rank r of the low-rank map")
    p.add_argument("--dense-rows", type=int, default=100_000,
                   help="rows for the factored-vs-dense comparison")
    p.add_argument("--k", type=int, default=1000, help="results per query")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows streamed per chunk")
    p.add_argument("--repeats", type=int, default=1, help="timed runs (best is reported)")
    p.add_argument("--storage", choices=["memmap", "tensor"], default="memmap",
                   help="gallery as an fp16 np.memmap in a temp dir or an in-memory tensor")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all available cores)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print a report and return its numbers."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = torch.device(args.device)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        gallery = make_gallery(args.rows, args.dim, args.storage, tmp)
        t = random_transform(args.queries, args.dim, args.rank, device)
        print(f"device {device}, {torch.get_num_threads()} threads; gallery {args.rows} x "
              f"{args.dim} fp16 ({args.storage}, built in {time.perf_counter() - start:.1f} s); "
              f"{args.queries} queries, rank {args.rank}, k {args.k}, chunk {args.chunk_rows}")
        warm = gallery[:min(args.chunk_rows, args.rows)]
        scoring.topk(t, warm, args.k, args.chunk_rows, device)
        scoring.cosine_topk(t.query, warm, args.k, args.chunk_rows, device)
        dense_topk(t, warm, args.k, args.chunk_rows, device)

        out["factored_s"], _ = timed(
            lambda: scoring.topk(t, gallery, args.k, args.chunk_rows, device), args.repeats, device)
        out["cosine_s"], _ = timed(
            lambda: scoring.cosine_topk(t.query, gallery, args.k, args.chunk_rows, device),
            args.repeats, device)
        per = 1e3 / args.queries
        print(f"N={args.rows}: factored topk {out['factored_s']:.2f} s "
              f"({out['factored_s'] * per:.1f} ms/query), cosine topk {out['cosine_s']:.2f} s "
              f"({out['cosine_s'] * per:.1f} ms/query), ratio {out['factored_s'] / out['cosine_s']:.1f}x")

        sub = gallery[:min(args.dense_rows, args.rows)]
        out["factored_sub_s"], fac = timed(
            lambda: scoring.topk(t, sub, args.k, args.chunk_rows, device), args.repeats, device)
        out["dense_sub_s"], den = timed(
            lambda: dense_topk(t, sub, args.k, args.chunk_rows, device), args.repeats, device)
        out["max_score_diff"] = (fac[0] - den[0]).abs().max().item()
        out["same_ids"] = (fac[1] == den[1]).float().mean().item()
        print(f"N={len(sub)}: factored {out['factored_sub_s']:.2f} s, dense E x E "
              f"{out['dense_sub_s']:.2f} s, dense/factored {out['dense_sub_s'] / out['factored_sub_s']:.1f}x; "
              f"max |score diff| {out['max_score_diff']:.1e}, same ids {out['same_ids']:.4f}")
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    line = f"peak RSS {out['peak_rss_gib']:.2f} GiB"
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        line += f", peak GPU memory {out['peak_gpu_gib']:.2f} GiB"
    print(line)
    return out


if __name__ == "__main__":
    main()
