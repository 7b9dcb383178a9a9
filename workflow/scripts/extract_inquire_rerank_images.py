"""INQUIRE-Rerank's embedded candidate images written to files, with the TSVs the VLM re-rankers
of Table 3b read: images (id<TAB>path relative to the TSV) and query texts (id<TAB>text)."""

import json
import logging
import os
from pathlib import Path

from quari.data import inquire
from quari.runlog import log_to
from quari.store import atomic_write_text

log = logging.getLogger("quari.data")


def _tsv(rows, path):
    for key, value in rows:
        if any(c in f"{key}{value}" for c in "\t\r\n"):
            raise ValueError(f"{path}: {key!r} has a tab or newline and cannot be written to a TSV")
    atomic_write_text(path, "".join(f"{k}\t{v}\n" for k, v in rows))


def main(smk):
    parquets = json.loads(Path(smk.input.files).read_text())["parquets"]
    items = inquire.extract_rerank_images(parquets, smk.output.images)
    base = Path(smk.output.images_tsv).parent
    _tsv([(i, os.path.relpath(path, base)) for i, path in items], smk.output.images_tsv)
    queries = inquire.read_rerank(parquets).queries
    _tsv([(q, q) for q in queries], smk.output.query_texts)  # a query's id is its text
    log.info("%d candidate images, %d queries", len(items), len(queries))


with log_to(snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    main(snakemake)  # noqa: F821
