"""The INQUIRE-Rerank VLM re-ranker on a tiny random LLaVA built here (CLIP vision tower, Llama
language model, a word-level tokenizer with "Yes"/"No" tokens), saved and reloaded through the
baseline's normal path: scores against P(Yes) / (P(Yes) + P(No)) recomputed from the model's
logits, the ranking the harness builds from them, persistence and errors."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from quari.methods import get_method
from baselines.vlm.reranker import VLMReranker
from quari import metrics
from quari.evaluation import RetrievalTask, evaluate_rerank
from quari.store import EmbeddingSet, l2_normalize
from baselines.vlm.scorer import INQUIRE_TEMPERATURE, VLMS, answer_token, get_vlm, yes_probability
from tests.builders import build_tiny_llava


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six gallery images (one corrupt), a TSV of them, and three text queries."""
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(6)]
    for i, name in enumerate(ids):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + 60 * rng.standard_normal((18 + 3 * i, 24, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{name}.png")
    good = (root / "img3.png").read_bytes()
    (root / "img3.png").write_bytes(good[:40])  # truncated: cannot be decoded
    (root / "images.tsv").write_text("".join(f"{i}\t{i}.png\n" for i in ids))
    texts = {"q0": "a red fox", "q1": "a bird on a branch", "q2": "a green frog"}
    return dict(root=root, ids=ids, texts=texts, tsv=root / "images.tsv")


@functools.lru_cache(maxsize=2)
def load_reference(model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    return (AutoProcessor.from_pretrained(model_dir),
            LlavaForConditionalGeneration.from_pretrained(model_dir).eval())


def reference_score(model_dir, image_path, query):
    """P(Yes) / (P(Yes) + P(No)) for one pair, from a plain forward pass of the model."""
    processor, model = load_reference(model_dir)
    prompt = ("USER: <image>\nDoes this picture show " + query + "?Answer the question with "
              "either \"Yes\" or \"No\" and nothing else.\nASSISTANT:")
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt,
                       return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double().numpy()
    p = np.exp(logits / INQUIRE_TEMPERATURE - np.max(logits / INQUIRE_TEMPERATURE))
    p /= p.sum()
    yes, no = (processor.tokenizer.convert_tokens_to_ids(w) for w in ("Yes", "No"))
    return p[yes] / (p[yes] + p[no])


def test_registry_lists_the_open_models_of_table_3b():
    assert set(VLMS) == {"blip2_flant5xxl", "instructblip_t5xxl", "paligemma_3b_mix_448",
                         "llava_1.5_13b", "llava_1.6_7b", "llava_1.6_34b"}
    for spec in VLMS.values():
        assert spec.prompt.count("{query}") == 1
        assert "Does this picture show" in spec.question("x")
        assert ("<image>" in spec.prompt) == spec.name.startswith("llava")
    assert get_vlm("llava_1.5_13b").question("a {weird} query").count("a {weird} query") == 1
    for closed in ("gpt_4v", "gpt_4o", "vila_13b"):
        with pytest.raises(KeyError, match="not runnable"):
            get_vlm(closed)
    with pytest.raises(KeyError):
        VLMReranker(model="gpt_4o")


def test_yes_probability_is_the_two_way_softmax():
    logits = torch.tensor([[2.0, -1.0, 0.5, 30.0], [0.0, 0.0, 0.0, 0.0]])
    ratio, mass = yes_probability(logits, yes=0, no=2, temperature=0.7)
    p = torch.softmax(logits.double() / 0.7, dim=-1)
    torch.testing.assert_close(ratio, p[:, 0] / (p[:, 0] + p[:, 2]))
    torch.testing.assert_close(mass, p[:, 0] + p[:, 2])
    assert ratio[1] == 0.5 and mass[0] < 1e-6  # row 0 mostly answers something else


def test_answer_token_follows_the_benchmark_and_checks_it(tiny_llava):
    from transformers import AutoProcessor
    tokenizer = AutoProcessor.from_pretrained(tiny_llava).tokenizer
    assert answer_token(tokenizer, "Yes", 1) == tokenizer.convert_tokens_to_ids("Yes")
    with pytest.raises(ValueError, match="not the answer word"):
        answer_token(tokenizer, "Yes", 0)  # the BOS, as a T5-style index would pick here


def test_rerank_scores_are_p_yes_over_p_yes_plus_p_no(tiny_llava, world, caplog):
    method = VLMReranker(model="llava_1.5_13b", path=tiny_llava, batch_size=2, device="cpu")
    gallery_ids = ["img5", "img0", "img3", "img1", "img4", "img2"]  # row order != file order
    method.fit(None, gallery_images=world["tsv"], query_texts=world["texts"],
               gallery_ids=gallery_ids)
    gallery = np.zeros((6, 4), dtype=np.float32)  # embeddings are not used
    shortlist = np.array([[0, 1, 2, 3, 4], [5, 4, 3, 1, 0]])
    got = method.rerank(gallery[:2], gallery, shortlist, query_ids=["q1", "q0"])
    assert got.shape == (2, 5)
    for b, qid in enumerate(["q1", "q0"]):
        for j, row in enumerate(shortlist[b]):
            gid = gallery_ids[row]
            if gid == "img3":  # the corrupt image is ranked last
                assert got[b, j] == -np.inf
                continue
            ref = reference_score(tiny_llava, world["root"] / f"{gid}.png", world["texts"][qid])
            assert got[b, j].item() == pytest.approx(ref, abs=1e-6)
    assert "img3" in caplog.text
    finite = got[torch.isfinite(got)]
    assert finite.max() - finite.min() > 1e-3  # the images really are told apart
    with pytest.raises(NotImplementedError):
        method.search(gallery[:1], gallery, 3, query_ids=["q0"])
    with pytest.raises(KeyError, match="query"):
        method.rerank(gallery[:1], gallery, shortlist[:1], query_ids=["nope"])


def test_the_harness_orders_candidates_by_the_score(tiny_llava, world, tmp_path):
    """evaluate_rerank on an INQUIRE-shaped task: its metrics are those of the shortlist sorted
    by the reference score."""
    rng = np.random.default_rng(1)
    gallery_ids = [i for i in world["ids"] if i != "img3"]
    gallery = EmbeddingSet(l2_normalize(rng.standard_normal((5, 8))), gallery_ids)
    queries = EmbeddingSet(l2_normalize(rng.standard_normal((3, 8))), ["q0", "q1", "q2"])
    positives = {"q0": {"img0", "img4"}, "q1": {"img2"}, "q2": {"img1", "img5", "img0"}}
    task = RetrievalTask("t2i", queries, gallery, positives)
    cls = get_method("vlm_reranker")  # through the registry, as the workflow finds it
    method = cls(model="llava_1.5_13b", path=tiny_llava, device="cpu").fit(
        None, gallery_images=world["tsv"], query_texts=world["texts"])
    method.set_gallery(gallery.ids)  # what the evaluation script does
    result = evaluate_rerank(method, task, "inquire", shortlist=4, k=4)
    relevance = []
    for q, qid in enumerate(queries.ids):
        shortlist = np.argsort(-(gallery.embeddings @ queries.embeddings[q]), kind="stable")[:4]
        ref = [reference_score(tiny_llava, world["root"] / f"{gallery_ids[r]}.png",
                               world["texts"][qid]) for r in shortlist]
        ranked = [gallery_ids[shortlist[j]] for j in np.argsort(-np.array(ref), kind="stable")]
        relevance.append(metrics.relevance_of(ranked, positives[qid]))
    expected = metrics.inquire_rerank_metrics(relevance)
    assert result["metrics"]["mAP@50"] == pytest.approx(expected["mAP"])
    assert result["metrics"]["MRR"] == pytest.approx(expected["MRR"])
    assert result["metrics"]["nDCG@50"] == pytest.approx(expected["nDCG"])


def test_save_and_load_restore_the_inputs(tiny_llava, world, tmp_path):
    method = VLMReranker(model="llava_1.5_13b", path=tiny_llava, device="cpu").fit(
        None, gallery_images=world["tsv"], query_texts=world["texts"],
        gallery_ids=world["ids"])
    gallery = np.zeros((6, 4), dtype=np.float32)
    shortlist = np.array([[0, 1, 2], [5, 4, 0]])
    before = method.rerank(gallery[:2], gallery, shortlist, query_ids=["q0", "q2"])
    method.save(tmp_path / "saved")
    loaded = VLMReranker.load(tmp_path / "saved", device="cpu")
    assert loaded.params["model"] == "llava_1.5_13b" and loaded.scorer_ is None  # loaded lazily
    torch.testing.assert_close(loaded.rerank(gallery[:2], gallery, shortlist,
                                             query_ids=["q0", "q2"]), before)


def test_missing_inputs_fail_clearly(tiny_llava, world):
    method = VLMReranker(model="llava_1.5_13b", path=tiny_llava, device="cpu")
    with pytest.raises(ValueError, match="query texts"):
        method.fit(None, gallery_images=world["tsv"])
    method.fit(None, gallery_images={"img0": str(world["root"] / "img0.png")},
               query_texts=world["texts"])
    gallery = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(RuntimeError, match="gallery ids"):
        method.rerank(gallery[:1], gallery, np.array([[0, 1]]), query_ids=["q0"])
    method.set_gallery(["img0", "img1"])
    with pytest.raises(KeyError, match="img1"):  # no image given for a shortlisted id
        method.rerank(gallery[:1], gallery, np.array([[0, 1]]), query_ids=["q0"])
    method.fit(None, gallery_images={"img0": b"bytes"}, query_texts=world["texts"])
    with pytest.raises(ValueError, match="not a path"):
        method.save_state(world["root"])


@pytest.mark.gpu
def test_cuda_half_precision_matches_cpu(tiny_llava, world):
    ids = ["img0", "img1", "img2", "img4"]
    scores = {}
    for device in ("cpu", "cuda"):
        method = VLMReranker(model="llava_1.5_13b", path=tiny_llava, device=device).fit(
            None, gallery_images=world["tsv"], query_texts=world["texts"], gallery_ids=ids)
        assert method.scorer().model.dtype == (torch.float32 if device == "cpu"
                                               else torch.bfloat16 if torch.cuda.is_bf16_supported()
                                               else torch.float16)
        scores[device] = method.rerank(np.zeros((1, 2)), np.zeros((4, 2)),
                                       np.array([[0, 1, 2, 3]]), query_ids=["q0"])
    torch.testing.assert_close(scores["cuda"], scores["cpu"], atol=2e-2, rtol=0)
