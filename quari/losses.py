"""The symmetric contrastive loss with semi-positives (paper Eq. 9-10).

Every query i scores every in-batch target d_j, and its own semi-positives s_ik, under its own
map: S_ij = q'_i . normalize(T_i d_j) / tau and P_ik = q'_i . normalize(T_i s_ik) / tau. Target
weights are alpha_ii = 1 for the true pair, alpha_ik = w_ik for semi-positive k of query i and 0
otherwise.

Choices this module makes, where the paper leaves room:

- **Duplicates.** Training rows are (image, caption) pairs, so an image can be the target of
  several queries in one batch. For i != j with the same target id, the pair (i, j) is masked out
  of both softmaxes: d_j is not a negative for query i (it is the same image), and it is not a
  second positive either (that would count the image twice). The mask is symmetric, so each
  query keeps exactly one positive column, its own diagonal entry, and each image column one
  positive query.
- **Semi-positives as in-batch images.** When ``semipositive_ids`` are given, an in-batch target
  that is one of query i's semi-positives is masked out of both softmaxes for (i, j) too; the
  semi-positive's own copy carries its weight, so it is neither a negative nor counted twice.
- **Query -> image** (row i): softmax over the allowed in-batch columns and query i's own
  semi-positives (absent ones, weight 0, excluded); cross-entropy against alpha_i normalised to
  sum to one, i.e. (1, w_i1, .., w_iS) / (1 + sum_k w_ik).
- **Image -> query** (column j of the in-batch matrix): softmax over the allowed queries for
  image d_j; the target is its own query. Semi-positives enter only the query -> image
  direction: a semi-positive s_ik is scored by query i alone, so there is no distribution over
  queries to normalise for it, and restricting alpha to the in-batch block leaves exactly the
  diagonal after masking. (The released code's image -> text term, a mean of positive
  similarities that broadcasts wrongly, is not a contrastive term; it is not reproduced.)
- The loss is the mean of the two directions, each averaged over the batch. Without
  semi-positives and duplicates it is the usual symmetric InfoNCE (CLIP) on S.
"""

from __future__ import annotations

import torch

from quari.scoring import candidate_scores, scores
from quari.transform import QueryTransform


def _pair_mask(target_ids: torch.Tensor, semipositive_ids: torch.Tensor | None,
               semipositive_weights: torch.Tensor | None) -> torch.Tensor:
    """[B, B] bool: True where in-batch target j is a candidate for query i (and vice versa)."""
    ids = target_ids.reshape(-1)
    batch = ids.shape[0]
    eye = torch.eye(batch, dtype=torch.bool, device=ids.device)
    excluded = ids[:, None] == ids[None, :]
    if semipositive_ids is not None:
        valid = semipositive_weights > 0
        hits = (semipositive_ids[:, :, None] == ids[None, None, :]) & valid[:, :, None]
        excluded = excluded | hits.any(dim=1)
    return eye | ~excluded


def directional_losses_from_logits(
        logits: torch.Tensor, target_ids: torch.Tensor,
        semipositive_logits: torch.Tensor | None = None,
        semipositive_weights: torch.Tensor | None = None,
        semipositive_ids: torch.Tensor | None = None,
        group_positives: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(query -> image, image -> query) losses from precomputed, temperature-scaled logits.

    ``logits`` [B, B] is S (row i: query i, column j: in-batch target j, true pair on the
    diagonal); ``target_ids`` [B] identify the targets (equal ids = the same image);
    ``semipositive_logits`` [B, S] are P and ``semipositive_weights`` [B, S] their weights
    (weight 0 marks an absent semi-positive); ``semipositive_ids`` [B, S] optionally identify
    them, in the id space of ``target_ids``. See the module docstring for the choices.

    With ``group_positives``, in-batch targets sharing a target id (e.g. an instance label: the
    same object seen in another image) are positives of each other instead of being masked out:
    every positive gets target weight 1 (alpha normalised to sum to one), in both directions.
    """
    batch = logits.shape[0]
    if logits.shape != (batch, batch) or target_ids.numel() != batch:
        raise ValueError(f"logits must be [B, B] with B target ids, got {tuple(logits.shape)} "
                         f"and {target_ids.numel()} ids")
    if (semipositive_logits is None) != (semipositive_weights is None):
        raise ValueError("semi-positive logits and weights must be given together")
    if semipositive_logits is not None and (
            semipositive_logits.shape != semipositive_weights.shape
            or semipositive_logits.shape[0] != batch):
        raise ValueError(f"semi-positive logits {tuple(semipositive_logits.shape)} and weights "
                         f"{tuple(semipositive_weights.shape)} must both be [B={batch}, S]")
    if semipositive_ids is not None and (semipositive_logits is None
                                         or semipositive_ids.shape != semipositive_logits.shape):
        raise ValueError("semi-positive ids need semi-positive logits of the same shape")
    mask = _pair_mask(target_ids.to(logits.device),
                      None if semipositive_ids is None else semipositive_ids.to(logits.device),
                      semipositive_weights)
    neg_inf = torch.finfo(logits.dtype).min
    if group_positives:
        ids = target_ids.reshape(-1).to(logits.device)
        positive = ids[:, None] == ids[None, :]
        mask = mask | positive
        # the mean logit over each row's (column's) positives replaces the diagonal entry
        pos_count = positive.sum(dim=1).to(logits.dtype)
        diag_rows = (logits * positive).sum(dim=1) / pos_count
        diag_cols = (logits * positive).sum(dim=0) / pos_count
    else:
        pos_count = torch.ones(batch, dtype=logits.dtype, device=logits.device)
        diag_rows = diag_cols = torch.diagonal(logits)
    masked = logits.masked_fill(~mask, neg_inf)

    # image -> query: column j over the allowed queries, target the diagonal
    image_to_query = (torch.logsumexp(masked, dim=0) - diag_cols).mean()

    # query -> image: row i over allowed in-batch columns and its own semi-positives
    if semipositive_logits is None:
        return (torch.logsumexp(masked, dim=1) - diag_rows).mean(), image_to_query
    weights = semipositive_weights.to(logits.dtype)
    present = weights > 0
    semi = semipositive_logits.to(logits.dtype).masked_fill(~present, neg_inf)
    log_norm = torch.logsumexp(torch.cat([masked, semi], dim=1), dim=1, keepdim=True)
    weights = weights.masked_fill(~present, 0.0)
    # cross-entropy against alpha / sum(alpha); absent semi-positives have weight 0 and their
    # log-probability (about -3.4e38 + log_norm) is multiplied by zero, never by inf
    semi_nll = (weights * (log_norm - semi).masked_fill(~present, 0.0)).sum(dim=1)
    total = pos_count + weights.sum(dim=1)
    query_to_image = ((pos_count * (log_norm[:, 0] - diag_rows) + semi_nll) / total).mean()
    return query_to_image, image_to_query


def contrastive_loss_from_logits(logits: torch.Tensor, target_ids: torch.Tensor,
                                 semipositive_logits: torch.Tensor | None = None,
                                 semipositive_weights: torch.Tensor | None = None,
                                 semipositive_ids: torch.Tensor | None = None,
                                 group_positives: bool = False) -> torch.Tensor:
    """The symmetric loss: mean of :func:`directional_losses_from_logits`."""
    q2i, i2q = directional_losses_from_logits(logits, target_ids, semipositive_logits,
                                              semipositive_weights, semipositive_ids,
                                              group_positives)
    return 0.5 * (q2i + i2q)


def symmetric_contrastive_loss(transform: QueryTransform, targets: torch.Tensor,
                               target_ids: torch.Tensor,
                               semipositives: torch.Tensor | None = None,
                               semipositive_weights: torch.Tensor | None = None,
                               temperature: float = 0.07,
                               semipositive_ids: torch.Tensor | None = None,
                               group_positives: bool = False) -> torch.Tensor:
    """Paper Eq. 9-10 for a batch: ``transform`` of B queries, their ``targets`` [B, E].

    ``target_ids`` [B] mark duplicates of the same image; ``semipositives`` [B, S, E] are each
    query's own semi-positive images with ``semipositive_weights`` [B, S] (0 = absent) and
    optional ``semipositive_ids`` [B, S] in the id space of ``target_ids``. Every candidate is
    scored under its query's own map, in float32 (float64 for float64 inputs).
    """
    logits = scores(transform, targets) / temperature
    if semipositives is None:
        return contrastive_loss_from_logits(logits, target_ids, group_positives=group_positives)
    if semipositive_weights is None:
        raise ValueError("semi-positives need their weights")
    semi_logits = candidate_scores(transform, semipositives) / temperature
    return contrastive_loss_from_logits(logits, target_ids, semi_logits, semipositive_weights,
                                        semipositive_ids, group_positives)
