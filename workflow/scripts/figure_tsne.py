"""Figure 3: one ILIAS image query and one INQUIRE text query, backbone space beside QuARI space."""

import logging
from pathlib import Path

import numpy as np
import torch

from quari.reporting.figures import TsnePanel, map_rows, plot_tsne
from quari.quari_method import QuARIMethod
from quari.runlog import log_to
from quari.store import load_embedding_set, load_positives

log = logging.getLogger("quari.reporting.figures")


def pick_query(queries, positives, rng, min_positives=3):
    """A random query (seeded) among those with at least ``min_positives`` positives."""
    eligible = [i for i, q in enumerate(queries.ids) if len(positives[q]) >= min_positives]
    if not eligible:
        eligible = [i for i, q in enumerate(queries.ids) if positives[q]]
    return int(rng.choice(eligible))


def panel(title, method, queries, gallery, positives, distractors, rng):
    i = pick_query(queries, positives, rng)
    qid = queries.ids[i]
    wanted = positives[qid]  # one scan, no id -> row table (a 100M-row gallery has 100M ids)
    pos_rows = [r for r, g in enumerate(gallery.ids) if g in wanted]
    query = np.asarray(queries.embeddings[i], dtype=np.float32)
    pos = np.asarray(gallery.embeddings[pos_rows], dtype=np.float32)
    backbone = np.vstack([query[None], pos, distractors])
    with torch.no_grad():
        t = method.transform(torch.from_numpy(query[None]).to(method.device), [qid])
    q_adapted, rows_adapted = map_rows(t.query[0].cpu().numpy(), t.left[0].cpu().numpy(),
                                       t.right[0].cpu().numpy(), t.scale, t.anchor,
                                       np.vstack([pos, distractors]))
    log.info("%s: query %s with %d positives", title, qid, len(pos_rows))
    return TsnePanel(f"{title} ({qid})", backbone, np.vstack([q_adapted[None], rows_adapted]),
                     len(pos_rows))


def distractor_rows(gallery, exclude, n, rng):
    """n random gallery rows that are nobody's positive, drawn without scanning the gallery."""
    order = rng.permutation(len(gallery)) if len(gallery) <= 4 * n else None
    take, tried = {}, 0  # insertion-ordered set of rows
    while len(take) < n and tried < len(gallery):
        batch = (order[tried:tried + 2 * n] if order is not None
                 else rng.choice(len(gallery), size=2 * n, replace=False))
        tried += len(batch)
        take.update((int(r), None) for r in batch if gallery.ids[r] not in exclude)
    take = np.sort(np.array(list(take)[:n], dtype=np.int64))
    return np.asarray(gallery.embeddings[take], dtype=np.float32)


def main(smk):
    p = smk.params.tsne
    rng = np.random.default_rng(p["seed"])
    method = QuARIMethod.load(Path(smk.input.model).parent, device="cpu")
    ilias, inquire = load_embedding_set(smk.input.ilias), load_embedding_set(smk.input.inquire)
    ilias_pos, inquire_pos = load_positives(smk.input.ilias_positives), load_positives(smk.input.inquire_positives)
    all_pos = set().union(*ilias_pos.values(), *inquire_pos.values())
    half = p["distractors"] // 2
    distractors = np.vstack([distractor_rows(ilias, all_pos, half, rng),
                             distractor_rows(inquire, all_pos, p["distractors"] - half, rng)])
    panels = [
        panel("ILIAS image query", method, load_embedding_set(smk.input.ilias_queries), ilias,
              ilias_pos, distractors, rng),
        panel("INQUIRE text query", method, load_embedding_set(smk.input.inquire_queries), inquire,
              inquire_pos, distractors, rng),
    ]
    kind = "synthetic world (embedded offline benchmark)" if smk.params.data == "synthetic" else "real data"
    caption = (f"t-SNE of {len(distractors)} shared distractors ({half} per dataset), the query's "
               f"positives and the query; {kind}; backbone {smk.params.backbone}.")
    fig = plot_tsne(panels, p["seed"], caption)
    for out in (smk.output.png, smk.output.pdf):
        fig.savefig(out, dpi=150)


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
