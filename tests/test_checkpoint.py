"""Checkpoints: the released layout against an independent re-implementation of the released
module, refusal of unsafe pickles, and our own save/load round trip."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quari import checkpoint, scoring
from quari.model import QuARI, QuARIConfig
from tests.builders import HPARAMS, ReleasedHypernetwork, write_released


@pytest.fixture
def released(tmp_path):
    torch.manual_seed(0)
    reference = ReleasedHypernetwork(**HPARAMS).eval()
    # random non-trivial values everywhere, so every parameter matters
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reference, write_released(tmp_path / "released", reference)


def test_load_released_matches_reference(released):
    reference, directory = released
    model = checkpoint.load_released(directory)
    assert not model.training
    assert model.config == QuARIConfig(embedding_dim=32, rank=8, hidden_dim=64, num_steps=2,
                                       nhead=4, num_layers=2, variant="released")
    torch.manual_seed(1)
    queries = F.normalize(torch.randn(5, 32), dim=-1)
    pairs = F.normalize(torch.randn(5, 32), dim=-1)
    sets = F.normalize(torch.randn(5, 7, 32), dim=-1)
    with torch.no_grad():
        t = model(queries)
        got_pairs = scoring.candidate_scores(t, pairs[:, None])[:, 0]
        got_sets = scoring.candidate_scores(t, sets)
        ref_pairs = reference.project_and_score(queries, pairs)
        ref_sets = reference.project_and_score(queries, sets)
        ref_out = reference(queries)
    torch.testing.assert_close(got_pairs, ref_pairs, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_sets, ref_sets, rtol=0, atol=1e-5)
    torch.testing.assert_close(t.query, ref_out["refined_query"], rtol=0, atol=1e-5)
    assert not torch.allclose(ref_sets, ref_sets[:, :1])  # the scores are not degenerate


def test_load_released_without_fro_norm(tmp_path):
    hparams = {**HPARAMS, "use_fro_norm": False, "anchor_scale": 0.3}
    torch.manual_seed(2)
    reference = ReleasedHypernetwork(**hparams).eval()
    model = checkpoint.load_released(write_released(tmp_path, reference, hparams))
    assert not model.config.fro_norm and model.config.anchor_scale == 0.3
    queries, sets = torch.randn(3, 32), torch.randn(3, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(scoring.candidate_scores(model(queries), sets),
                                   reference.project_and_score(queries, sets), rtol=0, atol=1e-5)


class Payload:
    """A custom class: unpickling it would run arbitrary code paths."""


@pytest.mark.parametrize("bad", [
    {"query_encoder.0.weight": Payload()},
    [torch.zeros(2)],
    {"query_encoder.0.weight": torch.zeros(2), "note": "text"},
    {"nested": {"a": torch.zeros(2)}},
])
def test_load_released_refuses_non_tensor_payloads(tmp_path, bad):
    reference = ReleasedHypernetwork(**HPARAMS)
    directory = write_released(tmp_path, reference, state=bad)
    with pytest.raises(ValueError, match="weights.pt"):
        checkpoint.load_released(directory)


def test_load_released_lists_key_mismatches(released, tmp_path):
    reference, _ = released
    state = dict(reference.state_dict())
    state.pop("dec_v_img.3.bias")
    state["extra.weight"] = torch.zeros(1)
    directory = write_released(tmp_path / "broken", reference, state=state)
    with pytest.raises(ValueError, match=r"dec_v_img\.3\.bias.*extra\.weight"):
        checkpoint.load_released(directory)
    with pytest.raises(ValueError, match="shape"):
        checkpoint.load_released(write_released(tmp_path / "wide", reference,
                                                {**HPARAMS, "hidden_dim": 32}))


def test_released_config_rejects_unknown_hparams():
    with pytest.raises(ValueError, match="low_rank"):
        checkpoint.released_config({**HPARAMS, "low_rank": 4})
    with pytest.raises(ValueError, match="nhead"):
        checkpoint.released_config({**HPARAMS, "nhead": 5})


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_save_load_pretrained_round_trip(tmp_path, variant):
    torch.manual_seed(3)
    model = QuARI(QuARIConfig(embedding_dim=16, hidden_dim=32, nhead=4, num_layers=1,
                              num_steps=2, rank=3, variant=variant, anchor_scale=0.6)).eval()
    checkpoint.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json",
                                                                     "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["format_version"] == 1
    loaded = checkpoint.load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    queries = torch.randn(4, 16)
    with torch.no_grad():
        a, b = model(queries), loaded(queries)
    for name in ("query", "left", "right"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert (a.scale, a.anchor) == (b.scale, b.anchor)


def test_from_hub_local_directories(released, tmp_path):
    reference, directory = released
    model = checkpoint.from_hub(str(directory))  # released layout
    ours = checkpoint.save_pretrained(model, tmp_path / "ours")
    again = checkpoint.from_hub(ours)
    queries = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(model(queries).left, again(queries).left)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        checkpoint.from_hub(tmp_path / "empty")


def test_load_pretrained_rejects_unknown_version(tmp_path):
    model = QuARI(QuARIConfig(embedding_dim=8, hidden_dim=16, nhead=2, num_layers=1, rank=2))
    checkpoint.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        checkpoint.load_pretrained(tmp_path)


def test_hub_round_trip_without_network(monkeypatch, tmp_path, released):
    """push_to_hub uploads our layout; from_hub loads what snapshot_download returns."""
    import huggingface_hub

    hub = tmp_path / "hub"

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            (hub / repo_id).mkdir(parents=True, exist_ok=exist_ok)

        def upload_folder(self, folder_path, repo_id, commit_message=None):
            for f in Path(folder_path).iterdir():
                shutil.copy(f, hub / repo_id / f.name)

    def fake_snapshot(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = checkpoint.load_released(released[1])
    url = checkpoint.push_to_hub(model, "me/quari-test", token="t")
    assert url.endswith("me/quari-test")
    assert sorted(p.name for p in (hub / "me/quari-test").iterdir()) == ["config.json",
                                                                         "model.safetensors"]
    loaded = checkpoint.from_hub("me/quari-test")
    # a hub repo in the released layout goes through load_released
    shutil.copytree(released[1], hub / "authors" / "released")
    original = checkpoint.from_hub("authors/released")
    queries = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(queries).left, model(queries).left)
        assert torch.equal(original(queries).left, model(queries).left)
