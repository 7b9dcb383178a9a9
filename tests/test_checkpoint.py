"""Checkpoints: the released layout against an independent re-implementation of the released
module, refusal of unsafe pickles, and our own save/load round trip."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from quari import checkpoint, scoring
from quari.model import QuARI, QuARIConfig


class ReleasedHypernetwork(nn.Module):
    """The released ``TransformerHypernetwork``, re-written from its description for this test.

    It keeps the released submodule names and forms the dense E x E matrix
    W = I + a (U/||U||_F)(V/||V||_F)^T, applying it to images with ``torch.bmm``.
    """

    def __init__(self, embedding_dim, low_rank_dim, hidden_dim, num_steps, nhead, num_layers,
                 dropout, query_residual_weight, use_fro_norm, anchor_scale):
        super().__init__()
        e, h = embedding_dim, hidden_dim
        self.r, self.h, self.steps = low_rank_dim, hidden_dim, num_steps
        self.w, self.fro, self.a = query_residual_weight, use_fro_norm, anchor_scale

        def head():
            return nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Dropout(dropout), nn.Linear(h, e))

        self.query_encoder = nn.Sequential(nn.Linear(e, h), nn.LayerNorm(h), nn.GELU(),
                                           nn.Dropout(dropout), nn.Linear(h, h), nn.LayerNorm(h))
        self.step_proj = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))
        n = 2 * low_rank_dim + 1
        table = torch.zeros(n, h)
        for p in range(n):
            for i in range(0, h, 2):
                table[p, i] = math.sin(p * math.exp(-i * math.log(10000.0) / h))
                table[p, i + 1] = math.cos(p * math.exp(-i * math.log(10000.0) / h))
        self.register_buffer("pos_emb", table)
        self.register_buffer("pos_scale", torch.tensor([1.0]))
        self.transformer = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(h, nhead, 4 * h, dropout, activation="gelu",
                                       batch_first=True, norm_first=True),
            num_layers, enable_nested_tensor=False)
        self.query_decoder = head()
        self.dec_u_img = head()
        self.dec_v_img = head()

    def step_code(self, t, batch):
        half = self.h // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half).float() / half)
        angles = torch.full((batch, 1), float(t)) * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward(self, query):
        b = query.shape[0]
        ctx = self.query_encoder(query)
        u = torch.zeros(b, self.r, self.h)
        v = torch.zeros(b, self.r, self.h)
        for t in range(self.steps):
            cond = ctx + self.step_proj(self.step_code(t, b))
            codes = self.pos_scale * self.pos_emb[:self.r]
            out = self.transformer(torch.cat([cond[:, None], u + codes, v + codes], dim=1))
            ctx = ctx + out[:, 0]
            u = u + out[:, 1:1 + self.r]
            v = v + out[:, 1 + self.r:]
        q = F.normalize((1 - self.w) * self.query_decoder(ctx) + self.w * query, dim=-1)
        big_u = self.dec_u_img(u).transpose(1, 2)
        big_v = self.dec_v_img(v).transpose(1, 2)
        if self.fro:
            big_u = big_u / (big_u.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-8)
            big_v = big_v / (big_v.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-8)
        eye = torch.eye(big_u.shape[1]).expand(b, -1, -1)
        return {"refined_query": q, "W_image": eye + self.a * torch.bmm(big_u, big_v.transpose(1, 2))}

    def project_and_score(self, query, images):
        out = self(query)
        q, w = out["refined_query"], out["W_image"]
        if images.dim() == 2:
            mapped = F.normalize(torch.bmm(images[:, None], w)[:, 0], dim=-1)
            return F.cosine_similarity(q, mapped, dim=-1)
        mapped = F.normalize(torch.bmm(images, w), dim=-1)
        return torch.einsum("be,bme->bm", q, mapped)


HPARAMS = dict(embedding_dim=32, low_rank_dim=8, hidden_dim=64, num_steps=2, nhead=4,
               num_layers=2, dropout=0.1, query_residual_weight=0.5, use_fro_norm=True,
               anchor_scale=0.8)


def write_released(directory, reference, hparams=HPARAMS, state=None):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "config.yml", "w") as f:
        yaml.safe_dump({"hparams": hparams, "backbone": "test"}, f)
    torch.save(reference.state_dict() if state is None else state, directory / "weights.pt")
    return directory


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
