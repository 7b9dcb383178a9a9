"""The embedded offline benchmark: a synthetic retrieval world generated from one seed.

The world imitates what makes fine-grained instance retrieval (ILIAS) hard for a static
embedding: *which directions matter depends on the query*. Every category has

* an instance-identity subspace, where its instances (grouped into fine-grained groups, e.g.
  species or product lines) differ from each other, and
* a view-nuisance subspace, where views of one instance differ (pose, lighting, clutter). It is
  built from *other* categories' identity directions, so a direction that separates the
  instances of category B is noise for category A: no single static linear map suits every query,
  while projecting onto the query category's identity subspace (the oracle) does.

On top come a shared high-variance "scene" subspace (backgrounds, removable by any static
whitening) and isotropic noise. A latent image is

    category mean + identity basis @ (instance code + view jitter) + nuisance + scene + noise

and a latent caption is the same instance through a modality gap: a shared offset, the category
and group, only part of the instance code, some of the image's scene, and text noise.

The latent world (:func:`generate_world`) does not depend on any backbone. A synthetic
*backbone* (:class:`BackboneSpec`) renders it (:func:`render`): a random near-orthogonal linear
map from the latent space into its own E dimensions plus its own noise, then L2 normalisation.
Two backbones of different dimension and noise therefore share the ground truth exactly.

Splits and their shapes follow the real data:

* ``train_*`` / ``valid_*``: an image-caption collection (the role of COCO/CC12M) over instances
  disjoint from every evaluation instance; several views per instance (instance labels for the
  static classifier baseline, other views as image queries for QuARI) and several captions for
  some images. ``valid_*`` holds held-out training instances.
* ``ilias_*``: one clean image query per evaluation instance (a second one for some), one text
  query per instance, a gallery of cluttered views of the evaluation instances (the positives)
  and of never-queried distractor instances. Ids look like ILIAS's (``inst_0003/pos/P000_02``,
  ``yfcc_000123``).
* ``inquire_*``: text queries naming a fine-grained group; every pool image of that group is
  relevant (several to dozens per query), the rest of the pool are other groups.

The oracle (the ``oracle`` method, ``baselines/oracle.py``, on :func:`oracle_bases`) ranks by
cosine after projecting query and gallery onto the query category's true identity subspace (its
category direction and its instance-identity directions), expressed in the backbone's space.

Calibration of the defaults (seeds 0 and 7), backbones ``{dim: 256, noise: 0.03}`` and
``{dim: 384, noise: 0.025}``, in the order cosine / static map (scikit-learn LDA on the training
instances) / oracle: ILIAS image-to-image mAP@1k about 19-22 / 52-54 / 83-87, ILIAS text-to-image
33-37 / 43-45 / 69-75, INQUIRE mAP@50 42-52 / 62-67 / 73-81. Backbone noise is per coordinate, so
its total norm grows with ``dim``; much above these values it swamps the object signal.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from quari.store import atomic_save_npy, atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "WorldConfig",
    "BackboneSpec",
    "backbones_from_dict",
    "LatentWorld",
    "RenderedWorld",
    "generate_world",
    "render",
    "oracle_bases",
    "save_world",
    "load_world",
    "EMBEDDING_FIELDS",
]

#: The embedding matrices of a world (latent in a LatentWorld, rendered in a RenderedWorld).
EMBEDDING_FIELDS = (
    "train_images", "train_captions", "valid_images", "valid_captions",
    "ilias_gallery", "ilias_image_queries", "ilias_text_queries",
    "inquire_gallery", "inquire_queries",
)

# Independent random streams, so that changing one split's size leaves the others unchanged.
_STRUCTURE, _TRAIN, _VALID, _ILIAS, _INQUIRE, _RENDER = range(6)

FORMAT_VERSION = 1
MANIFEST = "world.json"


# integer settings that may be 0 (every other one must be positive)
_MAY_BE_ZERO = frozenset({"seed", "nuisance_sources", "num_distractors", "inquire_num_distractors"})


@dataclass
class WorldConfig:
    """Everything that defines the latent world; every array derives from ``seed``.

    Strengths are expected L2 norms of a component in the latent space (Gaussian components are
    drawn isotropically inside their subspace, so their norm fluctuates around the strength).
    """

    seed: int = 0  # every random draw of the world derives from this seed
    # --- structure ---------------------------------------------------------------------------
    latent_dim: int = 160  # latent dimension; every backbone must have dim >= latent_dim
    scene_dim: int = 16  # shared "scene" (background) subspace, orthogonal to all objects
    num_categories: int = 40  # object categories, each with its own identity/nuisance subspaces
    identity_dim: int = 16  # dimension of a category's instance-identity subspace
    nuisance_dim: int = 16  # dimension of a category's view-nuisance subspace
    nuisance_sources: int = 2  # other categories whose identity directions a nuisance borrows
    nuisance_overlap: float = 0.9  # cosine between nuisance and borrowed directions (0 = random)
    groups_per_category: int = 12  # fine-grained groups (e.g. species) per category
    # --- image strengths ---------------------------------------------------------------------
    category_strength: float = 1.0  # norm of a category's mean (orthogonal to its identity)
    group_strength: float = 1.0  # norm of a group centre in the identity subspace
    instance_strength: float = 0.8  # norm of an instance's offset from its group centre
    view_jitter: float = 0.55  # per-view change of appearance inside the identity subspace
    nuisance_strength: float = 1.5  # per-view nuisance inside the category's nuisance subspace
    scene_strength: float = 4.0  # per-image scene component (shared subspace, high variance)
    noise: float = 0.5  # isotropic latent noise per image (shared by every backbone)
    query_scene_scale: float = 0.25  # ILIAS image queries are clean: less scene ...
    query_nuisance_scale: float = 0.5  # ... and less view nuisance than the cluttered positives
    # --- text --------------------------------------------------------------------------------
    modality_gap: float = 1.0  # norm of the offset shared by every text embedding
    text_category_weight: float = 1.0  # share of the category mean a text carries
    text_group_weight: float = 1.0  # share of the group centre a text carries
    text_instance_weight: float = 0.5  # share of the instance offset (partial instance info)
    text_scene_weight: float = 0.5  # share of the image's scene a training caption describes
    text_noise: float = 0.7  # isotropic noise of a text embedding
    # --- training collection (plays COCO/CC12M) ----------------------------------------------
    num_train_instances: int = 3000  # training instances, disjoint from every evaluation one
    train_views: int = 4  # images (views) per training instance
    multi_caption_fraction: float = 0.3  # share of images with more than one caption
    max_captions_per_image: int = 5  # those images get 2..max captions
    num_valid_instances: int = 300  # held-out training instances (validation split)
    # --- ILIAS-shaped evaluation -------------------------------------------------------------
    num_eval_instances: int = 250  # queried instances (one text query and >= 1 image query each)
    eval_views: int = 5  # gallery positives (cluttered views) per evaluation instance
    extra_query_fraction: float = 0.2  # share of instances with a second image query
    num_distractors: int = 5000  # gallery images of never-queried instances (YFCC's role)
    # --- INQUIRE-shaped evaluation -----------------------------------------------------------
    inquire_num_queries: int = 50  # text queries, each naming one fine-grained group
    inquire_min_relevant: int = 5  # fewest relevant pool images of a query
    inquire_max_relevant: int = 40  # most relevant pool images of a query
    inquire_num_distractors: int = 4000  # pool images of never-queried groups

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise ValueError(f"WorldConfig.{f.name} must be an integer, got {value!r}")
                if value < (0 if f.name in _MAY_BE_ZERO else 1):
                    raise ValueError(f"WorldConfig.{f.name} is out of range: {value}")
            elif isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                    or not np.isfinite(value) or value < 0:
                raise ValueError(f"WorldConfig.{f.name} must be a finite number >= 0, got {value!r}")
        for name in ("nuisance_overlap", "multi_caption_fraction", "extra_query_fraction"):
            if getattr(self, name) > 1:
                raise ValueError(f"WorldConfig.{name} must lie in [0, 1]")
        if self.category_strength == 0:
            raise ValueError("WorldConfig.category_strength must be > 0 (it gives each category "
                             "its direction)")
        object_dim = self.latent_dim - self.scene_dim
        if self.identity_dim + self.nuisance_dim + 1 > object_dim:
            raise ValueError("identity_dim + nuisance_dim + 1 must not exceed latent_dim - scene_dim")
        if self.nuisance_overlap > 0:
            if not 1 <= self.nuisance_sources < self.num_categories:
                raise ValueError("nuisance_sources must lie in [1, num_categories) when overlapping")
            if self.nuisance_dim > self.nuisance_sources * self.identity_dim:
                raise ValueError("nuisance_dim must not exceed nuisance_sources * identity_dim")
        if self.max_captions_per_image < 2 and self.multi_caption_fraction > 0:
            raise ValueError("max_captions_per_image must be >= 2 when multi_caption_fraction > 0")
        if self.inquire_min_relevant > self.inquire_max_relevant:
            raise ValueError("inquire_min_relevant must not exceed inquire_max_relevant")
        groups = self.num_categories * self.groups_per_category
        if self.inquire_num_queries >= groups:
            raise ValueError(f"inquire_num_queries must be below the number of groups ({groups})")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "WorldConfig":
        """A config from a plain mapping (e.g. YAML); an unknown key raises ValueError naming it."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WorldConfig key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BackboneSpec:
    """A synthetic backbone: a random near-orthogonal map latent -> ``dim`` plus its own noise.

    The map is ``Q (I + distortion * G / sqrt(latent_dim))`` with Q a random matrix of orthonormal
    columns and G Gaussian; its random stream derives from the world seed, ``name`` and ``seed``,
    so differently named backbones differ without further settings.
    """

    name: str  # names the backbone (table rows); part of its random stream
    dim: int  # embedding dimension E (>= the world's latent_dim)
    noise: float  # std of the Gaussian noise added per coordinate to the unit-norm signal
    seed: int = 0  # extra seed to draw another backbone under the same name
    distortion: float = 0.1  # departure of the map from orthogonality

    def __post_init__(self):
        if not self.name:
            raise ValueError("a backbone needs a name")
        if int(self.dim) != self.dim or self.dim < 1:
            raise ValueError(f"backbone {self.name}: dim must be a positive integer")
        if not (np.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"backbone {self.name}: noise must be >= 0")
        if not (np.isfinite(self.distortion) and self.distortion >= 0):
            raise ValueError(f"backbone {self.name}: distortion must be >= 0")

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> "BackboneSpec":
        """A backbone from its config entry (``{dim, noise[, seed, distortion]}``)."""
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"backbone {name}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(name=name, **d)


def backbones_from_dict(d: dict[str, dict[str, Any]]) -> list[BackboneSpec]:
    """Backbones from a ``{name: {dim, noise, ...}}`` mapping, in its order."""
    return [BackboneSpec.from_dict(name, spec or {}) for name, spec in d.items()]


@dataclass
class _Splits:
    """Fields shared by the latent and the rendered world (ground truth is backbone-free)."""

    train_images: np.ndarray  # [Ni, D or E] one row per training image
    train_image_ids: list[str]
    train_image_labels: np.ndarray  # [Ni] int64 instance index (views of one instance share it)
    train_captions: np.ndarray  # [Nc, D or E]
    train_caption_ids: list[str]
    train_caption_image: np.ndarray  # [Nc] int64 row into train_images
    valid_images: np.ndarray
    valid_image_ids: list[str]
    valid_image_labels: np.ndarray  # instance indices continue after the training ones
    valid_captions: np.ndarray
    valid_caption_ids: list[str]
    valid_caption_image: np.ndarray  # row into valid_images
    ilias_gallery: np.ndarray  # positives and distractors, shuffled
    ilias_gallery_ids: list[str]
    ilias_image_queries: np.ndarray
    ilias_image_query_ids: list[str]
    ilias_text_queries: np.ndarray
    ilias_text_query_ids: list[str]
    ilias_positives: dict[str, list[str]]  # image and text query id -> gallery ids
    inquire_gallery: np.ndarray  # the pool, shuffled
    inquire_gallery_ids: list[str]
    inquire_queries: np.ndarray  # text queries
    inquire_query_ids: list[str]
    inquire_positives: dict[str, list[str]]  # query id -> pool ids of its group
    query_categories: dict[str, int]  # every ILIAS and INQUIRE query id -> its true category


@dataclass
class LatentWorld(_Splits):
    """The backbone-independent world: its structure and latent (unnormalised) vectors."""

    config: WorldConfig
    category_means: np.ndarray  # [C, D]
    identity_bases: np.ndarray  # [C, D, identity_dim] orthonormal columns
    nuisance_bases: np.ndarray  # [C, D, nuisance_dim] orthonormal, orthogonal to own identity
    nuisance_source_categories: np.ndarray  # [C, nuisance_sources] whose identity is borrowed
    scene_basis: np.ndarray  # [D, scene_dim]
    group_centres: np.ndarray  # [C, G, identity_dim] coordinates in the identity basis
    modality_gap_vector: np.ndarray  # [D] offset of every text embedding


@dataclass
class RenderedWorld(_Splits):
    """The world as one backbone embeds it: float32 rows of unit norm, plus the oracle."""

    backbone: BackboneSpec
    world_config: WorldConfig
    oracle_bases: np.ndarray  # [C, E, identity_dim + 1] category + identity subspace, orthonormal

    @property
    def dim(self) -> int:
        return int(self.ilias_gallery.shape[1])


# ------------------------------------------------------------------------------------------
# Generation


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A random [rows, cols] matrix with orthonormal columns (Haar-distributed)."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))


def _gaussian(rng: np.random.Generator, n: int, dim: int, strength: float) -> np.ndarray:
    """[n, dim] isotropic Gaussian rows of expected squared norm strength**2."""
    return rng.standard_normal((n, dim)) * (strength / np.sqrt(dim))


def _structure(cfg: WorldConfig) -> dict[str, np.ndarray]:
    """The fixed part of the world: subspaces, category means, group centres, modality gap."""
    rng = np.random.default_rng([cfg.seed, _STRUCTURE])
    D, C, k, kn = cfg.latent_dim, cfg.num_categories, cfg.identity_dim, cfg.nuisance_dim
    basis = _orthonormal(rng, D, D)
    scene, objects = basis[:, :cfg.scene_dim], basis[:, cfg.scene_dim:]
    identity = np.stack([objects @ _orthonormal(rng, objects.shape[1], k) for _ in range(C)])
    means = np.empty((C, D))
    for c in range(C):
        v = objects @ rng.standard_normal(objects.shape[1])
        v -= identity[c] @ (identity[c].T @ v)
        means[c] = v * (cfg.category_strength / np.linalg.norm(v))
    nuisance = np.empty((C, D, kn))
    n_src = cfg.nuisance_sources if cfg.nuisance_overlap > 0 else 0
    sources = np.zeros((C, n_src), dtype=np.int64)
    for c in range(C):
        random_part = objects @ _orthonormal(rng, objects.shape[1], kn)
        if n_src:
            sources[c] = rng.choice(np.delete(np.arange(C), c), size=n_src, replace=False)
            shares = [len(s) for s in np.array_split(np.arange(kn), n_src)]
            borrowed = np.concatenate([identity[s] @ _orthonormal(rng, k, m)
                                       for s, m in zip(sources[c], shares)], axis=1)
            mixed = (cfg.nuisance_overlap * borrowed
                     + np.sqrt(1 - cfg.nuisance_overlap ** 2) * random_part)
        else:
            mixed = random_part
        # the nuisance must not move an instance inside its own identity subspace or category
        own = np.concatenate([identity[c], means[c][:, None] / np.linalg.norm(means[c])], axis=1)
        mixed -= own @ (own.T @ mixed)
        nuisance[c] = np.linalg.qr(mixed)[0]
    centres = rng.standard_normal((C, cfg.groups_per_category, k)) * (cfg.group_strength / np.sqrt(k))
    gap = rng.standard_normal(D)
    gap *= cfg.modality_gap / np.linalg.norm(gap)
    return dict(category_means=means, identity_bases=identity, nuisance_bases=nuisance,
                nuisance_source_categories=sources, scene_basis=scene, group_centres=centres,
                modality_gap_vector=gap)


@dataclass
class _Instances:
    category: np.ndarray  # [n] int64
    group: np.ndarray  # [n] int64
    code: np.ndarray  # [n, k] identity coordinates (group centre + instance offset)


def _new_instances(rng, n: int, cfg: WorldConfig, s: dict, category=None, group=None) -> _Instances:
    if category is None:
        category = rng.integers(cfg.num_categories, size=n)
        group = rng.integers(cfg.groups_per_category, size=n)
    offset = _gaussian(rng, n, cfg.identity_dim, cfg.instance_strength)
    return _Instances(np.asarray(category, dtype=np.int64), np.asarray(group, dtype=np.int64),
                      s["group_centres"][category, group] + offset)


def _in_subspaces(bases: np.ndarray, category: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Row i is ``bases[category[i]] @ coords[i]`` (computed category by category)."""
    out = np.zeros((len(category), bases.shape[1]))
    for c in np.unique(category):
        rows = np.flatnonzero(category == c)
        out[rows] = coords[rows] @ bases[c].T
    return out


def _images(rng, inst: _Instances, rows: np.ndarray, cfg: WorldConfig, s: dict,
            scene_scale: float = 1.0, nuisance_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Latent images of instances ``rows`` (one per entry) and their scene coordinates."""
    n, cat = len(rows), inst.category[rows]
    code = inst.code[rows] + _gaussian(rng, n, cfg.identity_dim, cfg.view_jitter)
    nuis = _gaussian(rng, n, cfg.nuisance_dim, cfg.nuisance_strength * nuisance_scale)
    scene = _gaussian(rng, n, cfg.scene_dim, cfg.scene_strength * scene_scale)
    x = (s["category_means"][cat]
         + _in_subspaces(s["identity_bases"], cat, code)
         + _in_subspaces(s["nuisance_bases"], cat, nuis)
         + scene @ s["scene_basis"].T
         + _gaussian(rng, n, cfg.latent_dim, cfg.noise))
    return x, scene


def _texts(rng, inst: _Instances, rows: np.ndarray, cfg: WorldConfig, s: dict,
           instance_weight: float, scene: np.ndarray | None = None) -> np.ndarray:
    """Latent texts describing instances ``rows``: gap, category, group, part of the instance."""
    cat, grp = inst.category[rows], inst.group[rows]
    centre = s["group_centres"][cat, grp]
    code = cfg.text_group_weight * centre + instance_weight * (inst.code[rows] - centre)
    x = (s["modality_gap_vector"] + cfg.text_category_weight * s["category_means"][cat]
         + _in_subspaces(s["identity_bases"], cat, code)
         + _gaussian(rng, len(rows), cfg.latent_dim, cfg.text_noise))
    if scene is not None:
        x += cfg.text_scene_weight * scene @ s["scene_basis"].T
    return x


def _collection(rng, n_instances: int, label_offset: int, prefix: str, cfg: WorldConfig,
                s: dict) -> dict[str, Any]:
    """An image-caption collection over new instances (train or valid split)."""
    inst = _new_instances(rng, n_instances, cfg, s)
    image_inst = np.repeat(np.arange(n_instances), cfg.train_views)
    images, scene = _images(rng, inst, image_inst, cfg, s)
    n_img = len(image_inst)
    counts = np.ones(n_img, dtype=np.int64)
    multi = rng.random(n_img) < cfg.multi_caption_fraction
    counts[multi] = rng.integers(2, cfg.max_captions_per_image + 1, size=int(multi.sum()))
    caption_image = np.repeat(np.arange(n_img), counts)
    captions = _texts(rng, inst, image_inst[caption_image], cfg, s, cfg.text_instance_weight,
                      scene[caption_image])
    image_ids = [f"{prefix}_{i:06d}" for i in range(n_img)]
    caption_ids = [f"{image_ids[i]}#{j}" for i, c in enumerate(counts) for j in range(c)]
    return dict(images=images, image_ids=image_ids,
                image_labels=(image_inst + label_offset).astype(np.int64),
                captions=captions, caption_ids=caption_ids,
                caption_image=caption_image.astype(np.int64))


def _ilias(rng, cfg: WorldConfig, s: dict) -> dict[str, Any]:
    n = cfg.num_eval_instances
    inst = _new_instances(rng, n, cfg, s)
    names = [f"inst_{i:04d}" for i in range(n)]
    pos_inst = np.repeat(np.arange(n), cfg.eval_views)
    positives, _ = _images(rng, inst, pos_inst, cfg, s)
    pos_ids = [f"{names[i]}/pos/P000_{j:02d}" for i in range(n) for j in range(cfg.eval_views)]
    n_queries = 1 + (rng.random(n) < cfg.extra_query_fraction)
    query_inst = np.repeat(np.arange(n), n_queries)
    queries, _ = _images(rng, inst, query_inst, cfg, s, cfg.query_scene_scale, cfg.query_nuisance_scale)
    query_ids = [f"{names[i]}/query/Q000_{j:02d}" for i in range(n) for j in range(n_queries[i])]
    texts = _texts(rng, inst, np.arange(n), cfg, s, cfg.text_instance_weight)
    text_ids = [f"{name}/query/T000" for name in names]
    distractor_inst = _new_instances(rng, cfg.num_distractors, cfg, s)
    distractors, _ = _images(rng, distractor_inst, np.arange(cfg.num_distractors), cfg, s)
    gallery = np.concatenate([positives, distractors])
    gallery_ids = pos_ids + [f"yfcc_{i:06d}" for i in range(cfg.num_distractors)]
    order = rng.permutation(len(gallery_ids))
    by_instance = [pos_ids[i * cfg.eval_views:(i + 1) * cfg.eval_views] for i in range(n)]
    positives_of = {q: list(by_instance[i]) for q, i in zip(query_ids, query_inst)}
    positives_of.update({t: list(by_instance[i]) for i, t in enumerate(text_ids)})
    categories = {q: int(inst.category[i]) for q, i in zip(query_ids, query_inst)}
    categories.update({t: int(inst.category[i]) for i, t in enumerate(text_ids)})
    return dict(gallery=gallery[order], gallery_ids=[gallery_ids[i] for i in order],
                image_queries=queries, image_query_ids=query_ids, text_queries=texts,
                text_query_ids=text_ids, positives=positives_of, categories=categories)


def _inquire(rng, cfg: WorldConfig, s: dict) -> dict[str, Any]:
    G = cfg.groups_per_category
    chosen = rng.choice(cfg.num_categories * G, size=cfg.inquire_num_queries, replace=False)
    q_cat, q_grp = chosen // G, chosen % G
    n_rel = rng.integers(cfg.inquire_min_relevant, cfg.inquire_max_relevant + 1, size=len(chosen))
    # every relevant image is a different individual of the named group (as in iNaturalist)
    rel_query = np.repeat(np.arange(len(chosen)), n_rel)
    rel_inst = _new_instances(rng, len(rel_query), cfg, s, q_cat[rel_query], q_grp[rel_query])
    relevant, _ = _images(rng, rel_inst, np.arange(len(rel_query)), cfg, s)
    others = np.setdiff1d(np.arange(cfg.num_categories * G), chosen)
    d_groups = rng.choice(others, size=cfg.inquire_num_distractors)
    d_inst = _new_instances(rng, len(d_groups), cfg, s, d_groups // G, d_groups % G)
    distractors, _ = _images(rng, d_inst, np.arange(len(d_groups)), cfg, s)
    q_inst = _Instances(q_cat, q_grp, s["group_centres"][q_cat, q_grp])
    queries = _texts(rng, q_inst, np.arange(len(chosen)), cfg, s, instance_weight=0.0)
    query_ids = [f"inquire_{q:03d}" for q in range(len(chosen))]
    pool = np.concatenate([relevant, distractors])
    order = rng.permutation(len(pool))
    pool_ids = [f"inat_{i:07d}" for i in range(len(pool))]  # ids follow the shuffled order
    row_of = np.empty(len(pool), dtype=np.int64)
    row_of[order] = np.arange(len(pool))
    positives = {query_ids[q]: [] for q in range(len(chosen))}
    for r, q in enumerate(rel_query):
        positives[query_ids[q]].append(pool_ids[row_of[r]])
    categories = {query_ids[q]: int(q_cat[q]) for q in range(len(chosen))}
    return dict(gallery=pool[order], gallery_ids=pool_ids, queries=queries, query_ids=query_ids,
                positives=positives, categories=categories)


def generate_world(cfg: WorldConfig) -> LatentWorld:
    """The latent world of ``cfg`` (backbone independent); identical for identical configs."""
    s = _structure(cfg)
    train = _collection(np.random.default_rng([cfg.seed, _TRAIN]), cfg.num_train_instances, 0,
                        "coco_train", cfg, s)
    valid = _collection(np.random.default_rng([cfg.seed, _VALID]), cfg.num_valid_instances,
                        cfg.num_train_instances, "coco_val", cfg, s)
    ilias = _ilias(np.random.default_rng([cfg.seed, _ILIAS]), cfg, s)
    inquire = _inquire(np.random.default_rng([cfg.seed, _INQUIRE]), cfg, s)
    log.info("synthetic world (seed %d): %d train images, %d captions, ILIAS gallery %d, "
             "INQUIRE pool %d", cfg.seed, len(train["image_ids"]), len(train["caption_ids"]),
             len(ilias["gallery_ids"]), len(inquire["gallery_ids"]))
    splits = {f"train_{k}": v for k, v in train.items()}
    splits.update({f"valid_{k}": v for k, v in valid.items()})
    splits.update({f"ilias_{k}": v for k, v in ilias.items() if k != "categories"})
    splits.update({f"inquire_{k}": v for k, v in inquire.items() if k != "categories"})
    return LatentWorld(**splits, query_categories={**ilias["categories"], **inquire["categories"]},
                       config=cfg, **s)


# ------------------------------------------------------------------------------------------
# Rendering by a backbone, and the oracle


def _backbone_rng(world: LatentWorld, backbone: BackboneSpec, stream: int) -> np.random.Generator:
    """Stream 0 draws the backbone's map, stream i + 1 the noise of EMBEDDING_FIELDS[i]."""
    return np.random.default_rng([world.config.seed, _RENDER, zlib.crc32(backbone.name.encode()),
                                  backbone.seed, stream])


def _backbone_map(world: LatentWorld, backbone: BackboneSpec) -> np.ndarray:
    """[E, D] near-orthogonal map of ``backbone`` from the latent space into its own."""
    D = world.config.latent_dim
    if backbone.dim < D:
        raise ValueError(f"backbone {backbone.name}: dim {backbone.dim} < latent_dim {D}")
    rng = _backbone_rng(world, backbone, 0)
    mixing = np.eye(D) + backbone.distortion * rng.standard_normal((D, D)) / np.sqrt(D)
    return _orthonormal(rng, backbone.dim, D) @ mixing


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _oracle_latent_bases(world: LatentWorld) -> np.ndarray:
    """[C, D, identity_dim + 1]: what identifies an object of each category, i.e. its category
    direction and its instance-identity subspace (orthonormal; the mean is orthogonal to it)."""
    means = world.category_means / np.linalg.norm(world.category_means, axis=1, keepdims=True)
    return np.concatenate([means[:, :, None], world.identity_bases], axis=2)


def render(world: LatentWorld, backbone: BackboneSpec) -> RenderedWorld:
    """The world embedded by ``backbone``: map, add the backbone's noise, L2-normalise (float32)."""
    A = _backbone_map(world, backbone)
    rendered = {}
    for stream, name in enumerate(EMBEDDING_FIELDS, start=1):
        y = _unit_rows(_unit_rows(getattr(world, name)) @ A.T)
        y += backbone.noise * _backbone_rng(world, backbone, stream).standard_normal(y.shape)
        rendered[name] = _unit_rows(y).astype(np.float32)
    bases = np.stack([np.linalg.qr(A @ b)[0] for b in _oracle_latent_bases(world)]).astype(np.float32)
    shared = {f.name: getattr(world, f.name) for f in fields(_Splits) if f.name not in rendered}
    return RenderedWorld(**shared, **rendered, backbone=backbone, world_config=world.config,
                         oracle_bases=bases)


def oracle_bases(rendered: RenderedWorld) -> np.ndarray:
    """[C, E, identity_dim + 1]: each category's true identity subspace (its category direction
    and instance-identity directions) in the backbone's space, orthonormal columns."""
    return rendered.oracle_bases


# ------------------------------------------------------------------------------------------
# Saving and loading a rendered world


_ARRAY_FIELDS = EMBEDDING_FIELDS + ("train_image_labels", "train_caption_image",
                                    "valid_image_labels", "valid_caption_image", "oracle_bases")


def save_world(rendered: RenderedWorld, directory: str | Path) -> None:
    """Write a rendered world as one .npy per array and a JSON manifest (written last)."""
    directory = Path(directory)
    for name in _ARRAY_FIELDS:
        atomic_save_npy(directory / f"{name}.npy", getattr(rendered, name))
    text = {f.name: getattr(rendered, f.name) for f in fields(RenderedWorld)
            if f.name not in _ARRAY_FIELDS and f.name not in ("backbone", "world_config")}
    atomic_write_json(directory / MANIFEST, {
        "format": FORMAT_VERSION, "backbone": asdict(rendered.backbone),
        "world_config": rendered.world_config.to_dict(), **text,
    })


def load_world(directory: str | Path) -> RenderedWorld:
    """Read a world written by :func:`save_world`."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no complete synthetic world (no {MANIFEST})")
    meta = json.loads(path.read_text())
    if meta.pop("format", None) != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported synthetic world format")
    arrays = {name: np.load(directory / f"{name}.npy") for name in _ARRAY_FIELDS}
    meta["query_categories"] = {q: int(c) for q, c in meta["query_categories"].items()}
    return RenderedWorld(**arrays, **{k: v for k, v in meta.items()
                                      if k not in ("backbone", "world_config")},
                         backbone=BackboneSpec(**meta["backbone"]),
                         world_config=WorldConfig.from_dict(meta["world_config"]))
