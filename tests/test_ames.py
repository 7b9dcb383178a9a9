"""AMES (baselines/local_features/ames_network.py and ames_reranker.py): parameter names and
shapes of the official modules, loading tiny random networks saved in the official checkpoint layout, the forward pass against a
reference written from the equations, order invariance and padding, the official score
combination, the refusal of pickled objects, downloads, and the `ames` re-ranker through the
method interface on descriptor files in the project's layout."""

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from quari.methods import get_method
from baselines.local_features.ames_network import (AMES, NETWORKS_URL, AMESConfig, AMESDetector,
                                                   combine_scores, load_ames, load_ames_detector,
                                                   read_checkpoint_state)
from baselines.local_features.matching import save_local_descriptors
from tests.builders import LOCAL_DIM, save_official_layout, save_tiny_ames_checkpoint, tiny_ames


# -- the official structure -----------------------------------------------------------------------

def official_keys(local_dim=768, dim=128, layers=5, feedforward=1024, binarized=False):
    """(name, shape) of every entry of the official AMES state dict, written from
    src/models/matcher.py, transformer_dec.py and binarization_layer.py of pavelsuma/ames."""
    keys = [("mtc_token", (dim,))]
    if binarized:  # Sequential(BinarizationLayer (parameter W), Linear, LayerNorm)
        keys += [("remap_local.0.W", (local_dim, dim)), ("remap_local.1.weight", (dim, dim)),
                 ("remap_local.1.bias", (dim,)), ("remap_local.2.weight", (dim,)),
                 ("remap_local.2.bias", (dim,))]
    else:  # Sequential(Linear, LayerNorm)
        keys += [("remap_local.0.weight", (dim, local_dim)), ("remap_local.0.bias", (dim,)),
                 ("remap_local.1.weight", (dim,)), ("remap_local.1.bias", (dim,))]
    for i in range(layers):  # normalize_before False: no decoder.norm
        layer = f"decoder.layers.{i}"
        for attn in ("self_attn", "cross_attn"):  # nn.MultiheadAttention
            keys += [(f"{layer}.{attn}.in_proj_weight", (3 * dim, dim)),
                     (f"{layer}.{attn}.in_proj_bias", (3 * dim,)),
                     (f"{layer}.{attn}.out_proj.weight", (dim, dim)),
                     (f"{layer}.{attn}.out_proj.bias", (dim,))]
        keys += [(f"{layer}.linear1.weight", (feedforward, dim)),
                 (f"{layer}.linear1.bias", (feedforward,)),
                 (f"{layer}.linear2.weight", (dim, feedforward)), (f"{layer}.linear2.bias", (dim,))]
        keys += [(f"{layer}.norm{n}.{p}", (dim,)) for n in (1, 2, 3) for p in ("weight", "bias")]
    return keys + [("classifier.weight", (1, dim)), ("classifier.bias", (1,))]


@pytest.mark.parametrize("binarized", [False, True])
def test_state_dict_names_and_shapes_are_the_official_ones(binarized):
    state = AMES(AMESConfig(binarized=binarized)).state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == official_keys(binarized=binarized)


def test_detector_state_dict_is_the_official_one():
    # extract/spatial_attention_2d.py: conv1 (1x1, D -> D), bn (BatchNorm2d), conv2 (1x1, D -> 1)
    expected = [("conv1.weight", (768, 768, 1, 1)), ("conv1.bias", (768,)), ("bn.weight", (768,)),
                ("bn.bias", (768,)), ("bn.running_mean", (768,)), ("bn.running_var", (768,)),
                ("bn.num_batches_tracked", ()), ("conv2.weight", (1, 768, 1, 1)),
                ("conv2.bias", (1,))]
    assert [(k, tuple(v.shape)) for k, v in AMESDetector(768).state_dict().items()] == expected


# -- the forward pass against the equations -------------------------------------------------------

def _layer_norm(x, state, prefix):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * state[f"{prefix}.weight"].double() \
        + state[f"{prefix}.bias"].double()


def _attention(x, state, prefix, allowed, nhead):
    """Multi-head attention of every token over the tokens ``allowed[i]`` lets it see."""
    n, d = x.shape
    w, b = state[f"{prefix}.in_proj_weight"].double(), state[f"{prefix}.in_proj_bias"].double()
    q, k, v = (x @ w[j * d:(j + 1) * d].T + b[j * d:(j + 1) * d] for j in range(3))
    dh = d // nhead
    heads = []
    for h in range(nhead):
        cols = slice(h * dh, (h + 1) * dh)
        out = torch.zeros(n, dh, dtype=torch.float64)
        for i in range(n):
            keys = [j for j in range(n) if allowed[i][j]]
            logits = torch.stack([q[i, cols] @ k[j, cols] for j in keys]) / math.sqrt(dh)
            weights = torch.softmax(logits, 0)
            out[i] = sum(wt * v[j, cols] for wt, j in zip(weights, keys))
        heads.append(out)
    return torch.cat(heads, 1) @ state[f"{prefix}.out_proj.weight"].double().T \
        + state[f"{prefix}.out_proj.bias"].double()


def reference_logit(model, query, database):
    """AMES's logit of one unpadded pair, from the equations (float64 after the descriptor
    mapping, which runs in float32 as the network's own so that the float16 rounding of the
    database side rounds the same numbers)."""
    state, config = model.state_dict(), model.config
    with torch.no_grad():
        tokens = []
        for side, x in (("query", query), ("database", database)):
            x = torch.nn.functional.normalize(x.float(), dim=-1)
            if config.binarized:
                x = torch.sign(x @ state["remap_local.0.W"])
                x = torch.nn.functional.layer_norm(
                    x @ state["remap_local.1.weight"].T + state["remap_local.1.bias"],
                    (config.model_dim,), state["remap_local.2.weight"], state["remap_local.2.bias"])
            else:
                x = torch.nn.functional.layer_norm(
                    x @ state["remap_local.0.weight"].T + state["remap_local.0.bias"],
                    (config.model_dim,), state["remap_local.1.weight"], state["remap_local.1.bias"])
                if side == "database":
                    x = x.half().float()
            tokens.append(x.double())
    x = torch.cat([state["mtc_token"].double()[None], *tokens])
    image = [0] + [1] * len(query) + [2] * len(database)  # 0: the match token
    n = len(image)
    same = [[image[i] == 0 or image[j] == 0 or image[i] == image[j] for j in range(n)]
            for i in range(n)]
    other = [[image[i] == 0 or image[j] == 0 or image[i] != image[j] for j in range(n)]
             for i in range(n)]
    for layer in range(config.num_layers):
        p = f"decoder.layers.{layer}"
        x = _layer_norm(x + _attention(x, state, f"{p}.self_attn", same, config.nhead), state,
                        f"{p}.norm1")
        x = _layer_norm(x + _attention(x, state, f"{p}.cross_attn", other, config.nhead), state,
                        f"{p}.norm2")
        hidden = torch.relu(x @ state[f"{p}.linear1.weight"].double().T
                            + state[f"{p}.linear1.bias"].double())
        x = _layer_norm(x + hidden @ state[f"{p}.linear2.weight"].double().T
                        + state[f"{p}.linear2.bias"].double(), state, f"{p}.norm3")
    return float(x[0] @ state["classifier.weight"].double()[0] + state["classifier.bias"].double())


def _padded(arrays, width):
    out = torch.randn(len(arrays), width, LOCAL_DIM) * 10  # padding rows hold junk, not zeros
    mask = torch.ones(len(arrays), width, dtype=torch.bool)
    for i, a in enumerate(arrays):
        out[i, :len(a)], mask[i, :len(a)] = a, False
    return out, mask


@pytest.mark.parametrize("binarized", [False, True])
def test_forward_matches_the_equations_with_padding_on_both_sides(binarized):
    model = tiny_ames(binarized)
    gen = torch.Generator().manual_seed(1)
    queries = [torch.randn(n, LOCAL_DIM, generator=gen) for n in (7, 4, 7)]
    databases = [torch.randn(n, LOCAL_DIM, generator=gen) for n in (5, 6, 2)]
    q, q_pad = _padded(queries, 7)
    db, db_pad = _padded(databases, 6)
    with torch.no_grad():
        got = model(q, db, q_pad, db_pad)
    ref = [reference_logit(model, a, b) for a, b in zip(queries, databases)]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    assert np.ptp(ref) > 1e-2  # different pairs really score differently


def test_scores_do_not_depend_on_descriptor_order():
    model = tiny_ames()
    gen = torch.Generator().manual_seed(2)
    query, database = torch.randn(1, 9, LOCAL_DIM, generator=gen), torch.randn(1, 6, LOCAL_DIM,
                                                                                generator=gen)
    with torch.no_grad():
        base = model(query, database)
        shuffled = model(query[:, torch.randperm(9, generator=gen)],
                         database[:, torch.randperm(6, generator=gen)])
        swapped = model(database, query)
    torch.testing.assert_close(shuffled, base, atol=1e-6, rtol=1e-6)
    # both images go through the same layers: only the float16 rounding of the database side
    # (and, in use, the descriptor counts) makes the similarity asymmetric
    assert not torch.equal(swapped, base)
    torch.testing.assert_close(swapped, base, atol=1e-3, rtol=0)


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("binarized", [False, True])
def test_a_checkpoint_in_the_official_layout_loads_and_gives_identical_outputs(tmp_path, binarized):
    model = tiny_ames(binarized)
    path = save_official_layout(model, tmp_path / "ames.pt")
    loaded = load_ames(path)
    assert loaded.config == model.config and not loaded.training
    q, db = torch.randn(3, 5, LOCAL_DIM), torch.randn(3, 4, LOCAL_DIM)
    with torch.no_grad():
        assert torch.equal(loaded(q, db), model(q, db))
    # the variant must be the one asked for
    with pytest.raises(ValueError, match="dist" if binarized else "fp"):
        load_ames(path, binarized=not binarized)
    # a bare state dict (what a user may extract from a checkpoint) loads the same
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with torch.no_grad():
        assert torch.equal(load_ames(tmp_path / "bare.pt")(q, db), model(q, db))


def test_a_state_dict_that_does_not_fit_is_listed(tmp_path):
    state = tiny_ames().state_dict()
    state["decoder.layers.0.linear1.bias"] = torch.zeros(5)
    del state["classifier.bias"]
    torch.save({"state": state}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_ames(tmp_path / "bad.pt")
    assert "bad.pt" in str(err.value) and "classifier.bias" in str(err.value)
    assert "linear1.bias" in str(err.value)


class _Payload:
    """An object whose unpickling would run code (it touches a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    model = tiny_ames()
    marker = tmp_path / "was_unpickled"
    path = save_official_layout(model, tmp_path / "evil.pt", payload=_Payload(str(marker)))
    with pytest.raises(ValueError) as err:
        load_ames(path)
    assert "evil.pt" in str(err.value) and "not allowed" in str(err.value)
    assert not marker.exists()
    path = save_official_layout(model, tmp_path / "args.pt", args=argparse.Namespace(lr=1e-4))
    with pytest.raises(ValueError, match="argparse.Namespace"):
        read_checkpoint_state(path)


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = Path(save_official_layout(tiny_ames(), tmp_path / "cut.pt"))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="cut.pt"):
        load_ames(path)


def test_detector_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    detector = AMESDetector(LOCAL_DIM)
    detector.bn.running_mean.normal_()
    detector.bn.running_var.uniform_(0.5, 2.0)
    torch.save({"state": detector.state_dict()}, tmp_path / "detector.pt")
    loaded = load_ames_detector(tmp_path / "detector.pt")
    tokens = torch.randn(2, 6, LOCAL_DIM)
    desc, saliency = loaded(tokens)
    ref_desc, ref_saliency = detector.eval()(tokens)
    assert torch.equal(desc, ref_desc) and torch.equal(saliency, ref_saliency)
    torch.testing.assert_close(desc.norm(dim=-1), torch.ones(2, 6))
    assert (saliency > 0).all()  # softplus
    with pytest.raises(ValueError, match="not an AMES detector"):
        load_ames_detector(save_tiny_ames_checkpoint(tmp_path / "ames.pt"))


def test_a_url_is_downloaded_once_into_the_cache(tmp_path):
    (tmp_path / "published").mkdir()
    source = Path(save_tiny_ames_checkpoint(tmp_path / "published" / "dinov2_ames.pt"))
    cache = tmp_path / "cache"
    first = load_ames(source.as_uri(), cache_dir=cache, retries=1)
    cached = list(cache.rglob("dinov2_ames.pt"))
    assert len(cached) == 1 and cached[0].read_bytes() == source.read_bytes()
    source.unlink()  # the second load needs only the cache
    again = load_ames(source.as_uri(), cache_dir=cache, retries=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))


def test_a_missing_url_fails_clearly_and_leaves_nothing(tmp_path):
    url = (tmp_path / "nowhere" / "dinov2_ames.pt").as_uri()
    with pytest.raises(RuntimeError) as err:
        load_ames(url, cache_dir=tmp_path / "cache", retries=1)
    assert url in str(err.value) and NETWORKS_URL in str(err.value)
    assert not [p for p in (tmp_path / "cache").rglob("*.pt")]
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        load_ames(tmp_path / "no_such.pt")


# -- the official score ---------------------------------------------------------------------------

def test_combination_is_the_official_formula():
    global_sim = torch.tensor([[0.8, 0.1, -0.2]])
    logits = torch.tensor([[2.0, -3.0, 7.5]])
    got = combine_scores(global_sim, logits, lamb=0.55, temp=0.3)
    ref = [0.55 * g + 0.45 / (1 + math.exp(-0.3 * s)) for g, s in zip([0.8, 0.1, -0.2],
                                                                      [2.0, -3.0, 7.5])]
    np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-6)
    assert torch.equal(combine_scores(global_sim, logits, 1.0, 0.3), global_sim)


# -- the `ames` method ----------------------------------------------------------------------------

@pytest.fixture
def local_world(tmp_path):
    """Descriptor files in the project's layout, a gallery, and a tiny checkpoint."""
    rng = np.random.default_rng(0)
    db_ids = [f"img{i}" for i in range(6)]
    counts = np.array([5, 2, 5, 3, 4, 1])
    db_desc = rng.standard_normal((6, 5, LOCAL_DIM)).astype(np.float32)
    save_local_descriptors(tmp_path / "db.npz", db_ids, db_desc, rng.random((6, 5, 2)), counts)
    q_desc = rng.standard_normal((2, 9, LOCAL_DIM)).astype(np.float32)
    save_local_descriptors(tmp_path / "q.npz", ["q0", "q1"], q_desc, rng.random((2, 9, 2)),
                           np.array([9, 6]))
    gallery_ids = ["img3", "img0", "missing", "img5", "img1", "img2", "img4"]
    gallery = rng.standard_normal((7, 12)).astype(np.float32)
    queries = rng.standard_normal((2, 12)).astype(np.float32)
    return {"checkpoint": save_tiny_ames_checkpoint(tmp_path / "ames.pt"), "gallery": gallery,
            "queries": queries, "db": (db_ids, db_desc, counts), "q": (q_desc, [9, 6]),
            "context": {"local_descriptors": str(tmp_path / "db.npz"),
                        "query_local_descriptors": str(tmp_path / "q.npz"),
                        "gallery_ids": gallery_ids}}


def test_ames_method_reranks_a_shortlist_as_the_official_evaluation(local_world, tmp_path):
    cls = get_method("ames")
    method = cls(checkpoint=local_world["checkpoint"], batch_size=2, device="cpu")
    assert (method.params["lamb"], method.params["temp"]) == (0.55, 0.30)  # tuned DINOv2 fp
    method.fit(None, **local_world["context"])
    shortlist = np.array([[0, 1, 2, 3, 4], [6, 5, 4, 1, 0]])
    queries, gallery = local_world["queries"], local_world["gallery"]
    got = method.rerank(queries, gallery, shortlist, query_ids=["q0", "q1"])
    network = load_ames(local_world["checkpoint"])
    db_ids, db_desc, counts = local_world["db"]
    q_desc, q_counts = local_world["q"]
    ids = local_world["context"]["gallery_ids"]
    for b in range(2):
        for j, row in enumerate(shortlist[b]):
            if ids[row] == "missing":  # no local descriptors: ranked last
                assert got[b, j] == -math.inf
                continue
            i = db_ids.index(ids[row])
            with torch.no_grad():
                logit = float(network(torch.from_numpy(q_desc[b, :q_counts[b]])[None],
                                      torch.from_numpy(db_desc[i, :counts[i]])[None]))
            cosine = float(queries[b] @ gallery[row] / np.linalg.norm(queries[b])
                           / np.linalg.norm(gallery[row]))
            ref = 0.55 * cosine + 0.45 / (1 + math.exp(-0.30 * logit))
            assert got[b, j].item() == pytest.approx(ref, abs=1e-5)
    # saved and loaded through the interface, it scores the same
    method.save(tmp_path / "saved")
    again = cls.load(tmp_path / "saved", device="cpu")
    torch.testing.assert_close(again.rerank(queries, gallery, shortlist, query_ids=["q0", "q1"]),
                               got)
    with pytest.raises(NotImplementedError):
        method.search(queries, gallery, 3, query_ids=["q0", "q1"])
    # another network at the same path is not silently used by the saved method
    save_tiny_ames_checkpoint(local_world["checkpoint"], seed=1)
    with pytest.raises(ValueError, match="sha256"):
        cls.load(tmp_path / "saved", device="cpu")


def test_ames_method_defaults_and_checks(local_world, tmp_path):
    cls = get_method("ames")
    dist = cls(checkpoint=local_world["checkpoint"], binarized=True, device="cpu")
    assert (dist.params["lamb"], dist.params["temp"]) == (0.35, 0.10)  # tuned DINOv2 dist
    with pytest.raises(ValueError, match="fp"):  # an fp checkpoint for the dist variant
        dist.fit(None, **local_world["context"])
    with pytest.raises(ValueError, match="lamb"):
        cls(checkpoint=local_world["checkpoint"], lamb=1.5)
    wide = tmp_path / "wide.npz"
    save_local_descriptors(wide, ["q0", "q1"], np.zeros((2, 3, LOCAL_DIM + 1)), np.zeros((2, 3, 2)))
    context = {**local_world["context"], "query_local_descriptors": str(wide)}
    with pytest.raises(ValueError, match="wide.npz"):
        cls(checkpoint=local_world["checkpoint"], device="cpu").fit(None, **context)


def test_memory_mapped_and_in_memory_descriptors_score_the_same(local_world, monkeypatch):
    """The default memory-mapped files give the scores of files read into memory, and only the
    shortlisted images' rows are read (in batches of batch_size)."""
    import functools

    from baselines.local_features import matching as local_matching

    from tests.builders import reads_only_candidates

    cls = get_method("ames")
    shortlist = np.array([[0, 1, 3], [6, 5, 1]])
    args = (local_world["queries"], local_world["gallery"], shortlist)
    mapped = cls(checkpoint=local_world["checkpoint"], batch_size=2, device="cpu")
    mapped.fit(None, **local_world["context"])
    assert isinstance(mapped.database_.descriptors, np.memmap)
    scores = reads_only_candidates(mapped, lambda: mapped.rerank(*args, query_ids=["q0", "q1"]),
                                   local_world["context"]["gallery_ids"], shortlist)
    monkeypatch.setattr(local_matching, "load_local_descriptors",
                        functools.partial(local_matching.load_local_descriptors, mmap=False))
    in_memory = cls(checkpoint=local_world["checkpoint"], batch_size=2, device="cpu")
    in_memory.fit(None, **local_world["context"])
    assert type(in_memory.database_.descriptors) is np.ndarray
    torch.testing.assert_close(in_memory.rerank(*args, query_ids=["q0", "q1"]), scores,
                               rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_cpu(local_world):
    cls = get_method("ames")
    shortlist = np.array([[0, 1, 3, 4, 5, 6], [6, 5, 4, 3, 1, 0]])
    scores = {}
    for device in ("cpu", "cuda"):
        method = cls(checkpoint=local_world["checkpoint"], device=device)
        method.fit(None, **local_world["context"])
        scores[device] = method.rerank(local_world["queries"], local_world["gallery"], shortlist,
                                       query_ids=["q0", "q1"])
    torch.testing.assert_close(scores["cuda"], scores["cpu"], atol=1e-4, rtol=1e-4)
