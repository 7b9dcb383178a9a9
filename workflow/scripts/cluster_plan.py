"""Jobs, GPU jobs, embedding GPU-hours and embedding disk per table of the paper's configuration.

    python workflow/scripts/cluster_plan.py [--throughput 1000]

Jobs are counted from `snakemake -n` through the SLURM profile, one dry run per table (targets:
that table's evaluations in workflow/config/paper.yaml, from an empty results folder, so shared
stages are counted in every table that needs them). Embedding GPU-hours and disk are derived,
not measured: images per set (the official sizes below) x backbones, at an assumed
`--throughput` images/s per GPU, and fp16 rows of the backbone's width. Not a Snakemake script:
a command-line helper for docs/cluster.md.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# images per embedded set (official sizes: ILIAS 100M distractors in 1,000 shards of 100K, mini-
# ILIAS 5M, iNat24 5M (INQUIRE), COCO train2017 118K + CC12M about 12M captions pairs, UnED 1M)
IMAGES = {"ilias": 100_000_000, "ilias_mini": 5_000_000, "inquire": 5_000_000,
          "captions": 12_118_000, "uned": 1_000_000}
# the paper.yaml `evaluations` blocks of each table (the released checkpoints' rows: blocks 6-8)
TABLES = {"1a": [0, 6], "1b": [1], "2": [2, 7], "3a": [4], "3b": [3, 5, 8], "4": [9]}


def dry_run(targets: list[str]) -> str:
    with tempfile.TemporaryDirectory() as work:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "snakemake"), "-n", "--snakefile",
             str(ROOT / "Snakefile"), "--directory", work, "--profile",
             str(ROOT / "workflow/profiles/slurm"), *targets, "--configfile",
             str(ROOT / "workflow/config/paper.yaml"), "--replace-workflow-config"],
            capture_output=True, text=True, check=True)
    return run.stdout + run.stderr


def jobs_of(listing: str) -> list[tuple[str, str, dict]]:
    """(rule, first output, resources) of every job of a dry run."""
    jobs, rule, output = [], None, None
    for line in listing.splitlines():
        line = line.strip()
        match = re.match(r"^(?:local)?rule (\w+):", line)
        if match:
            rule, output = match.group(1), None
        elif rule and line.startswith("output:"):
            output = line.split(":", 1)[1].split(",")[0].strip()
        elif rule and line.startswith("resources:"):
            res = dict(kv.split("=", 1) for kv in line.split(":", 1)[1].strip().split(", "))
            jobs.append((rule, output, res))
            rule = None
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--throughput", type=float, default=1000.0,
                        help="assumed images/s of one GPU embedding (default 1000)")
    args = parser.parse_args()
    from quari.backbones import get_backbone
    config = yaml.safe_load((ROOT / "workflow/config/paper.yaml").read_text())
    blocks = config["evaluations"]
    assert len(blocks) == 10, "update TABLES to the evaluations blocks of paper.yaml"
    print("| table | jobs | GPU jobs | embedding jobs (parts) | large sets embedded | "
          "embedding GPU-hours | embedding disk |")
    print("|---|---|---|---|---|---|---|")
    for table, indices in TABLES.items():
        targets = sorted({f"results/eval/{b}/{bb}/{m}.json" for i in indices
                          for b in blocks[i]["benchmarks"] for bb in blocks[i]["backbones"]
                          for m in blocks[i]["methods"]})
        jobs = jobs_of(dry_run(targets))
        rules = Counter(rule for rule, _, _ in jobs)
        gpu = sum(res.get("gpu", "0") != "0" for _, _, res in jobs)
        sets = set()
        for rule, out, _ in jobs:
            parts = out.split("/")
            if rule in ("assemble_gallery", "assemble_training_set"):
                sets.add((parts[2], parts[3]))
        hours = sum(IMAGES[d] for d, _ in sets) / args.throughput / 3600
        disk = sum(IMAGES[d] * get_backbone(bb).embed_dim * 2 for d, bb in sets) / 1e12
        print(f"| {table} | {len(jobs)} | {gpu} | "
              f"{rules['embed_gallery_part'] + rules['embed_training_part']} | {len(sets)} | "
              f"{hours:,.0f} | {disk:.2f} TB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
