"""Items left out on the way (unreadable images, captions of unreadable images), counted.

An embedding set's manifest counts the items it was asked for and the ones it skipped, and its
``skipped.tsv`` lists them with the reason. :func:`set_report` reads both; the evaluation JSON
carries the reports of its gallery and query sets (and of the method's training data), the tables
show them as footnotes, and :func:`check_dropped` stops a run that lost more than a configured
fraction of any set, listing what it lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from quari.embedding_cache import SKIPPED
from quari.store import embedding_set_meta

DROPPED_FILE = "dropped.json"  # a fitted method's training_report, beside its method.json
SHOWN_IDS = 20  # ids listed in a report (all are in the skipped.tsv it names)


class TooManyDroppedError(RuntimeError):
    """More items of a set were left out than the configuration allows."""


def _skipped(directory: Path) -> list[tuple[str, str]]:
    path = directory / SKIPPED
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t", 1)) if "\t" in line else (line, "") for line in lines if line]


def set_report(directory: str | os.PathLike) -> dict:
    """``{"requested", "dropped", "ids", "list"}`` of an embedding set: items asked for, items
    left out, the first ids left out (with their reasons) and the file that lists all of them."""
    directory = Path(directory)
    meta = embedding_set_meta(directory)
    skipped = _skipped(directory)
    dropped = int(meta.get("skipped", len(skipped)))
    requested = int(meta.get("requested", 0)) or None
    return {"requested": requested, "dropped": dropped,
            "ids": [f"{i} ({r})" if r else i for i, r in skipped[:SHOWN_IDS]],
            "list": str(directory / SKIPPED) if dropped else None}


def training_report(collection_meta: dict) -> dict:
    """What a training collection left out (its ``collection.json`` meta): unreadable images
    and the captions (training pairs) that described them."""
    requested = collection_meta.get("images_requested")
    embedded = collection_meta.get("images_embedded")
    images = (requested - embedded) if requested is not None and embedded is not None else 0
    return {"requested": requested, "dropped": int(images),
            "captions_dropped": int(collection_meta.get("captions_of_skipped_images", 0))}


def read_training_report(path: str | os.PathLike) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def check_dropped(reports: dict[str, dict], max_fraction: float) -> None:
    """Raise TooManyDroppedError when any set lost more than ``max_fraction`` of its items,
    naming the set, the counts, the first ids and the file listing them all."""
    bad = []
    for name, report in reports.items():
        if not report or not report.get("requested"):
            continue
        fraction = report["dropped"] / report["requested"]
        if fraction > max_fraction:
            where = f"; all listed in {report['list']}" if report.get("list") else ""
            shown = f": {', '.join(report.get('ids', []))}" if report.get("ids") else ""
            bad.append(f"{name}: {report['dropped']} of {report['requested']} items left out "
                       f"({fraction:.2%}){shown}{where}")
    if bad:
        raise TooManyDroppedError(
            f"more than {max_fraction:.2%} of a set was left out (evaluation.max_dropped_fraction):"
            "\n  " + "\n  ".join(bad) + "\nrepair or remove those files and embed the set again "
            "(delete its folder), or raise evaluation.max_dropped_fraction to accept the loss")


def check_training_collection(directory: str | os.PathLike, collection_meta: dict,
                              max_fraction: float) -> dict:
    """The :func:`training_report` of the training collection in ``directory``; raises
    TooManyDroppedError, before any training, when more than ``max_fraction`` of its images
    could not be embedded (the same limit the evaluation applies to its sets), naming the
    collection's ``images/skipped.tsv``."""
    report = training_report(collection_meta)
    listed = Path(directory) / "images" / SKIPPED
    check_dropped({f"training collection {directory}":
                   {**report, "list": str(listed) if listed.is_file() else None}}, max_fraction)
    return report
