"""The fine-tuned backbone ablation: it learns, it beats the frozen backbone on a separable
problem, and it survives a save/load round trip. (The conformance test covers the interface.)"""

import numpy as np
import pytest
import torch

from quari.methods import get_method
from baselines.finetuned_backbone import FinetunedBackbone, projection_loss
from quari.store import EmbeddingSet, TrainingCollection, l2_normalize
from quari.training import Batch, TrainConfig

DIM, CODE = 16, 4  # identity lives in the first CODE dimensions, nuisance in the rest


def nuisance_world(rng, instances, views=4, prefix="t"):
    """Images = instance code (small) + per-view nuisance (large): cosine is fooled by the
    nuisance, a projection that drops it separates instances perfectly."""
    codes = rng.standard_normal((instances, CODE))
    labels = np.repeat(np.arange(instances), views)
    images = np.concatenate([codes[labels], 2.0 * rng.standard_normal((len(labels), DIM - CODE))],
                            axis=1)
    images = l2_normalize(images)
    captions = l2_normalize(images + 0.05 * rng.standard_normal(images.shape))
    ids = [f"{prefix}{i // views:03d}/v{i % views}" for i in range(len(labels))]
    return TrainingCollection(
        images=EmbeddingSet(images.astype(np.float32), ids), image_labels=labels,
        captions=EmbeddingSet(captions.astype(np.float32), [f"{prefix}c{i}" for i in range(len(ids))]),
        caption_image=np.arange(len(ids)), name="nuisance")


def recall_at_1(method, collection):
    """Each image queries all others; a hit when the top other image shows the same instance."""
    x = torch.from_numpy(np.asarray(collection.images.embeddings))
    with torch.no_grad():
        s = method.score(method.prepare(x), x)
    s.fill_diagonal_(-np.inf)
    top = s.argmax(dim=1).numpy()
    return float(np.mean(collection.image_labels[top] == collection.image_labels))


def fitted(rng, **train):
    config = {"lr_schedule": "released", "lr_max": 3e-2, "max_steps": 150, "batch_size": 32,
              "eval_every": 50, "use_semipositives": False, "group_positives": True,
              "noise_scale": 0.0, **train}
    method = FinetunedBackbone(train=config, image_query_fraction=0.5, device="cpu")
    return method.fit(nuisance_world(rng, 40), nuisance_world(rng, 10, prefix="v"))


def test_registered_under_its_name():
    assert get_method("finetuned_backbone") is FinetunedBackbone


def test_it_learns_and_beats_the_frozen_backbone(rng):
    method = fitted(rng)
    losses = [h["train_loss"] for h in method.history_]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    held_out = nuisance_world(rng, 30, prefix="e")
    frozen = get_method("identity")(device="cpu")
    before, after = recall_at_1(frozen, held_out), recall_at_1(method, held_out)
    assert after > before + 0.5, (before, after)


def test_starts_at_the_identity(rng):
    method = fitted(rng, max_steps=1, lr_max=1e-12, lr_min=1e-13)
    torch.testing.assert_close(method.weight_, torch.eye(DIM), atol=1e-6, rtol=0)


def test_loss_equals_symmetric_infonce_written_out():
    """With distinct targets and no semi-positives the loss is CLIP's symmetric InfoNCE on the
    projected, normalised embeddings; checked against a loop over the equation."""
    gen = torch.Generator().manual_seed(0)
    q, d = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    w = torch.randn(6, 6, generator=gen)
    config = TrainConfig(temperature=0.1)
    got = projection_loss(w, Batch(q, d, torch.arange(5), None, None, None), config)
    qn = [(w @ v) / (w @ v).norm() for v in q]
    dn = [(w @ v) / (w @ v).norm() for v in d]
    s = [[float(qn[i] @ dn[j]) / 0.1 for j in range(5)] for i in range(5)]
    rows = [-s[i][i] + np.log(sum(np.exp(s[i][j]) for j in range(5))) for i in range(5)]
    cols = [-s[j][j] + np.log(sum(np.exp(s[i][j]) for i in range(5))) for j in range(5)]
    assert got.item() == pytest.approx(0.5 * (np.mean(rows) + np.mean(cols)), rel=1e-5)


def test_save_load_round_trip(rng, tmp_path):
    method = fitted(rng, max_steps=20)
    method.save(tmp_path / "m")
    again = FinetunedBackbone.load(tmp_path / "m", device="cpu")
    torch.testing.assert_close(again.weight_, method.weight_)
    assert again.params["train"] == method.params["train"]
    x = torch.randn(4, DIM)
    torch.testing.assert_close(again.score(again.prepare(x), x), method.score(method.prepare(x), x))


def test_unfitted_method_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        FinetunedBackbone(device="cpu").prepare(torch.randn(2, DIM))


def test_bad_training_setting_is_named(rng):
    with pytest.raises(ValueError, match="finetuned_backbone.train"):
        FinetunedBackbone(train={"lr_shedule": "released"}, device="cpu").fit(
            nuisance_world(rng, 5))
