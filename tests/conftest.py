"""Shared fixtures: small random training collections and retrieval data."""

from pathlib import Path

import numpy as np
import pytest

from quari.store import EmbeddingSet, TrainingCollection, l2_normalize

ROOT = Path(__file__).resolve().parents[1]


def random_collection(rng, dim=16, instances=12, views=3, captions_per_image=2, prefix="t"):
    centres = rng.standard_normal((instances, dim))
    labels = np.repeat(np.arange(instances), views)
    images = l2_normalize(centres[labels] + 0.4 * rng.standard_normal((len(labels), dim)))
    ids = [f"{prefix}{i // views:03d}/v{i % views}" for i in range(len(labels))]
    caption_image = np.repeat(np.arange(len(labels)), captions_per_image)
    captions = l2_normalize(images[caption_image] + 0.5 * rng.standard_normal((len(caption_image), dim)))
    return TrainingCollection(
        images=EmbeddingSet(images, ids), image_labels=labels,
        captions=EmbeddingSet(captions, [f"cap{i}" for i in range(len(caption_image))]),
        caption_image=caption_image, name="random")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
