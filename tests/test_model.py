"""The hypernetwork against a from-the-equations forward pass and its stated properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from quari import scoring
from quari.model import QuARI, QuARIConfig

SMALL = dict(embedding_dim=24, hidden_dim=32, nhead=4, num_layers=2, num_steps=3, rank=5)


def small_model(variant="released", seed=0, **overrides):
    torch.manual_seed(seed)
    return QuARI(QuARIConfig(**{**SMALL, "variant": variant, **overrides}))


def manual_layer(layer, x):
    """A pre-norm transformer encoder layer (GELU, eval mode) written out from its weights."""
    h = x.shape[-1]
    heads = layer.self_attn.num_heads
    y = F.layer_norm(x, (h,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    q, k, v = (y @ layer.self_attn.in_proj_weight.T + layer.self_attn.in_proj_bias).chunk(3, -1)
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, h // heads).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // heads), dim=-1) @ v
    att = att.transpose(1, 2).reshape(x.shape)
    x = x + att @ layer.self_attn.out_proj.weight.T + layer.self_attn.out_proj.bias
    y = F.layer_norm(x, (h,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    y = F.gelu(y @ layer.linear1.weight.T + layer.linear1.bias)
    return x + y @ layer.linear2.weight.T + layer.linear2.bias


def mlp(seq, x):
    """Apply the Linear/LayerNorm/GELU modules of an nn.Sequential (dropout is off in eval)."""
    for m in seq:
        if isinstance(m, torch.nn.Linear):
            x = x @ m.weight.T + m.bias
        elif isinstance(m, torch.nn.LayerNorm):
            x = F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        elif isinstance(m, torch.nn.GELU):
            x = F.gelu(x)
    return x


def manual_dense_scores(model, queries, gallery):
    """Scores [B, N] from the method's equations, forming each query's E x E matrix."""
    cfg = model.config
    b, r, h = queries.shape[0], cfg.rank, cfg.hidden_dim
    pos = torch.zeros(2 * r + 1, h, dtype=queries.dtype)
    for p in range(2 * r + 1):
        for i in range(0, h, 2):
            angle = p / 10000 ** (i / h)
            pos[p, i], pos[p, i + 1] = math.sin(angle), math.cos(angle)
    codes = torch.cat([pos[:r], pos[:r]]) if cfg.variant == "released" else pos[1:]
    ctx = mlp(model.query_encoder, queries)
    tokens = torch.zeros(b, 2 * r, h, dtype=queries.dtype)
    half = h // 2
    for t in range(cfg.num_steps):
        freqs = torch.tensor([10000 ** (-i / half) for i in range(half)], dtype=queries.dtype)
        step = mlp(model.step_proj, torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)]))
        x = torch.cat([(ctx + step)[:, None], tokens + codes], dim=1)
        for layer in model.transformer.layers:
            x = manual_layer(layer, x)
        ctx, tokens = ctx + x[:, 0], tokens + x[:, 1:]
    u = mlp(model.dec_u_img, tokens[:, :r])  # [B, r, E]: row j is u_j
    v = mlp(model.dec_v_img, tokens[:, r:])
    u = u / u.flatten(1).norm(dim=1)[:, None, None]
    v = v / v.flatten(1).norm(dim=1)[:, None, None]
    out = torch.empty(b, gallery.shape[0], dtype=queries.dtype)
    for i in range(b):
        if cfg.variant == "released":
            w = cfg.query_residual_weight
            q = (1 - w) * mlp(model.query_decoder, ctx[i]) + w * queries[i]
            mat = torch.eye(cfg.embedding_dim, dtype=queries.dtype) + cfg.anchor_scale * u[i].T @ v[i]
            mapped = gallery @ mat  # row-vector convention: d W
        else:
            q = mlp(model.query_decoder, ctx[i])
            t_mat = sum(torch.outer(u[i, j], v[i, j]) for j in range(r))
            mapped = gallery @ t_mat.T  # (T d)^T for every row d
        out[i] = (mapped / mapped.norm(dim=1, keepdim=True)) @ (q / q.norm())
    return out


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_transform_shapes_and_unit_query(variant):
    model = small_model(variant).eval()
    t = model(torch.randn(6, 24))
    assert t.query.shape == (6, 24)
    assert t.left.shape == t.right.shape == (6, 24, 5)
    torch.testing.assert_close(t.query.norm(dim=-1), torch.ones(6))
    if variant == "released":
        assert (t.anchor, t.scale) == (1.0, 0.8)
    else:
        assert (t.anchor, t.scale) == (0.0, 1.0)
    assert torch.equal(model.transform(torch.ones(1, 24)).query, model(torch.ones(1, 24)).query)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_matches_equations(variant):
    model = small_model(variant).double().eval()
    queries = torch.randn(4, 24, dtype=torch.float64)
    gallery = torch.randn(9, 24, dtype=torch.float64)
    with torch.no_grad():
        got = scoring.scores(model(queries), gallery)
        ref = manual_dense_scores(model, queries, gallery)
    # position and step codes are float32 buffers/computations, as in the released code
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fro_norm", [True, False])
@pytest.mark.parametrize("variant", ["released", "paper"])
def test_maps_in_the_decoders_bases_score_as_the_equations(variant, fro_norm):
    """Training's form (factors as coefficients of the decoders' last layers) against the dense
    reference, for whole galleries, per-query candidates and gradients."""
    model = small_model(variant, fro_norm=fro_norm).double().eval()
    queries = torch.randn(4, 24, dtype=torch.float64)
    gallery = torch.randn(9, 24, dtype=torch.float64)
    candidates = torch.randn(4, 3, 24, dtype=torch.float64)
    in_basis = model(queries, in_basis=True)
    assert in_basis.left_basis.shape == (24, SMALL["hidden_dim"] + 1)
    got = scoring.scores(in_basis, gallery)
    if fro_norm:  # the reference normalises U and V
        with torch.no_grad():
            torch.testing.assert_close(got, manual_dense_scores(model, queries, gallery),
                                       rtol=1e-6, atol=1e-6)
    dense = model(queries)
    torch.testing.assert_close(got, scoring.scores(dense, gallery), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scoring.candidate_scores(in_basis, candidates),
                               scoring.dense_scores(dense, candidates), rtol=1e-10, atol=1e-10)
    expanded = in_basis.expand()
    torch.testing.assert_close(expanded.left, dense.left, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expanded.right, dense.right, rtol=1e-12, atol=1e-12)
    weights = torch.randn(4, 9, dtype=torch.float64)
    grads = [torch.autograd.grad((scoring.scores(t, gallery) * weights).sum(),
                                 list(model.parameters()), allow_unused=True)
             for t in (model(queries, in_basis=True), model(queries))]
    for a, b in zip(*grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_tokens_start_at_zero_with_position_codes(variant):
    model = small_model(variant).eval()
    seen = []
    model.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    model(torch.randn(3, 24))
    assert len(seen) == model.config.num_steps
    r = model.config.rank
    first = seen[0][:, 1:]  # the U and V tokens entering step 0
    pe = model.pos_emb
    if variant == "released":
        expected = torch.cat([pe[:r], pe[:r]])  # zero tokens plus shared codes
    else:
        expected = pe[1:2 * r + 1]  # zero tokens plus distinct codes
        assert torch.unique(expected, dim=0).shape[0] == 2 * r
    torch.testing.assert_close(first, expected.expand_as(first), rtol=0, atol=0)
    assert not torch.allclose(seen[1][:, 1:], first)  # later steps see refined tokens


def test_position_buffer_is_sinusoidal():
    model = small_model()
    h = model.config.hidden_dim
    assert model.pos_emb.shape == (2 * model.config.rank + 1, h)
    assert model.pos_emb[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / h)))
    assert model.pos_emb[3, 5].item() == pytest.approx(math.cos(3 / 10000 ** (4 / h)))


def test_eval_is_deterministic_and_training_is_seeded():
    model = small_model()
    q = torch.randn(5, 24)
    model.eval()
    a, b = model(q), model(q)
    assert torch.equal(a.query, b.query) and torch.equal(a.left, b.left)
    model.train()
    torch.manual_seed(7)
    c = model(q)
    torch.manual_seed(7)
    d = model(q)
    torch.manual_seed(8)
    e = model(q)
    assert torch.equal(c.left, d.left) and torch.equal(c.query, d.query)
    assert not torch.equal(c.left, e.left)
    assert not torch.allclose(c.left, a.left)


def test_token_dropout_zeroes_tokens_in_training_only():
    model = small_model(dropout=0.0, token_dropout=0.5, rank=40)
    seen = []
    model.dec_u_img.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    q = torch.randn(20, 24)
    model.train()
    model(q)
    zero_rows = (seen[-1].abs().sum(-1) == 0).float().mean().item()
    assert 0.35 < zero_rows < 0.65  # last step's mask, p = 0.5
    model.eval()
    model(q)
    assert (seen[-1].abs().sum(-1) > 0).all()
    # without any dropout, training and evaluation agree
    quiet = small_model(dropout=0.0, token_dropout=0.0)
    quiet.train()
    out_train = quiet(q)
    quiet.eval()
    torch.testing.assert_close(out_train.left, quiet(q).left)


def test_gradients_reach_every_parameter():
    model = small_model().train()
    t = model(torch.randn(4, 24))
    scoring.candidate_scores(t, torch.randn(4, 3, 24)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_clip_large_parameter_count():
    cfg = QuARIConfig(embedding_dim=768, hidden_dim=512, nhead=8, num_layers=6, rank=64)
    model = QuARI(cfg)
    e, h = 768, 512
    linear = lambda i, o: i * o + o
    layer = linear(h, 3 * h) + linear(h, h) + linear(h, 4 * h) + linear(4 * h, h) + 4 * h
    expected = (linear(e, h) + linear(h, h) + 4 * h  # query encoder with two LayerNorms
                + 2 * linear(h, h)  # step projection
                + 6 * layer
                + 3 * (linear(h, h) + linear(h, e)))  # query, U and V decoders
    assert model.num_parameters() == expected
    assert 21.5e6 < expected < 22.5e6  # "about 22 M" (METHOD.md)


@pytest.mark.parametrize("field,value", [
    ("embedding_dim", 0), ("hidden_dim", 30), ("hidden_dim", 33), ("nhead", 0),
    ("num_layers", 0), ("num_steps", -1), ("rank", 2.5), ("dropout", 1.0),
    ("token_dropout", -0.1), ("variant", "other"), ("anchor_scale", float("nan")),
    ("query_residual_weight", 1.5), ("fro_norm", "yes"), ("decoder_hidden_dim", 0),
])
def test_config_validation_names_the_field(field, value):
    kwargs = {**SMALL, "nhead": 4, field: value}
    with pytest.raises(ValueError, match=field):
        QuARIConfig(**kwargs)


def test_rejects_wrong_query_width():
    with pytest.raises(ValueError, match="queries"):
        small_model()(torch.randn(2, 23))


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_decoder_width_bounds_the_span_of_decoded_vectors(variant):
    """Every decoded U column lies in bias + the span of the last decoder layer: at most
    decoder width directions of R^E whatever the query. A narrow decoder confines U to a fixed
    subspace; a wider one (``decoder_hidden_dim``) lifts the limit."""
    def span_rank(model):
        with torch.no_grad():
            t = model(F.normalize(torch.randn(64, 24), dim=-1))
            left = t.right if variant == "paper" else t.left  # the U factor of either variant
            cols = left.transpose(1, 2).reshape(-1, 24) - model.dec_u_img[-1].bias
        return torch.linalg.matrix_rank(cols.double(), rtol=1e-6).item()

    narrow = small_model(variant, hidden_dim=8, nhead=4, fro_norm=False)
    assert narrow.dec_u_img[0].out_features == 8
    assert span_rank(narrow) <= 8
    wide = small_model(variant, hidden_dim=8, nhead=4, fro_norm=False, decoder_hidden_dim=48)
    assert [wide.dec_u_img[0].out_features, wide.dec_u_img[-1].in_features] == [48, 48]
    assert wide.query_decoder[0].out_features == wide.dec_v_img[0].out_features == 48
    assert span_rank(wide) > 8


def test_decoder_width_round_trips_through_our_checkpoints(tmp_path):
    from quari.checkpoint import load_pretrained, save_pretrained
    model = small_model(decoder_hidden_dim=40).eval()
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m").eval()
    assert loaded.config.decoder_hidden_dim == 40
    q = F.normalize(torch.randn(3, 24), dim=-1)
    assert torch.allclose(model(q).query, loaded(q).query)


def test_maps_in_bases_refuse_mismatched_shapes():
    from quari.transform import BasisQueryTransform
    q, basis, coef = torch.randn(3, 8), torch.randn(8, 5), torch.randn(3, 5, 2)
    ok = BasisQueryTransform(q, basis, coef, basis, coef, 0.8, 1.0)
    assert (ok.batch_size, ok.dim, ok.rank) == (3, 8, 2)
    assert ok.to(dtype=torch.float64).left_coef.dtype == torch.float64
    for bad in (dict(left_basis=torch.randn(7, 5)), dict(left_coef=torch.randn(3, 4, 2)),
                dict(right_coef=torch.randn(3, 5, 3)), dict(query=torch.randn(3))):
        args = dict(query=q, left_basis=basis, left_coef=coef, right_basis=basis,
                    right_coef=coef, scale=0.8, anchor=1.0)
        with pytest.raises(ValueError):
            BasisQueryTransform(**{**args, **bad})


def test_maps_in_bases_keep_their_norms_in_float32_under_mixed_precision():
    """||U||_F^2 above float16's largest value (65,504) must not overflow under fp16 autocast."""
    model = small_model(embedding_dim=256, rank=16).eval()
    with torch.no_grad():
        for decoder in (model.dec_u_img, model.dec_v_img):
            decoder[-1].weight.mul_(200)
    queries, gallery = torch.randn(5, 256), torch.randn(7, 256)
    with torch.no_grad():
        reference = scoring.scores(model(queries), gallery)
        with torch.autocast("cpu", dtype=torch.float16):
            mixed = model(queries, in_basis=True)
            assert (model.dec_u_img(torch.randn(5, 16, SMALL["hidden_dim"])).float() ** 2
                    ).sum(dim=(1, 2)).min() > 65504
        got = scoring.scores(mixed.to(dtype=torch.float32), gallery)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-2)
