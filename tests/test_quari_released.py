"""The released-checkpoint method: which release fits which backbone, refusal of a mismatch, and
loading a tiny random checkpoint saved in the authors' layout (config.yml + weights.pt), from a
local folder and through a hub download faked offline."""


import pytest
import torch
import torch.nn.functional as F
import yaml

from baselines.quari_released import (ReleasedQuARI, check_fits, download_release, release_for,
                                      released_backbones)
from quari.backbones import get_backbone
from tests.builders import HPARAMS
from tests.builders import save_tiny_release, tiny_backbone

# mvrl/QuARI download_ckpts.py, MODEL_REPO_MAP (lines 4-9): local name -> hub repository; the
# local name is the extractor's hub id without its organisation
AUTHORS_REPOS = {
    "clip-vit-base-patch16": "EricX003/QuARI-clip-vit-base-patch16",
    "clip-vit-large-patch14": "EricX003/QuARI-clip-vit-large-patch14",
    "siglip2-base-patch16-512": "EricX003/QuARI-google-siglip2-base-patch16-512",
    "siglip2-large-patch16-512": "EricX003/QuARI-google-siglip2-large-patch16-512",
}


def test_each_release_fits_the_backbone_of_its_extractor():
    fits = released_backbones()
    assert {b: r.repo_id for b, r in fits.items()} == {
        "clip-vit-b16@224": AUTHORS_REPOS["clip-vit-base-patch16"],
        "clip-vit-l14@224": AUTHORS_REPOS["clip-vit-large-patch14"],
        "siglip2-vit-b16@512": AUTHORS_REPOS["siglip2-base-patch16-512"],
        "siglip2-vit-l16@512": AUTHORS_REPOS["siglip2-large-patch16-512"],
    }
    for backbone, release in fits.items():
        assert get_backbone(backbone).model.split("/")[1] in release.repo_id
    # the CLIP-L release adapts 224 px openai/clip-vit-large-patch14 features, not the 336 model
    with pytest.raises(ValueError, match="clip-vit-l14@224"):
        release_for(get_backbone("clip-vit-l14@336"))
    with pytest.raises(ValueError, match="no released QuARI checkpoint"):
        release_for(get_backbone("siglip-vit-l16@384"))


_tiny = tiny_backbone


def _release(tmp_path, extractor="google/siglip2-base-patch16-512", seed=0):
    return save_tiny_release(tmp_path / "release", extractor, seed)


def test_fit_loads_a_local_checkpoint_and_scores_as_the_authors_module(tmp_path):
    reference, directory = _release(tmp_path)
    info = _tiny()
    method = ReleasedQuARI(checkpoint={info.name: str(directory)}, device="cpu")
    method.fit(None, None, workdir=tmp_path / "work", backbone=info)
    torch.manual_seed(3)
    queries = F.normalize(torch.randn(4, 32), dim=-1)
    gallery = F.normalize(torch.randn(9, 32), dim=-1)
    shortlist = torch.arange(9).repeat(4, 1).numpy()
    got = method.rerank(queries, gallery, shortlist)
    with torch.no_grad():
        expected = reference.project_and_score(queries, gallery.expand(4, 9, 32))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    method.save(tmp_path / "saved")
    again = ReleasedQuARI.load(tmp_path / "saved", device="cpu")
    torch.testing.assert_close(again.rerank(queries, gallery, shortlist), got, rtol=0, atol=0)
    release = yaml.safe_load((tmp_path / "saved" / "release.json").read_text())
    assert release["feature_extractor"] == info.model and release["backbone"] == info.name


def test_a_checkpoint_of_another_extractor_or_width_is_refused(tmp_path):
    _, directory = _release(tmp_path, extractor="openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match=r"trained on features of 'openai/clip-vit-large-patch14'"
                                         r".*fits backbone clip-vit-l14@224"):
        check_fits(directory, _tiny("clip-vit-l14@336"))
    with pytest.raises(ValueError, match="adapts 32-d embeddings"):
        check_fits(directory, _tiny("clip-vit-l14@224", dim=768))
    assert check_fits(directory, _tiny("clip-vit-l14@224"))["hparams"] == HPARAMS
    method = ReleasedQuARI(checkpoint={"clip-vit-l14@336": str(directory)}, device="cpu")
    with pytest.raises(ValueError, match="cannot adapt them"):
        method.fit(backbone=_tiny("clip-vit-l14@336"))


def test_download_is_pinned_to_one_commit(tmp_path, monkeypatch):
    import huggingface_hub
    _, directory = _release(tmp_path, extractor="openai/clip-vit-base-patch16")
    calls = []
    head = "a" * 40

    class FakeApi:
        def model_info(self, repo_id):
            return type("Info", (), {"sha": head})()

    def fake_snapshot(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    release = release_for(get_backbone("clip-vit-b16@224"))
    pinned = "0123456789abcdef0123456789abcdef01234567"
    assert download_release(release, pinned) == (directory, pinned)
    assert download_release(release) == (directory, head)  # current commit, resolved first
    assert calls == [(release.repo_id, pinned, ("config.yml", "weights.pt")),
                     (release.repo_id, head, ("config.yml", "weights.pt"))]
    with pytest.raises(ValueError, match="40-hex commit"):
        download_release(release, "main")
    info = _tiny("clip-vit-b16@224")
    method = ReleasedQuARI(revision={info.name: pinned}, device="cpu").fit(backbone=info,
                                                                          workdir=tmp_path)
    assert method.release_["revision"] == pinned
    assert method.release_["repo_id"] == "EricX003/QuARI-clip-vit-base-patch16"
