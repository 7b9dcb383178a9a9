"""Memory of Table 3a's local-feature re-ranking: descriptor files memory-mapped against read
into memory.

    python -m baselines.local_features.memory_bench [--images 20000 --descriptors 100 --dim 768
                                             --queries 10 --query-descriptors 600
                                             --candidates 1000 --dir SCRATCH --threads 1]

Writes a synthetic database file of ``--images`` x ``--descriptors`` x ``--dim`` float16
descriptors (streamed, as the extractor writes; 20,000 x 100 x 768 is 3.1 GB, in ``--dir``,
deleted at the end) and a query file, then, each in a fresh process, loads both and re-ranks
``--queries`` random shortlists of ``--candidates`` images with Chamfer similarity
(``baselines.local_features.rerankers.ChamferReranker``): once memory-mapped (the default loading), once
read into memory as float32 (the loading before; needs about 3x the file in memory). Prints, from
one run, the load and re-ranking times, each process's peak resident memory (peak RSS) and
peak anonymous memory, their ratios, and the largest score difference between the two (0
expected).

Peak RSS also counts the file pages of the memory map that the re-ranking touched, with the
kernel's read-ahead around them: clean page cache that the kernel reclaims under memory pressure
(at ILIAS's 185 GB it can never hold them all). Peak anonymous memory (RssAnon, sampled every
5 ms; Linux) is what a process cannot give back: for the memory-mapped run, the candidates of
one query and Chamfer's working set.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from baselines.local_features.matching import save_local_descriptors
from quari.bench.memory import AnonymousPeak, process_status
from quari.store import atomic_write_npz

MODES = ("mmap", "in-memory")


def write_database(path: Path, images: int, descriptors: int, dim: int, seed: int = 0,
                   block_images: int = 500) -> None:
    """A random database file in the extractor's layout, written block by block (never whole
    in memory): unit-norm float16 descriptors, every row valid."""
    rng = np.random.default_rng(seed)

    def fill(npz) -> None:
        npz.write("ids", np.array([f"img{i:08d}" for i in range(images)]))
        npz.write("counts", np.full(images, descriptors, dtype=np.int64))
        with npz.rows("descriptors", (images, descriptors, dim), np.float16) as append:
            for start in range(0, images, block_images):
                block = rng.standard_normal((min(block_images, images - start), descriptors, dim),
                                            dtype=np.float32)
                append(block / np.linalg.norm(block, axis=-1, keepdims=True))
        with npz.rows("xy", (images, descriptors, 2), np.float32) as append:
            for start in range(0, images, block_images):
                append(rng.random((min(block_images, images - start), descriptors, 2),
                                  dtype=np.float32))

    atomic_write_npz(path, fill)


def memory_status() -> dict[str, float]:
    """Resident memory of this process in GiB: peak (``peak``), and now, split into anonymous
    and file-backed pages where /proc says so (Linux)."""
    out = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}  # KiB on Linux
    out.update({k: v / 2 ** 30 for k, v in process_status(("VmRSS", "RssAnon", "RssFile")).items()})
    return out


def measure(mode: str, database: str, queries: str, shortlist: np.ndarray,
            threads: int) -> dict:
    """In a fresh process: load both files (``mode``), re-rank every query's shortlist with
    Chamfer similarity; times, memory and the scores."""
    import torch

    from baselines.local_features.rerankers import ChamferReranker
    from baselines.local_features.matching import load_local_descriptors

    torch.set_num_threads(threads)
    before = memory_status()
    sampler = AnonymousPeak(interval=0.005)
    sampler.start()
    start = time.perf_counter()
    method = ChamferReranker(device="cpu")
    method.fit(None, local_descriptors=database, query_local_descriptors=queries)
    if mode == "in-memory":  # the loading before: both files read into memory as float32
        method.database_ = load_local_descriptors(database, mmap=False)
        method.queries_ = load_local_descriptors(queries, mmap=False)
    method.set_gallery(method.database_.ids)
    loaded = time.perf_counter()
    gallery = np.zeros((len(method.database_.ids), 1), dtype=np.float32)  # not used by Chamfer
    scores = method.rerank(gallery[:len(shortlist)], gallery, shortlist,
                           query_ids=method.queries_.ids)
    done = time.perf_counter()
    return {"load_s": loaded - start, "rerank_s": done - loaded, "before": before,
            "after": memory_status(), "peak_anonymous": sampler.stop() / 2 ** 30, "scores": scores.numpy()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20_000, help="database images N")
    p.add_argument("--descriptors", type=int, default=100, help="descriptors per database image")
    p.add_argument("--dim", type=int, default=768, help="descriptor dimension D")
    p.add_argument("--queries", type=int, default=10, help="queries re-ranked")
    p.add_argument("--query-descriptors", type=int, default=600, help="descriptors per query")
    p.add_argument("--candidates", type=int, default=1000, help="shortlist length per query")
    p.add_argument("--dir", default=None, help="where the temporary files go (default: TMPDIR)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all available cores)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print a report and return its numbers."""
    args = parse_args(argv)
    if args.candidates > args.images:
        raise SystemExit(f"--candidates {args.candidates} exceeds --images {args.images}")
    threads = args.threads or len(os.sched_getaffinity(0))
    rng = np.random.default_rng(args.seed)
    shortlist = np.stack([rng.choice(args.images, args.candidates, replace=False)
                          for _ in range(args.queries)])
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-local-") as tmp:
        database, queries = Path(tmp) / "database.npz", Path(tmp) / "queries.npz"
        start = time.perf_counter()
        write_database(database, args.images, args.descriptors, args.dim, args.seed)
        q = rng.standard_normal((args.queries, args.query_descriptors, args.dim), dtype=np.float32)
        save_local_descriptors(queries, [f"q{i}" for i in range(args.queries)],
                               q.astype(np.float16),
                               rng.random((args.queries, args.query_descriptors, 2)))
        size = database.stat().st_size / 2 ** 30
        print(f"database {args.images} x {args.descriptors} x {args.dim} float16: {size:.2f} GiB "
              f"(written streamed in {time.perf_counter() - start:.1f} s); {args.queries} "
              f"queries x {args.query_descriptors}, {args.candidates} candidates each; "
              f"Chamfer on {threads} thread(s)")
        results = {}
        context = multiprocessing.get_context("spawn")
        for mode in MODES:
            with context.Pool(1) as pool:  # a fresh process: its own peak RSS
                results[mode] = pool.apply(measure, (mode, str(database), str(queries),
                                                     shortlist, threads))
            r = results[mode]
            out[f"{mode}_load_s"], out[f"{mode}_rerank_s"] = r["load_s"], r["rerank_s"]
            out[f"{mode}_peak_rss_gib"] = r["after"]["peak"]
            line = (f"{mode:>9}: load {r['load_s']:6.2f} s, re-rank {r['rerank_s']:6.2f} s; "
                    f"peak RSS {r['after']['peak']:.2f} GiB (after imports "
                    f"{r['before'].get('VmRSS', float('nan')):.2f} GiB)")
            if "RssFile" in r["after"]:
                out[f"{mode}_peak_anonymous_gib"] = r["peak_anonymous"]
                file_pages = r["after"]["RssFile"] - r["before"]["RssFile"]
                line += (f", peak anonymous {r['peak_anonymous']:.2f} GiB (after imports "
                         f"{r['before']['RssAnon']:.2f}); file pages mapped at the end "
                         f"+{file_pages:.2f} GiB")
            print(line)
    out["peak_rss_ratio"] = out["in-memory_peak_rss_gib"] / out["mmap_peak_rss_gib"]
    line = f"peak RSS in-memory / mmap: {out['peak_rss_ratio']:.1f}x"
    if "mmap_peak_anonymous_gib" in out:
        out["peak_anonymous_ratio"] = (out["in-memory_peak_anonymous_gib"]
                                       / out["mmap_peak_anonymous_gib"])
        line += f"; peak anonymous memory in-memory / mmap: {out['peak_anonymous_ratio']:.1f}x"
    out["max_score_diff"] = float(np.abs(results["mmap"]["scores"]
                                         - results["in-memory"]["scores"]).max())
    print(f"{line}; max |score difference| {out['max_score_diff']:.1e}")
    return out


if __name__ == "__main__":
    main()
