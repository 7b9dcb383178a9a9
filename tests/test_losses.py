"""The symmetric contrastive loss against a loop written from paper Eq. 9-10 with dense maps."""

import math

import pytest
import torch
import torch.nn.functional as F

from quari.losses import (contrastive_loss_from_logits, directional_losses_from_logits,
                          symmetric_contrastive_loss)
from tests.builders import VARIANTS, random_transform

TAU = 0.07


def dense_score(t, i, d):
    """q'_i . normalize(d W_i) with the E x E matrix W_i = anchor I + scale L_i R_i^T."""
    w = t.anchor * torch.eye(t.dim, dtype=torch.float64) + t.scale * t.left[i] @ t.right[i].T
    m = d.double() @ w
    return float(t.query[i].double() @ m / m.norm())


def logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def reference_loss(t, targets, ids, semis=None, weights=None, semi_ids=None, tau=TAU):
    """Eq. 9-10, one query / one image at a time.

    Pair (i, j) is a candidate unless i != j and d_j is the same image as d_i or one of query
    i's (present) semi-positives. Query -> image: soft targets (1 for the pair, w_ik for the
    semi-positives) normalised to sum 1. Image -> query: the in-batch column, target its query.
    """
    b = len(ids)
    s = [[dense_score(t, i, targets[j]) / tau for j in range(b)] for i in range(b)]

    def allowed(i, j):
        if i == j:
            return True
        if ids[i] == ids[j]:
            return False
        if semi_ids is not None:
            own = {int(semi_ids[i][k]) for k in range(len(semi_ids[i])) if weights[i][k] > 0}
            if int(ids[j]) in own:
                return False
        return True

    q2i = 0.0
    for i in range(b):
        cands = [(s[i][j], 1.0 if i == j else 0.0) for j in range(b) if allowed(i, j)]
        if semis is not None:
            for k in range(semis.shape[1]):
                if weights[i][k] > 0:
                    cands.append((dense_score(t, i, semis[i, k]) / tau, float(weights[i][k])))
        z = logsumexp([c for c, _ in cands])
        total = sum(a for _, a in cands)
        q2i += sum(a * (z - c) for c, a in cands) / total
    i2q = 0.0
    for j in range(b):
        z = logsumexp([s[i][j] for i in range(b) if allowed(i, j)])
        i2q += z - s[j][j]
    return 0.5 * (q2i / b + i2q / b)


def batch(seed=1, b=7, dim=10, n_semi=3):
    g = torch.Generator().manual_seed(seed)
    targets = F.normalize(torch.randn(b, dim, generator=g, dtype=torch.float64), dim=-1)
    ids = torch.tensor([5, 9, 5, 2, 7, 9, 5])[:b]
    targets[2] = targets[0]  # duplicates of image 5 and 9 carry the same embedding
    targets[6] = targets[0]
    targets[5] = targets[1]
    semis = F.normalize(torch.randn(b, n_semi, dim, generator=g, dtype=torch.float64), dim=-1)
    weights = torch.rand(b, n_semi, generator=g, dtype=torch.float64) * 0.5
    weights[1, 2] = 0.0  # absent semi-positives: weight 0, zero embedding
    semis[1, 2] = 0.0
    weights[4] = 0.0
    semis[4] = 0.0
    return targets, ids, semis, weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_with_duplicates(variant):
    t = random_transform(7, 10, 3, variant)
    targets, ids, _, _ = batch()
    got = symmetric_contrastive_loss(t, targets, ids, temperature=TAU)
    assert got.item() == pytest.approx(reference_loss(t, targets, ids), rel=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_with_semipositives(variant):
    t = random_transform(7, 10, 3, variant, seed=2)
    targets, ids, semis, weights = batch(seed=3)
    got = symmetric_contrastive_loss(t, targets, ids, semis, weights, temperature=TAU)
    want = reference_loss(t, targets, ids, semis, weights)
    assert got.item() == pytest.approx(want, rel=1e-9)
    assert got.item() != pytest.approx(reference_loss(t, targets, ids), rel=1e-6)


def test_semipositive_ids_mask_in_batch_copies():
    t = random_transform(7, 10, 3, "released", seed=4)
    targets, ids, semis, weights = batch(seed=5)
    semi_ids = torch.tensor([[2, 100, 101]] * 7)
    semi_ids[3] = torch.tensor([7, 2, 103])  # query 3's own id (2) never appears: mining rule
    semi_ids[3, 1] = 104
    got = symmetric_contrastive_loss(t, targets, ids, semis, weights, temperature=TAU,
                                     semipositive_ids=semi_ids)
    want = reference_loss(t, targets, ids, semis, weights, semi_ids)
    assert got.item() == pytest.approx(want, rel=1e-9)
    plain = symmetric_contrastive_loss(t, targets, ids, semis, weights, temperature=TAU)
    assert got.item() != pytest.approx(plain.item(), rel=1e-6)


def test_without_duplicates_or_semipositives_is_clip_loss():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(9, 9, generator=g, dtype=torch.float64)
    labels = torch.arange(9)
    want = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(contrastive_loss_from_logits(logits, labels), want)


def test_zero_weights_equal_no_semipositives():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 6, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 2, 3, 4])
    semi = torch.randn(6, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        contrastive_loss_from_logits(logits, ids, semi, torch.zeros(6, 2, dtype=torch.float64)),
        contrastive_loss_from_logits(logits, ids))


def test_semipositives_only_enter_query_to_image():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 6, generator=g, dtype=torch.float64)
    ids = torch.arange(6)
    semi = torch.randn(6, 2, generator=g, dtype=torch.float64)
    w = torch.rand(6, 2, generator=g, dtype=torch.float64)
    q2i, i2q = directional_losses_from_logits(logits, ids, semi, w)
    q2i0, i2q0 = directional_losses_from_logits(logits, ids)
    torch.testing.assert_close(i2q, i2q0)
    assert not torch.allclose(q2i, q2i0)


def test_gradients_finite_and_correct():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    semi = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 2, generator=g, dtype=torch.float64)
    w[0, 1] = 0.0
    ids = torch.tensor([1, 1, 2, 3, 1])
    assert torch.autograd.gradcheck(
        lambda a, b: contrastive_loss_from_logits(a, ids, b, w), (logits, semi))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_finite_through_the_transform(variant):
    t = random_transform(7, 10, 3, variant, seed=10, dtype=torch.float32)
    for name in ("query", "left", "right"):
        getattr(t, name).requires_grad_(True)
    targets, ids, semis, weights = batch(seed=11)
    loss = symmetric_contrastive_loss(t, targets.float(), ids, semis.float(), weights.float())
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("query", "left", "right"):
        grad = getattr(t, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_shape_errors():
    logits = torch.zeros(3, 3)
    with pytest.raises(ValueError):
        contrastive_loss_from_logits(logits, torch.arange(4))
    with pytest.raises(ValueError):
        contrastive_loss_from_logits(logits, torch.arange(3), torch.zeros(3, 2))
    with pytest.raises(ValueError):
        contrastive_loss_from_logits(logits, torch.arange(3), torch.zeros(3, 2), torch.zeros(3, 1))


def _group_positive_loop(logits, ids, semi_logits=None, semi_w=None):
    """The group-positive loss written out per row and per column, from its definition."""
    b = logits.shape[0]
    q2i, i2q = [], []
    for i in range(b):
        pos = [j for j in range(b) if ids[j] == ids[i]]
        cands = [logits[i, j] for j in range(b)]
        weights = [1.0 if j in pos else 0.0 for j in range(b)]
        if semi_logits is not None:
            for k in range(semi_logits.shape[1]):
                if semi_w[i, k] > 0:
                    cands.append(semi_logits[i, k])
                    weights.append(float(semi_w[i, k]))
        cands = torch.stack(cands)
        logp = cands - torch.logsumexp(cands, 0)
        w = torch.tensor(weights, dtype=logits.dtype)
        q2i.append(-(w * logp).sum() / w.sum())
    for j in range(b):
        pos = [i for i in range(b) if ids[i] == ids[j]]
        col = logits[:, j]
        logp = col - torch.logsumexp(col, 0)
        i2q.append(-logp[pos].mean())
    return torch.stack(q2i).mean(), torch.stack(i2q).mean()


@pytest.mark.parametrize("with_semis", [False, True])
def test_group_positives_against_loop(with_semis):
    gen = torch.Generator().manual_seed(5)
    b = 9
    logits = torch.randn(b, b, generator=gen, dtype=torch.float64) * 3
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 4, 0, 5])
    semi_logits = semi_w = None
    if with_semis:
        semi_logits = torch.randn(b, 2, generator=gen, dtype=torch.float64)
        semi_w = torch.rand(b, 2, generator=gen, dtype=torch.float64)
        semi_w[1, 0] = 0.0  # an absent semi-positive
    from quari.losses import directional_losses_from_logits
    got = directional_losses_from_logits(logits, ids, semi_logits, semi_w, group_positives=True)
    want = _group_positive_loop(logits, ids.tolist(), semi_logits, semi_w)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    # without repeated ids the option changes nothing
    unique = torch.arange(b)
    a = directional_losses_from_logits(logits, unique, semi_logits, semi_w, group_positives=True)
    c = directional_losses_from_logits(logits, unique, semi_logits, semi_w)
    torch.testing.assert_close(a[0], c[0])
    torch.testing.assert_close(a[1], c[1])
