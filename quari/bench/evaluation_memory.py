"""Memory and start-up time of a full-gallery evaluation on a large memory-mapped gallery, with
the ids held as memory-mapped fixed-width bytes (``IdColumn``) or as Python lists of ``str``
(what the loader returned before, and still returns for a set without id arrays).

    python -m quari.bench.evaluation_memory [--rows 20000000 --dim 16 --queries 16
                                             --query-batch 8 --k 100 --method quari --dir DIR]

Builds an embedding set of ``--rows`` random rows (fp16, shards of ``--shard-rows``, ILIAS-like
ids) in ``--dir`` (default: a temporary folder, deleted afterwards), queries near some of its
rows and their positives; then runs the whole evaluation path (load the set, its ids, the
queries and positives; ``quari.evaluation.evaluate_search`` with ``--method``: a random QuARI,
searched by the pruned exact top-k, or ``identity``) in a fresh process for each of: the first
shard alone and all rows, each with id arrays ("after") and with text ids only ("before").
Each prints the peak anonymous resident memory (RssAnon sampled every 10 ms: the memory-mapped
gallery's page cache is not counted; VmHWM, which counts it, is printed too), the time to open
the task, the time to the first scored batch of queries, and the total.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from quari.bench.memory import AnonymousPeak, process_status

SCENARIOS = ("after", "before")


def build(directory: Path, rows: int, dim: int, shard_rows: int, queries: int, seed: int = 0
          ) -> None:
    """The gallery set ``directory/gallery`` (random unit rows, ids ``yfcc100m_<n>.tar/<m>``),
    the query set ``directory/queries`` (each near one of 5 positives) and the positives."""
    from quari.store import (EmbeddingSetWriter, l2_normalize, save_embedding_set,
                             save_positives)

    rng = np.random.default_rng(seed)
    positives = rng.choice(min(rows, shard_rows), size=(queries, 5), replace=False)  # in shard 0
    writer = EmbeddingSetWriter(directory / "gallery", dim)
    started = time.perf_counter()
    first = None
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        block = rng.standard_normal((n, dim), dtype=np.float32)
        if start == 0:
            first = block[positives[:, 0]].copy()
        writer.add_shard(l2_normalize(block),
                         [f"yfcc100m_{(start + i) // 10_000:06d}.tar/{(start + i) % 10_000}"
                          for i in range(n)])
        print(f"  built {start + n:,} / {rows:,} rows ({time.perf_counter() - started:.0f} s)",
              flush=True)
    writer.close()
    ids = [f"q{i}" for i in range(queries)]
    save_embedding_set(directory / "queries",
                       l2_normalize(first + 0.3 * rng.standard_normal(first.shape)), ids)
    save_positives(directory / "positives.json",
                   {q: [f"yfcc100m_{r // 10_000:06d}.tar/{r % 10_000}" for r in row]
                    for q, row in zip(ids, positives.tolist())})


def view(directory: Path, out: Path, shards: int | None, text_ids: bool) -> Path:
    """A set of the first ``shards`` shards of ``directory`` (all: None), by symbolic links; with
    ``text_ids`` its manifest lists no id arrays (the format before them)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:shards]
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    out.mkdir(parents=True)
    for shard in manifest["shards"]:
        if text_ids:
            shard.pop("id_array", None)
        for key in ("file", "ids", "id_array"):
            if key in shard:
                (out / shard[key]).symlink_to(directory / shard[key])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def child(args: argparse.Namespace) -> None:
    """One evaluation in this process; prints one JSON line of its measurements."""
    started = time.perf_counter()
    peak = AnonymousPeak()
    peak.start()
    import torch

    from quari.evaluation import RetrievalTask, evaluate_search
    from quari.store import load_embedding_set, load_positives

    torch.set_num_threads(args.threads)
    imported = time.perf_counter()
    gallery = load_embedding_set(args.gallery)
    queries = load_embedding_set(args.queries)
    task = RetrievalTask("i2i", queries, gallery, load_positives(args.positives))
    opened = time.perf_counter()
    if args.method == "quari":
        from quari.model import QuARI, QuARIConfig
        from quari.quari_method import QuARIMethod
        torch.manual_seed(0)
        method = QuARIMethod(device="cpu")
        method.model_ = QuARI(QuARIConfig(embedding_dim=gallery.dim, hidden_dim=32, nhead=2,
                                          num_layers=1, num_steps=1, rank=4, dropout=0.0)).eval()
    else:
        from baselines.identity import Identity
        method = Identity(device="cpu")
    first: list[float] = []
    search = method.search

    def timed_search(*a, **kw):
        out = search(*a, **kw)
        if not first:
            first.append(time.perf_counter())
        return out

    method.search = timed_search
    result = evaluate_search(method, task, "ilias", k=args.k, query_batch=args.query_batch,
                             chunk_rows=args.chunk_rows)
    done = time.perf_counter()
    print(json.dumps({
        "rows": len(gallery), "ids": type(gallery.ids).__name__,
        "peak_anon_mib": peak.stop() / 2 ** 20, "vm_hwm_mib": process_status(["VmHWM"]).get("VmHWM", 0) / 2 ** 20,
        "import_s": imported - started, "open_s": opened - imported,
        "first_batch_s": first[0] - imported, "total_s": done - imported,
        "metric": result["metrics"]}), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000_000, help="gallery rows of the large run")
    p.add_argument("--dim", type=int, default=16, help="embedding dimension E")
    p.add_argument("--shard-rows", type=int, default=1_000_000, help="rows per shard")
    p.add_argument("--queries", type=int, default=16, help="queries")
    p.add_argument("--query-batch", type=int, default=8, help="queries per gallery pass")
    p.add_argument("--k", type=int, default=100, help="mAP@k")
    p.add_argument("--chunk-rows", type=int, default=65536, help="gallery rows per chunk")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                   help="ids as arrays (after) and/or as lists (before)")
    p.add_argument("--method", choices=["quari", "identity"], default="quari")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--dir", default=None, help="folder for the sets (kept); default: temporary")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gallery", help=argparse.SUPPRESS)
    p.add_argument("--queries-set", dest="queries_set", help=argparse.SUPPRESS)
    p.add_argument("--positives", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Build the sets, run the four evaluations in fresh processes, print and return them."""
    args = parse_args(argv)
    if args.child:
        args.queries = args.queries_set
        child(args)
        return []
    tmp = None if args.dir else tempfile.mkdtemp(prefix="quari-evalmem-")
    root = Path(args.dir or tmp)
    results = []
    try:
        if not (root / "gallery" / "manifest.json").exists():
            print(f"building {args.rows:,} x {args.dim} rows in {root}", flush=True)
            build(root, args.rows, args.dim, args.shard_rows, args.queries)
        for shards in (1, None):
            for scenario in args.scenarios:
                name = f"view-{shards or 'all'}-{scenario}"
                if (root / name).exists():
                    shutil.rmtree(root / name)
                gallery = view(root / "gallery", root / name, shards, scenario == "before")
                out = subprocess.run(
                    [sys.executable, "-m", "quari.bench.evaluation_memory", "--child",
                     "--gallery", str(gallery), "--queries-set", str(root / "queries"),
                     "--positives", str(root / "positives.json"), "--k", str(args.k),
                     "--query-batch", str(args.query_batch), "--method", args.method,
                     "--chunk-rows", str(args.chunk_rows),
                     "--threads", str(args.threads)],
                    capture_output=True, text=True, check=True, env={**os.environ})
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["scenario"] = scenario
                results.append(r)
                print(f"{r['rows']:>11,} rows, ids {scenario:6s} ({r['ids']:8s}): peak RssAnon "
                      f"{r['peak_anon_mib']:7.0f} MiB (VmHWM {r['vm_hwm_mib']:6.0f} MiB); task "
                      f"opened in {r['open_s']:6.2f} s, first batch of {args.query_batch} "
                      f"queries scored at {r['first_batch_s']:6.2f} s (imports "
                      f"{r['import_s']:.1f} s), all {args.queries} at {r['total_s']:6.1f} s; "
                      f"{r['metric']}", flush=True)
                shutil.rmtree(root / name)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
