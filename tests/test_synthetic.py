"""The synthetic world: determinism, shapes of the ground truth, structure, and the oracle."""

import re
from dataclasses import fields

import numpy as np
import pytest
import torch

from baselines.oracle import oracle_transform
from quari import scoring
from quari import synthetic as syn
from quari.metrics import ilias_map_at_k

# A world small enough to build in well under a second.
SMALL = dict(
    latent_dim=48, scene_dim=8, num_categories=8, identity_dim=8, nuisance_dim=8,
    groups_per_category=4, num_train_instances=60, train_views=3, num_valid_instances=10,
    num_eval_instances=30, eval_views=4, num_distractors=400, inquire_num_queries=6,
    inquire_min_relevant=3, inquire_max_relevant=10, inquire_num_distractors=200,
)
BACKBONES = {"syn-a64": {"dim": 64, "noise": 0.03}, "syn-b96": {"dim": 96, "noise": 0.02}}


def small_config(**overrides) -> syn.WorldConfig:
    return syn.WorldConfig.from_dict({**SMALL, **overrides})


@pytest.fixture(scope="module")
def world():
    return syn.generate_world(small_config())


@pytest.fixture(scope="module")
def rendered(world):
    return {b.name: syn.render(world, b) for b in syn.backbones_from_dict(BACKBONES)}


@pytest.fixture(scope="module")
def r64(rendered):
    return rendered["syn-a64"]


def instance_of(ilias_id: str) -> str:
    return ilias_id.split("/")[0]


def test_same_seed_same_world_other_seed_other_world(world, r64):
    again = syn.generate_world(small_config())
    spec = syn.BackboneSpec.from_dict("syn-a64", BACKBONES["syn-a64"])
    again_r = syn.render(again, spec)
    for name in syn.EMBEDDING_FIELDS:
        np.testing.assert_array_equal(getattr(world, name), getattr(again, name))
        np.testing.assert_array_equal(getattr(r64, name), getattr(again_r, name))
    assert again_r.ilias_gallery_ids == r64.ilias_gallery_ids
    assert again_r.ilias_positives == r64.ilias_positives
    np.testing.assert_array_equal(again_r.oracle_bases, r64.oracle_bases)
    other = syn.render(syn.generate_world(small_config(seed=1)), spec)
    for name in syn.EMBEDDING_FIELDS:
        a, b = getattr(r64, name), getattr(other, name)
        assert a.shape != b.shape or not np.allclose(a, b), name


def test_splits_use_independent_streams(r64):
    # more training instances must not change the evaluation sets (nor their instances)
    bigger = syn.render(syn.generate_world(small_config(num_train_instances=90)),
                        syn.BackboneSpec.from_dict("syn-a64", BACKBONES["syn-a64"]))
    assert len(bigger.train_images) == 90 * SMALL["train_views"]
    np.testing.assert_array_equal(bigger.ilias_gallery, r64.ilias_gallery)
    np.testing.assert_array_equal(bigger.inquire_queries, r64.inquire_queries)


def test_rows_are_unit_norm_float32(rendered):
    for r in rendered.values():
        for name in syn.EMBEDDING_FIELDS:
            x = getattr(r, name)
            assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == r.backbone.dim, name
            np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5, err_msg=name)


def test_sizes_follow_the_config(r64):
    cfg = r64.world_config
    assert len(r64.train_images) == len(r64.train_image_ids) == cfg.num_train_instances * cfg.train_views
    assert len(r64.valid_images) == cfg.num_valid_instances * cfg.train_views
    n_pos = cfg.num_eval_instances * cfg.eval_views
    assert len(r64.ilias_gallery_ids) == len(r64.ilias_gallery) == n_pos + cfg.num_distractors
    assert len(r64.ilias_text_query_ids) == len(r64.ilias_text_queries) == cfg.num_eval_instances
    assert cfg.num_eval_instances <= len(r64.ilias_image_query_ids) <= 2 * cfg.num_eval_instances
    assert len(r64.inquire_query_ids) == len(r64.inquire_queries) == cfg.inquire_num_queries
    for ids in (r64.train_image_ids, r64.train_caption_ids, r64.ilias_gallery_ids,
                r64.ilias_image_query_ids, r64.inquire_gallery_ids):
        assert len(set(ids)) == len(ids)


def test_ids_look_like_the_real_ones(r64):
    assert all(re.fullmatch(r"inst_\d{4}/query/Q\d{3}_\d{2}", q) for q in r64.ilias_image_query_ids)
    assert all(re.fullmatch(r"inst_\d{4}/query/T\d{3}", q) for q in r64.ilias_text_query_ids)
    assert all(re.fullmatch(r"inst_\d{4}/pos/P\d{3}_\d{2}|yfcc_\d{6}", g) for g in r64.ilias_gallery_ids)
    assert sum(g.startswith("yfcc_") for g in r64.ilias_gallery_ids) == SMALL["num_distractors"]


def test_train_valid_and_eval_instances_are_disjoint(r64):
    train, valid = set(r64.train_image_labels.tolist()), set(r64.valid_image_labels.tolist())
    assert len(train) == SMALL["num_train_instances"] and len(valid) == SMALL["num_valid_instances"]
    assert not train & valid
    # every label has exactly train_views images
    _, counts = np.unique(r64.train_image_labels, return_counts=True)
    assert (counts == SMALL["train_views"]).all()
    # no evaluation image is a copy of a training image
    sims = r64.ilias_gallery @ r64.train_images.T
    assert sims.max() < 0.999
    train_ids = set(r64.train_image_ids) | set(r64.valid_image_ids)
    assert not train_ids & (set(r64.ilias_gallery_ids) | set(r64.inquire_gallery_ids))


def test_ilias_positives_are_the_other_views_in_the_gallery(r64):
    gallery = set(r64.ilias_gallery_ids)
    queries = r64.ilias_image_query_ids + r64.ilias_text_query_ids
    assert set(r64.ilias_positives) == set(queries)
    for q in queries:
        pos = r64.ilias_positives[q]
        assert len(pos) >= 1
        assert set(pos) <= gallery
        inst = instance_of(q)
        assert all(instance_of(p) == inst and "/pos/" in p for p in pos)
        # complete: every gallery view of the instance is a positive
        assert set(pos) == {g for g in gallery if instance_of(g) == inst}
    # positives and distractors are mixed, so ties or gallery order give nothing away
    first = r64.ilias_gallery_ids[:SMALL["num_eval_instances"] * SMALL["eval_views"]]
    assert 0 < sum(g.startswith("yfcc_") for g in first) < len(first)
    # the query images themselves are not in the gallery (as in ILIAS)
    assert not set(r64.ilias_image_query_ids) & gallery


def test_every_query_has_a_category(r64, world):
    queries = r64.ilias_image_query_ids + r64.ilias_text_query_ids + r64.inquire_query_ids
    assert set(r64.query_categories) == set(queries)
    assert all(0 <= c < SMALL["num_categories"] for c in r64.query_categories.values())
    # all queries of one instance share its category
    by_instance = {}
    for q in r64.ilias_image_query_ids + r64.ilias_text_query_ids:
        by_instance.setdefault(instance_of(q), set()).add(r64.query_categories[q])
    assert all(len(c) == 1 for c in by_instance.values())


def test_inquire_relevant_sets(r64):
    pool = set(r64.inquire_gallery_ids)
    assert set(r64.inquire_positives) == set(r64.inquire_query_ids)
    seen = set()
    for q in r64.inquire_query_ids:
        pos = set(r64.inquire_positives[q])
        assert SMALL["inquire_min_relevant"] <= len(pos) <= SMALL["inquire_max_relevant"]
        assert pos <= pool and not pos & seen
        seen |= pos
    assert len(pool) == len(seen) + SMALL["inquire_num_distractors"]


def test_captions_point_at_images_and_some_images_have_several(r64):
    for prefix in ("train", "valid"):
        images = getattr(r64, f"{prefix}_image_ids")
        cap_img = getattr(r64, f"{prefix}_caption_image")
        cap_ids = getattr(r64, f"{prefix}_caption_ids")
        assert cap_img.dtype == np.int64 and len(cap_img) == len(cap_ids)
        assert cap_img.min() >= 0 and cap_img.max() < len(images)
        assert all(c.startswith(images[i] + "#") for c, i in zip(cap_ids, cap_img))
        counts = np.bincount(cap_img, minlength=len(images))
        assert counts.min() >= 1 and counts.max() <= SMALL.get("max_captions_per_image", 5)
        assert (counts > 1).any()
    # a caption is closer to its own image than to a random one, on average
    own = np.sum(r64.train_captions * r64.train_images[r64.train_caption_image], axis=1)
    other = r64.train_captions @ r64.train_images.T
    assert own.mean() > other.mean() + 0.05


def test_backbones_share_ground_truth_but_not_embeddings(rendered):
    a, b = rendered["syn-a64"], rendered["syn-b96"]
    assert (a.dim, b.dim) == (64, 96) and a.oracle_bases.shape[1] == 64 and b.oracle_bases.shape[1] == 96
    for f in fields(syn.RenderedWorld):
        if f.name in syn.EMBEDDING_FIELDS or f.name in ("backbone", "oracle_bases"):
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb)
        else:
            assert va == vb, f.name
    # the same images, seen through different maps: similarity structure agrees, values differ
    ga, gb = a.ilias_gallery[:200] @ a.ilias_gallery[:200].T, b.ilias_gallery[:200] @ b.ilias_gallery[:200].T
    assert np.corrcoef(ga.ravel(), gb.ravel())[0, 1] > 0.8
    assert not np.allclose(ga, gb, atol=1e-3)


def test_backbone_must_not_be_smaller_than_the_latent_space(world):
    with pytest.raises(ValueError, match="latent_dim"):
        syn.render(world, syn.BackboneSpec("tiny", SMALL["latent_dim"] - 1, 0.0))


def test_oracle_bases_are_orthonormal(rendered):
    for r in rendered.values():
        bases = syn.oracle_bases(r)
        assert bases.shape == (SMALL["num_categories"], r.dim, SMALL["identity_dim"] + 1)
        gram = np.einsum("cek,cel->ckl", bases.astype(np.float64), bases)
        np.testing.assert_allclose(gram, np.broadcast_to(np.eye(bases.shape[2]), gram.shape), atol=1e-5)


def test_oracle_bases_span_the_true_identity_subspace(world, rendered):
    for r in rendered.values():
        A = syn._backbone_map(world, r.backbone)  # the backbone's latent -> E map
        for c in range(SMALL["num_categories"]):
            B = r.oracle_bases[c].astype(np.float64)
            truth = A @ np.concatenate([world.category_means[c][:, None], world.identity_bases[c]], axis=1)
            np.testing.assert_allclose(B @ (B.T @ truth), truth, atol=1e-4)


def principal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spaces of orthonormal a and b."""
    return np.linalg.svd(a.T @ b, compute_uv=False)


def test_nuisance_of_one_category_overlaps_identity_of_others(world):
    I, N = world.identity_bases, world.nuisance_bases
    C, D = world.category_means.shape
    np.testing.assert_allclose(np.einsum("cdk,cdl->ckl", N, N),
                               np.broadcast_to(np.eye(N.shape[2]), (C,) + (N.shape[2],) * 2), atol=1e-10)
    for a in range(C):
        # the nuisance never moves an instance inside its own identity subspace
        assert principal_cosines(N[a], I[a]).max() < 1e-8
        assert abs(N[a].T @ world.category_means[a]).max() < 1e-8
        sources = set(world.nuisance_source_categories[a].tolist())
        assert len(sources) == world.config.nuisance_sources and a not in sources
        for b in range(C):
            if b == a:
                continue
            top = principal_cosines(N[a], I[b])[0]
            if b in sources:
                # B's identity directions are A's nuisance: a principal angle near zero
                assert top > 0.8
    # versus random subspaces of the same sizes, which overlap far less
    rng = np.random.default_rng(0)
    rand = [principal_cosines(np.linalg.qr(rng.standard_normal((D, N.shape[2])))[0], I[0])[0]
            for _ in range(20)]
    assert max(rand) < 0.8
    # without overlap the nuisance is drawn at random and borrows nothing
    plain = syn.generate_world(small_config(nuisance_overlap=0.0, nuisance_sources=0))
    assert plain.nuisance_source_categories.shape == (C, 0)


def oracle_scores(r, queries, categories, gallery):
    """The oracle method's scores (its transform through quari.scoring) of queries whose true
    categories are given."""
    bases = torch.from_numpy(r.oracle_bases[np.asarray(categories)])
    transform = oracle_transform(torch.from_numpy(np.asarray(queries)), bases)
    return scoring.scores(transform, torch.from_numpy(np.asarray(gallery))).numpy()


def test_oracle_scores_match_a_dense_projection(r64):
    rng = np.random.default_rng(0)
    q = r64.ilias_image_queries[:7]
    cats = rng.integers(SMALL["num_categories"], size=len(q))
    g = r64.ilias_gallery[:50]
    got = oracle_scores(r64, q, cats, g)
    for i, c in enumerate(cats):
        B = r64.oracle_bases[c].astype(np.float64)
        P = B @ B.T  # the E x E projector onto the category's identity subspace
        pq, pg = P @ q[i], g @ P
        want = (pg @ pq) / (np.linalg.norm(pg, axis=1) * np.linalg.norm(pq))
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def ilias_map(r, scores, query_ids, k=100):
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ranked = [[r.ilias_gallery_ids[i] for i in row] for row in top]
    return ilias_map_at_k(ranked, [set(r.ilias_positives[q]) for q in query_ids], k)


def test_oracle_beats_cosine_by_a_clear_margin(rendered):
    for r in rendered.values():
        for queries, ids in ((r.ilias_image_queries, r.ilias_image_query_ids),
                             (r.ilias_text_queries, r.ilias_text_query_ids)):
            cats = [r.query_categories[q] for q in ids]
            cosine = ilias_map(r, queries @ r.ilias_gallery.T, ids)
            oracle = ilias_map(r, oracle_scores(r, queries, cats, r.ilias_gallery), ids)
            assert oracle > cosine + 0.15, (r.backbone.name, cosine, oracle)


def test_config_from_dict_rejects_unknown_and_bad_values():
    assert syn.WorldConfig.from_dict({}) == syn.WorldConfig()
    assert syn.WorldConfig.from_dict({"seed": 3}).seed == 3
    with pytest.raises(ValueError, match="num_categoriez"):
        syn.WorldConfig.from_dict({"num_categoriez": 3})
    for bad in ({"latent_dim": 2.5}, {"noise": -1.0}, {"nuisance_overlap": 1.5},
                {"identity_dim": 200}, {"inquire_min_relevant": 50},
                {"category_strength": 0.0}, {"unknown_thing": 1}):
        with pytest.raises(ValueError):
            syn.WorldConfig.from_dict(bad)
    with pytest.raises(ValueError, match="noize"):
        syn.backbones_from_dict({"x": {"dim": 64, "noize": 0.1}})
    assert [b.name for b in syn.backbones_from_dict(BACKBONES)] == list(BACKBONES)


def test_save_and_load_round_trip(r64, tmp_path):
    syn.save_world(r64, tmp_path / "w")
    back = syn.load_world(tmp_path / "w")
    for f in fields(syn.RenderedWorld):
        va, vb = getattr(r64, f.name), getattr(back, f.name)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype
            np.testing.assert_array_equal(va, vb)
        else:
            assert va == vb, f.name
    with pytest.raises(FileNotFoundError):
        syn.load_world(tmp_path / "missing")
