"""Ground truth of a real benchmark in official ids: ILIAS (instance names), INQUIRE Fullrank
(annotations) or INQUIRE-Rerank (relevant candidates, and each query's fixed candidate list)."""

import json
import logging
from pathlib import Path

from quari.data import ilias, inquire
from quari.runlog import log_to
from quari.store import atomic_write_json, save_positives

log = logging.getLogger("quari.data")


def main(smk):
    files = json.loads(Path(smk.input.files).read_text())
    benchmark = smk.params.benchmark
    if benchmark == "ilias":
        queries = [i for i, _ in ilias.image_query_items(files["core"])]
        texts = files["text_queries"]
        queries += [i for i, _ in ilias.text_query_items(texts)]
        positives = [i for i, _ in ilias.positive_items(files["core"])]
        if files.get("image_ids"):
            ids = Path(files["image_ids"])
            official = ilias.read_id_list(ids / "image_query_ids.txt") + \
                ilias.read_id_list(ids / "text_query_ids.txt")
            ilias.check_against_official(queries, official, "ILIAS queries")
            ilias.check_against_official(positives, ilias.read_id_list(ids / "positive_ids.txt"),
                                         "ILIAS positives")
        truth = ilias.ground_truth(queries, positives)
    elif benchmark == "inquire":
        queries = inquire.read_queries(files["queries"])
        truth = inquire.read_annotations(files["annotations"], [q for q, _ in queries])
    else:
        split = inquire.read_rerank(files["parquets"])
        truth = split.relevant
        atomic_write_json(smk.output.candidates, split.candidates)
    log.info("%s: %d queries, %d positives", benchmark, len(truth), sum(map(len, truth.values())))
    save_positives(smk.output.positives, truth)


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
