"""Training loop: learning, validation and early stopping, exact resume, determinism, NaN
detection and the ablation switches, on a tiny model and toy data (CPU)."""

import json
import math

import numpy as np
import pytest
import torch

from quari.losses import symmetric_contrastive_loss
from quari.model import QuARI
from quari.training import (CHECKPOINT_FILE, HISTORY_FILE, NonFiniteError, TrainConfig,
                            TrainingData, add_modality_gap_noise, make_batch, make_scheduler,
                            one_step_config, train, validation_loss)
from tests.builders import TOY_DIM, tiny_model, tiny_train, toy_data, weights_equal


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train several times faster on one thread than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_make_training_data_deduplicates():
    data = toy_data(images=5, captions_per_image=3)
    assert len(data) == 15 and data.images.shape == (5, TOY_DIM)
    np.testing.assert_array_equal(data.targets.numpy(), np.repeat(np.arange(5), 3))
    assert data.semipositives.shape == (15, 2)
    # a query's semi-positives are other images than its target
    assert (data.semipositives != data.targets[:, None]).all()
    with pytest.raises(ValueError):
        TrainingData(queries=torch.zeros(3, TOY_DIM), images=torch.zeros(2, TOY_DIM),
                     targets=torch.tensor([0, 1, 2]))


def test_loss_goes_down_and_best_validation_is_kept():
    train_data, valid_data = toy_data(0), toy_data(1)
    cfg = tiny_train(max_steps=60, eval_every=10, early_stopping_patience=0)
    torch.manual_seed(cfg.seed)
    initial = validation_loss(QuARI(tiny_model()), valid_data, cfg)
    result = train(cfg, tiny_model(), train_data, valid_data, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 60 and result.steps == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    vals = {r["step"]: r["val_loss"] for r in result.history if r["val_loss"] is not None}
    assert sorted(vals) == [10, 20, 30, 40, 50, 60]
    assert result.best_val_loss == min(vals.values()) < 0.8 * initial
    assert vals[result.best_step] == result.best_val_loss
    # the returned model carries the best weights: its validation loss is the best one
    assert validation_loss(result.model, valid_data, cfg) == pytest.approx(result.best_val_loss)


def test_early_stopping_keeps_the_best_weights():
    train_data, valid_data = toy_data(0), toy_data(1)
    # a learning rate this high makes validation worse after the first evaluation
    cfg = tiny_train(max_steps=40, eval_every=2, early_stopping_patience=2, lr_schedule="paper",
                     lr_max=0.5, lr_min=0.5, grad_clip=0.0)
    result = train(cfg, tiny_model(), train_data, valid_data, progress=False)
    vals = [r["val_loss"] for r in result.history if r["val_loss"] is not None]
    assert result.stopped_early and result.steps < 40
    assert len(vals) == result.steps // 2
    assert result.best_val_loss == min(vals)
    # stopped after `patience` evaluations without improvement
    assert vals.index(min(vals)) == len(vals) - 3
    assert validation_loss(result.model, valid_data, cfg) == pytest.approx(result.best_val_loss)


def test_same_seed_same_weights_other_seed_other_weights():
    data = toy_data(0)
    cfg = tiny_train(use_noise=True)
    model = tiny_model(dropout=0.1, token_dropout=0.1)
    a = train(cfg, model, data, progress=False)
    b = train(cfg, model, data, progress=False)
    c = train(tiny_train(use_noise=True, seed=1), model, data, progress=False)
    assert weights_equal(a.model, b.model)
    assert a.history == b.history
    assert not weights_equal(a.model, c.model)


@pytest.mark.parametrize("schedule", ["paper", "released"])
def test_resume_equals_uninterrupted(tmp_path, schedule):
    train_data, valid_data = toy_data(0), toy_data(1)
    cfg = tiny_train(max_steps=7, eval_every=3, checkpoint_every=2, grad_accum=2, batch_size=12,
                     use_noise=True, lr_schedule=schedule, early_stopping_patience=0)
    model = tiny_model(dropout=0.1, token_dropout=0.1)
    full = train(cfg, model, train_data, valid_data, checkpoint_dir=tmp_path / "full",
                 progress=False)

    class Interrupt(Exception):
        pass

    def crash(step, *_):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, model, train_data, valid_data, checkpoint_dir=tmp_path / "cut",
              progress=False, on_step=crash)
    seen = []
    resumed = train(cfg, model, train_data, valid_data, checkpoint_dir=tmp_path / "cut",
                    progress=False, on_step=lambda step, *_: seen.append(step))
    assert seen == [5, 6, 7]  # continued from the step-4 checkpoint
    assert weights_equal(full.model, resumed.model)
    assert full.history == resumed.history
    assert (full.best_step, full.best_val_loss) == (resumed.best_step, resumed.best_val_loss)
    final = [torch.load(tmp_path / d / CHECKPOINT_FILE, weights_only=True)["model"]
             for d in ("full", "cut")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    history = json.loads((tmp_path / "cut" / HISTORY_FILE).read_text())["history"]
    assert [r["step"] for r in history] == list(range(1, 8))
    assert history[2]["val_loss"] is not None and history[0]["val_loss"] is None
    # a finished run resumes to the same result without training
    again = train(cfg, model, train_data, valid_data, checkpoint_dir=tmp_path / "cut",
                  progress=False, on_step=lambda *_: pytest.fail("trained again"))
    assert weights_equal(again.model, full.model)


def test_resume_refuses_other_settings(tmp_path):
    data = toy_data(0)
    train(tiny_train(max_steps=2), tiny_model(), data, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_train(max_steps=2, batch_size=8), tiny_model(), data,
              checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="model config"):
        train(tiny_train(max_steps=2), tiny_model(rank=2), data, checkpoint_dir=tmp_path,
              progress=False)
    # resume=False starts over
    fresh = train(tiny_train(max_steps=2, batch_size=8), tiny_model(), data,
                  checkpoint_dir=tmp_path, resume=False, progress=False)
    assert fresh.steps == 2


def test_nan_in_the_input_names_the_step():
    data = toy_data(0)
    data.queries[3] = float("nan")
    cfg = tiny_train(batch_size=len(data))  # every step sees every row
    with pytest.raises(NonFiniteError, match="loss at step 1$") as err:
        train(cfg, tiny_model(), data, progress=False)
    assert err.value.step == 1


def test_nan_in_the_weights_names_the_step():
    def poison(step, model, _):
        if step == 2:
            with torch.no_grad():
                model.query_encoder[0].weight[0, 0] = float("inf")

    with pytest.raises(NonFiniteError, match="loss at step 3$"):
        train(tiny_train(), tiny_model(), toy_data(0), progress=False, on_step=poison)


def test_nan_in_the_gradients_names_the_step():
    def poison(step, model, _):
        if step == 4:
            model.dec_u_img[0].weight.register_hook(lambda g: g * float("nan"))

    with pytest.raises(NonFiniteError, match="gradient at step 5$"):
        train(tiny_train(), tiny_model(), toy_data(0), progress=False, on_step=poison)


def test_noise_switch():
    data = toy_data(0)
    rows = torch.arange(10)
    g = torch.Generator().manual_seed(0)
    plain = make_batch(data, rows, torch.device("cpu"), True)
    torch.testing.assert_close(plain.queries, data.queries[rows])
    noisy = make_batch(data, rows, torch.device("cpu"), True, 1.0, g)
    assert not torch.allclose(noisy.queries, data.queries[rows])
    # switching noise off is the same run as noise of scale 0, and differs from scale 1
    off = train(tiny_train(use_noise=False), tiny_model(), data, progress=False)
    zero = train(tiny_train(use_noise=True, noise_scale=0.0), tiny_model(), data, progress=False)
    on = train(tiny_train(use_noise=True), tiny_model(), data, progress=False)
    assert weights_equal(off.model, zero.model)
    assert not weights_equal(off.model, on.model)


def test_noise_is_a_per_query_scale_of_gaussian_noise():
    dim = 64
    q = torch.zeros(400, dim)
    out = add_modality_gap_noise(q, 1.0, torch.Generator().manual_seed(0))
    radius = out.norm(dim=1) / math.sqrt(dim)  # ~ s, uniform on [0, 1]
    assert radius.max() < 1.3 and radius.min() < 0.1
    assert 0.4 < radius.mean() < 0.6
    assert abs(out.mean()) < 0.02  # zero-mean Gaussian directions
    torch.testing.assert_close(add_modality_gap_noise(q, 0.0, torch.Generator()), q)


def test_semipositive_switch():
    data = toy_data(0)
    other = TrainingData(queries=data.queries, images=data.images, targets=data.targets,
                         semipositives=data.semipositives.flip(1),
                         semipositive_weights=data.semipositive_weights * 3)
    cfg_off = tiny_train(use_semipositives=False)
    a = train(cfg_off, tiny_model(), data, progress=False)
    b = train(cfg_off, tiny_model(), other, progress=False)
    assert weights_equal(a.model, b.model)
    cfg_on = tiny_train(use_semipositives=True)
    c = train(cfg_on, tiny_model(), data, progress=False)
    d = train(cfg_on, tiny_model(), other, progress=False)
    assert not weights_equal(c.model, d.model)
    assert not weights_equal(a.model, c.model)
    # the batch carries them exactly when switched on, as rows of the image table
    rows = torch.arange(6)
    batch = make_batch(data, rows, torch.device("cpu"), True)
    present = data.semipositives[rows] >= 0
    torch.testing.assert_close(batch.semipositives[present],
                               data.images[data.semipositives[rows][present]])
    assert make_batch(data, rows, torch.device("cpu"), False).semipositives is None


def test_batch_loss_matches_the_loss_module():
    data = toy_data(0)
    cfg = tiny_train()
    torch.manual_seed(0)
    model = QuARI(tiny_model()).eval()
    rows = torch.arange(len(data))
    batch = make_batch(data, rows, torch.device("cpu"), True)
    want = symmetric_contrastive_loss(model.transform(batch.queries), batch.targets,
                                      batch.target_ids, batch.semipositives,
                                      batch.semipositive_weights, 0.07,
                                      semipositive_ids=batch.semipositive_ids)
    assert validation_loss(model, data, TrainConfig(**{**cfg.__dict__, "batch_size": len(data)})
                           ) == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("schedule,first,last", [("paper", 1e-5, 2e-7),
                                                 ("released", 2e-5, 1e-6)])
def test_schedules(schedule, first, last):
    cfg = TrainConfig(lr_schedule=schedule)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=cfg.learning_rates[0])
    sched = make_scheduler(opt, cfg, 1000)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(first, rel=0.05)
    assert lrs[-1] == pytest.approx(last, rel=1e-6)
    peak = max(lrs)
    assert peak == pytest.approx(cfg.learning_rates[0], rel=1e-6)
    if schedule == "released":
        assert lrs.index(peak) == 9  # 1% warm-up
    assert all(a >= b for a, b in zip(lrs[lrs.index(peak):], lrs[lrs.index(peak) + 1:]))


def test_one_step_config():
    cfg = one_step_config(tiny_model())
    assert cfg.num_steps == 1 and cfg.rank == 4


def test_bad_config():
    with pytest.raises(ValueError):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(TypeError):
        TrainConfig(unknown=1)


@pytest.mark.gpu
def test_cuda_mixed_precision_runs():
    for dtype in ("float16", "bfloat16"):
        result = train(tiny_train(device="cuda", amp=True, amp_dtype=dtype, use_noise=True),
                       tiny_model(), toy_data(0), toy_data(1), progress=False)
        assert all(math.isfinite(r["train_loss"]) for r in result.history)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_epoch_order_mixes_cluster_and_uniform_pairs(fraction):
    """Every pair once per epoch; each batch's first round(f * B) pairs share a cluster (up to
    the cluster boundaries of the grouped part), the rest are drawn from every cluster."""
    from quari.training import epoch_order

    size, batch, n_clusters = 960, 32, 4
    clusters = torch.arange(size) % n_clusters  # 240 pairs per cluster
    order = epoch_order(3, 0, size, clusters, batch, fraction)
    assert sorted(order.tolist()) == list(range(size))
    head = max(1, round(fraction * batch))
    batches = order[:(size // batch) * batch].view(-1, batch)
    single = sum(len(set(clusters[b[:head]].tolist())) == 1 for b in batches)
    # at most one batch per cluster boundary of the grouped part straddles two clusters
    assert single >= len(batches) - (n_clusters - 1)
    if fraction < 1:
        tails = clusters[batches[:, head:]]
        assert len(set(tails.flatten().tolist())) == n_clusters
        assert (tails != clusters[batches[:, :1]]).any(dim=1).float().mean() > 0.5
