"""Is a method above another on every benchmark, backbone, task and metric of a run?

The seeds check of the synthetic world (docs/offline_world.md) asks it of QuARI against the
frozen backbone, for runs of the default configuration on several world seeds::

    python -m quari.reporting.compare results/eval results/seeds/seed1/results/eval ...

reads ``{benchmark}/{backbone}/{method}.json`` under each directory (the evaluation results the
workflow writes), prints one line per comparison and exits non-zero when any is not above.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def search_metrics(path: Path) -> dict[tuple[str, str], float]:
    """(task, metric) -> value of an evaluation result's full-gallery search."""
    ev = json.loads(path.read_text())
    return {(task, metric): value
            for task, modes in ev["tasks"].items() if "search" in modes
            for metric, value in modes["search"]["metrics"].items()}


def compare(eval_dir: str | Path, method: str = "quari", reference: str = "identity"
            ) -> list[dict]:
    """One row per (benchmark, backbone, task, metric) where both were evaluated: the two values
    and whether ``method`` is strictly above ``reference``."""
    eval_dir = Path(eval_dir)
    rows = []
    for ref_path in sorted(eval_dir.glob(f"*/*/{reference}.json")):
        path = ref_path.with_name(f"{method}.json")
        if not path.is_file():
            continue
        ours, theirs = search_metrics(path), search_metrics(ref_path)
        for key in sorted(ours.keys() & theirs.keys()):
            rows.append({"run": str(eval_dir), "benchmark": ref_path.parent.parent.name,
                         "backbone": ref_path.parent.name, "task": key[0], "metric": key[1],
                         method: ours[key], reference: theirs[key],
                         "above": ours[key] > theirs[key]})
    if not rows:
        raise FileNotFoundError(f"no {method} and {reference} results side by side under {eval_dir}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", nargs="+", help="results/eval directories of runs")
    p.add_argument("--method", default="quari")
    p.add_argument("--reference", default="identity")
    args = p.parse_args(argv)
    failed = 0
    for eval_dir in args.eval_dirs:
        for r in compare(eval_dir, args.method, args.reference):
            failed += not r["above"]
            print(f"{r['run']:40s} {r['benchmark']:8s} {r['backbone']:10s} {r['task']:4s} "
                  f"{r['metric']:8s} {args.method} {r[args.method]:.4f} {args.reference} "
                  f"{r[args.reference]:.4f} {'above' if r['above'] else 'NOT ABOVE'}")
    print(f"{args.method} above {args.reference}: "
          + ("everywhere" if not failed else f"no, in {failed} comparison(s)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
