"""One conformance test over every registered method (scikit-learn style), and the registry."""

import inspect

import numpy as np
import pytest
import torch

from quari.methods import available_methods, get_method
from baselines.local_features.matching import save_local_descriptors
from quari.methods import RetrievalMethod
from quari.mining import mine_semipositives

from tests.builders import random_collection

DIM = 16

#: small hyperparameters so every method fits in a second; a new method needs no entry here
#: unless its defaults are slow
FAST_PARAMS = {
    "quari": {"model": {"hidden_dim": 32, "nhead": 2, "num_layers": 1, "num_steps": 2, "rank": 4},
              "train": {"max_steps": 5, "batch_size": 16, "eval_every": 5}},
    "linear_adaptation": {"out_dim": 8, "epochs": 2, "batch_size": 8},
}


def _oracle_file(tmp_path, rng, query_ids, train):
    path = tmp_path / "oracle.npz"
    bases = np.linalg.qr(rng.standard_normal((3, DIM, 4)))[0].astype(np.float32)
    np.savez(path, bases=bases, query_ids=np.array(query_ids),
             query_categories=rng.integers(0, 3, len(query_ids)))
    return str(path)


def _semipositives(tmp_path, rng, query_ids, train):
    return mine_semipositives(np.asarray(train.images.embeddings), train.images.ids, k=5, top_n=2)


def _local_descriptors(tmp_path, rng, query_ids, train):
    n_db = len(train.images.ids)
    save_local_descriptors(tmp_path / "db_local.npz", train.images.ids,
                           rng.standard_normal((n_db, 10, 8)), rng.random((n_db, 10, 2)),
                           counts=rng.integers(4, 11, n_db))
    return str(tmp_path / "db_local.npz")


def _query_local_descriptors(tmp_path, rng, query_ids, train):
    n_q = len(query_ids)
    save_local_descriptors(tmp_path / "q_local.npz", query_ids, rng.standard_normal((n_q, 30, 8)),
                           rng.random((n_q, 30, 2)))
    return str(tmp_path / "q_local.npz")


def _backbone(tmp_path, rng, query_ids, train):  # the registry entry a checkpoint is checked against
    from tests.builders import tiny_backbone
    return tiny_backbone(dim=DIM)


def _gallery_images(tmp_path, rng, query_ids, train):
    from PIL import Image
    images = {}
    for n, image_id in enumerate(train.images.ids):
        images[image_id] = str(tmp_path / f"image{n}.png")
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(images[image_id])
    return images


def _query_texts(tmp_path, rng, query_ids, train):
    return {q: f"a red fox {n}" for n, q in enumerate(query_ids)}


#: every side input a method may declare (RetrievalMethod.side_inputs), built the way the
#: workflow builds it; a method declaring one missing here fails the conformance test
SIDE_INPUT_BUILDERS = {
    "oracle_file": _oracle_file, "semipositives": _semipositives,
    "local_descriptors": _local_descriptors, "query_local_descriptors": _query_local_descriptors,
    "backbone": _backbone, "gallery_images": _gallery_images, "query_texts": _query_texts,
}


def fit_context(name, tmp_path, rng, query_ids, train):
    """The side inputs the method declares, and the gallery ids for those that look candidates
    up by id."""
    cls = get_method(name)
    context = {side: SIDE_INPUT_BUILDERS[side](tmp_path, rng, query_ids, train)
               for side in cls.side_inputs}
    if hasattr(cls, "set_gallery"):
        context["gallery_ids"] = train.images.ids
    return context


def constructor_params(name, tmp_path):
    """FAST_PARAMS, plus a tiny local model for methods that load a pretrained one."""
    if name == "vlm_reranker":
        from tests.builders import build_tiny_llava
        return {"model": "llava_1.5_13b", "path": build_tiny_llava(tmp_path / "tiny_llava")}
    if name == "quari_released":  # a tiny random checkpoint in the authors' layout
        from tests.builders import save_tiny_release, tiny_backbone
        _, directory = save_tiny_release(tmp_path / "release", dim=DIM)
        return {"checkpoint": {tiny_backbone(dim=DIM).name: str(directory)}}
    if name == "ames":  # a tiny random network in the official checkpoint layout (8-dim descriptors)
        from tests.builders import save_tiny_ames_checkpoint
        return {"checkpoint": save_tiny_ames_checkpoint(tmp_path / "ames.pt")}
    return FAST_PARAMS.get(name, {})


@pytest.mark.parametrize("name", available_methods())
def test_method_conformance(name, tmp_path, rng):
    cls = get_method(name)
    assert issubclass(cls, RetrievalMethod) and cls.name == name
    train = random_collection(rng, dim=DIM)
    valid = random_collection(rng, dim=DIM, instances=4, prefix="v")
    queries = train.images.embeddings[:5].astype(np.float32)
    query_ids = [f"q{i}" for i in range(5)]
    gallery = np.asarray(train.images.embeddings, dtype=np.float32)

    method = cls(**constructor_params(name, tmp_path), device="cpu")
    assert method.fit(train, valid, workdir=tmp_path / "work",
                      **fit_context(name, tmp_path, rng, query_ids, train)) is method

    k = 7
    if cls.reranker_only:
        with pytest.raises(NotImplementedError):
            method.search(queries, gallery, k, chunk_rows=5, query_ids=query_ids)
    else:
        scores, idx = method.search(queries, gallery, k, chunk_rows=5, query_ids=query_ids)
        assert scores.shape == idx.shape == (5, k)
        assert torch.all(scores[:, :-1] >= scores[:, 1:] - 1e-6), "search must sort descending"
        if cls.scores_rows_independently:
            # brute force: score every row at once and sort
            with torch.no_grad():
                full = method.score(method.prepare(torch.from_numpy(queries), query_ids),
                                    torch.from_numpy(gallery))
        else:  # scores depend on the rows ranked together: search = re-ranking the whole gallery
            everything = np.tile(np.arange(len(gallery)), (5, 1))
            full = method.rerank(queries, gallery, everything, query_ids=query_ids)
        ref = torch.sort(full, dim=1, descending=True, stable=True)
        torch.testing.assert_close(scores, ref.values[:, :k], atol=1e-5, rtol=1e-5)
        assert (idx == ref.indices[:, :k]).float().mean() > 0.9  # ties may swap

    shortlist = np.stack([rng.permutation(len(gallery))[:6] for _ in range(5)])
    rr = method.rerank(queries, gallery, shortlist, query_ids=query_ids)
    assert rr.shape == shortlist.shape
    if cls.scores_rows_independently and not cls.reranker_only:
        # re-ranking a shortlist gives each candidate the score it has in the full ranking
        torch.testing.assert_close(rr, torch.gather(full, 1, torch.from_numpy(shortlist)),
                                   atol=1e-5, rtol=1e-5)
    elif cls.scores_rows_independently:
        # brute force: every (query, candidate) pair re-ranked on its own
        alone = torch.tensor([[method.rerank(queries[b:b + 1], gallery, shortlist[b:b + 1, j:j + 1],
                                             query_ids=query_ids[b:b + 1]).item()
                               for j in range(shortlist.shape[1])] for b in range(5)])
        torch.testing.assert_close(rr, alone, atol=1e-5, rtol=1e-5)
    else:
        # the candidate set matters, its order does not
        perm = rng.permutation(shortlist.shape[1])
        torch.testing.assert_close(method.rerank(queries, gallery, shortlist[:, perm], query_ids=query_ids),
                                   rr[:, perm], atol=1e-5, rtol=1e-5)

    # save / load round trip
    method.save(tmp_path / "saved")
    again = cls.load(tmp_path / "saved", device="cpu")
    if cls.reranker_only:
        torch.testing.assert_close(again.rerank(queries, gallery, shortlist, query_ids=query_ids), rr,
                                   atol=1e-5, rtol=1e-5)
    else:
        s2, i2 = again.search(queries, gallery, k, query_ids=query_ids)
        torch.testing.assert_close(s2, scores, atol=1e-5, rtol=1e-5)


def test_unknown_method_lists_the_registry():
    with pytest.raises(KeyError) as err:
        get_method("no_such_method")
    assert "identity" in str(err.value) and "linear_adaptation" in str(err.value)


def test_registry_has_the_first_methods():
    assert {"identity", "linear_adaptation", "quari", "oracle"} <= set(available_methods())


def test_loading_a_different_method_is_refused(tmp_path):
    ident = get_method("identity")(device="cpu")
    ident.save(tmp_path)
    with pytest.raises(ValueError, match="identity"):
        get_method("linear_adaptation").load(tmp_path)


@pytest.mark.parametrize("name", available_methods())
def test_declarations_are_consistent(name, tmp_path):
    """What a method declares (quari.methods.RetrievalMethod's class attributes) is what the
    workflow reads: side inputs it knows, benchmarks and query types that exist, shared settings
    of the `quari` block, and a label its parameters can fill."""
    cls = get_method(name)
    assert set(cls.side_inputs) <= set(SIDE_INPUT_BUILDERS)
    assert cls.benchmarks is None or set(cls.benchmarks) <= {"ilias", "ilias_mini", "inquire",
                                                             "inquire_rerank"}
    assert cls.query_types and set(cls.query_types) <= {"image", "text"}
    assert set(cls.shared_settings) <= {"model", "train", "image_query_fraction"}
    assert set(cls.nested_params) <= set(inspect.signature(cls.__init__).parameters)
    assert not (cls.trainable and not cls.uses_training_data and not cls.side_inputs)
    assert cls.reranker or not cls.reranker_only  # a re-ranker only is a re-ranker
    label = cls(**constructor_params(name, tmp_path), device="cpu").display_label()
    assert label and "{" not in label


def test_a_label_names_the_parameters():
    assert get_method("alpha_qe")(neighbours=2, device="cpu").display_label() == "α-QE (n=2)"
    assert get_method("quari")(device="cpu").display_label() == "QuARI"


def test_packages_named_in_the_environment_are_searched(tmp_path, monkeypatch):
    package = tmp_path / "my_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "doubled.py").write_text(
        "from quari.methods import StaticProjectionMethod\n\n\n"
        "class Doubled(StaticProjectionMethod):\n"
        "    name = 'toy_doubled'\n    label = 'doubled ({factor})'\n    trainable = False\n\n"
        "    def __init__(self, factor: float = 2.0, device=None):\n"
        "        super().__init__(factor=factor, device=device)\n\n"
        "    def embed(self, x):\n        return self.params['factor'] * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "toy_doubled" not in available_methods()
    monkeypatch.setenv("QUARI_METHOD_PACKAGES", "my_methods")
    cls = get_method("toy_doubled")
    assert cls(factor=3, device="cpu").display_label() == "doubled (3)"
    # a module file named by its path: its folder need not be on the import path
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "halved.py").write_text(
        (package / "doubled.py").read_text().replace("Doubled", "Halved")
        .replace("toy_doubled", "toy_halved"))
    monkeypatch.setenv("QUARI_METHOD_PACKAGES", f"my_methods,{tmp_path / 'elsewhere' / 'halved.py'}")
    assert {"toy_doubled", "toy_halved"} <= set(available_methods())
