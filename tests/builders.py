"""What several test modules build: tiny random networks saved as their hubs save them (CLIP,
SigLIP, DINOv2, an AMES detector and AMES networks, LLaVA, the authors' released QuARI), files in
the benchmarks' official formats (ILIAS, INQUIRE, INQUIRE-Rerank, COCO / CC12M / UnED), toy
training data, configurations and the workflow runner. Test modules import from here, never from
each other. Everything is written under the folder a test passes (its ``tmp_path``)."""

import dataclasses
import hashlib
import http.server
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from baselines.local_features.ames_network import AMES, AMESConfig, AMESDetector
from quari.backbones import BackboneInfo, get_backbone
from quari.mining import mine_semipositives
from quari.model import QuARIConfig
from quari.store import EmbeddingSet, TrainingCollection, l2_normalize
from quari.training import TrainConfig, make_training_data
from quari.transform import QueryTransform

# ----------------------------------------------------------------------------- the repository, collections
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


# ----------------------------------------------------------------------------- running the workflow
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def snakemake(workdir, *args, timeout=900, cores=True):
    """Run this repository's workflow in ``workdir`` (on 2 cores unless ``cores`` is False, e.g.
    when a profile sets them), with this checkout first on the import path."""
    cmd = [str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           *(["--cores", "2"] if cores else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def dry_run_jobs(output: str) -> list[dict[str, str]]:
    """The jobs of a dry run's listing, in order: ``{"rule": name, "input": text, "output":
    text, "resources": text, "priority": text}`` from the lines under each ``rule name:`` (a
    field it lacks is absent; Snakemake lists a priority only when it is not 0)."""
    jobs: list[dict[str, str]] = []
    for line in output.splitlines():
        line = line.strip()
        match = re.match(r"^(?:local)?rule (\w+):", line)
        if match:
            jobs.append({"rule": match.group(1)})
        elif jobs:
            key, colon, value = line.partition(":")
            if colon and key in ("input", "output", "resources", "priority"):
                jobs[-1].setdefault(key, value.strip())
    return jobs


def _first_output(job: dict[str, str]) -> str:
    return job["output"].split(",")[0].strip()


def scheduled_jobs(output: str) -> dict[str, list[str]]:
    """``{rule: [first output of each job]}`` from a dry run's job listing."""
    jobs: dict[str, list[str]] = {}
    for job in dry_run_jobs(output):
        if "output" in job:
            jobs.setdefault(job["rule"], []).append(_first_output(job))
    return jobs


def scheduled_inputs(output: str, rule_name: str) -> dict[str, list[str]]:
    """``{first output: inputs}`` of every job of ``rule_name`` in a dry run's job listing."""
    return {_first_output(job): ([i.strip() for i in job["input"].split(",")]
                                 if "input" in job else [])
            for job in dry_run_jobs(output) if job["rule"] == rule_name and "output" in job}


def job_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """``[(rule, {resource: value})]`` of every job in a dry run's listing."""
    return [(job["rule"], {k.strip(): v.strip() for k, v in
                           (kv.split("=", 1) for kv in job["resources"].split(", "))})
            for job in dry_run_jobs(output) if "resources" in job]


TINY_SIZES = {"patch_size": 8, "train_resolution": 32, "test_resolution": 40}


def tiny_real_config(data_root: Path, models: Path, precomputed: str) -> dict:
    both = ["tiny-clip", "tiny-siglip"]
    return {
        "run_id": "tiny-real",
        "data": "real",
        "device": "cpu",
        "real": {
            "data_root": str(data_root),
            "download": False,
            "embedding": {"batch_size": 4, "num_workers": 0, "shard_rows": 5},
            "models": {
                "tiny-clip": {"path": str(models / "clip"), "like": "clip-vit-b16@224",
                              "embed_dim": 24, **TINY_SIZES},
                "tiny-siglip": {"path": str(models / "siglip"), "like": "siglip2-vit-b16@512",
                                "embed_dim": 32, **TINY_SIZES},
            },
            "ilias": {"mini_shards": 2, "yfcc_shards": 2},
            # one job per YFCC / mini-ILIAS shard, the iNat24 pool in two slices
            "fan_out": {"ilias_yfcc_shards_per_job": 1, "ilias_mini_shards_per_job": 1,
                        "inquire_pool_jobs": 2,
                        # CC12M one tar per part, UnED in three slices; COCO one part
                        "collection_jobs": {"cc12m": 2, "uned": 3},
                        "local_descriptor_jobs": 2},  # Table 3a's shortlist in two halves
            "local_descriptors": {"model": str(models / "dinov2"), "resolution": 32,
                                  "query_descriptors": 12, "database_descriptors": 6,
                                  "batch_size": 2, "num_workers": 0, "shortlist_margin": 2,
                                  "saliency": "ames_detector",
                                  "detector": str(models / "ames_detector.pt")},
            "inquire": {"split": "test", "precomputed": {"tiny-clip": precomputed}},
            "collections": {"coco": {"format": "coco", "max_images": 6},
                            "cc12m": {"format": "webdataset"},
                            "uned": {"format": "uned"}},
            "training_sets": {"captions": ["coco", "cc12m"], "uned": ["uned"]},
            "default_training_set": "captions",
            "valid_fraction": 0.35,  # coco: 4 images, UnED: one (class, domain) pair held out
        },
        "evaluations": [
            {"benchmarks": ["ilias", "ilias_mini", "inquire"], "backbones": both,
             "methods": ["identity", "quari"]},
            {"benchmarks": ["ilias"], "backbones": ["tiny-siglip"],
             "methods": ["linear_adaptation", "quari_uned"]},
            {"benchmarks": ["inquire_rerank"], "backbones": ["tiny-siglip"],
             "methods": ["identity", "quari", "llava_1.5_13b"]},
            {"benchmarks": ["ilias"], "backbones": ["tiny-siglip"],   # Table 3a, local features
             "methods": ["chamfer", "spatial_verification", "ames"]},
        ],
        "backbones": both,
        "evaluation": {"ilias": {"k": 10, "rerank_shortlist": 8}, "inquire": {"k": 5}},
        "mining": {"k": 3},
        "methods": {"identity": {}, "quari": {},
                    "linear_adaptation": {"epochs": 1, "training_set": "uned"},
                    "quari_uned": {"type": "quari", "training_set": "uned",
                                   "image_query_fraction": 1.0},
                    "chamfer": {}, "spatial_verification": {"iterations": 50},
                    "ames": {"checkpoint": str(models / "ames.pt")},
                    "llava_1.5_13b": {"type": "vlm_reranker", "model": "llava_1.5_13b",
                                      "path": str(models / "llava"), "batch_size": 5}},
        "quari": {"model": {"hidden_dim": 16, "nhead": 2, "num_layers": 1, "num_steps": 1, "rank": 4},
                  "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3},
                  "image_query_fraction": 0.0},
        "figures": {"tsne": {"backbone": "tiny-siglip", "distractors": 10},
                    "cost_accuracy": {"backbone": "tiny-siglip"}},
    }


TINY = {
    "run_id": "tiny",
    "data": "synthetic",
    "synthetic": {
        "seed": 3,
        "world": {"num_categories": 8, "num_train_instances": 120, "num_valid_instances": 24,
                  "num_eval_instances": 24, "num_distractors": 200, "inquire_num_queries": 6,
                  "inquire_num_distractors": 150, "groups_per_category": 4},
        "backbones": {"tiny-a": {"dim": 160, "noise": 0.05}, "tiny-b": {"dim": 192, "noise": 0.03}},
    },
    "backbones": ["tiny-a", "tiny-b"],
    "evaluation": {"ilias": {"k": 100, "rerank_shortlist": 50}, "inquire": {"k": 20}},
    "mining": {"k": 10},
    "methods": {"identity": {}, "linear_adaptation": {"epochs": 1}, "quari": {}, "oracle": {}},
    "quari": {"model": {"hidden_dim": 32, "nhead": 2, "num_layers": 1, "num_steps": 2, "rank": 4},
              "train": {"max_steps": 6, "batch_size": 32, "eval_every": 3}},
    "figures": {"tsne": {"backbone": "tiny-b", "distractors": 60}, "cost_accuracy": {"backbone": "tiny-b"}},
}


# ----------------------------------------------------------------------------- the paper's numbers and evaluation results
PAPER_CSV = ROOT / "workflow/resources/paper_numbers.csv"


PAPER = pd.read_csv(PAPER_CSV)


def evaluation(method, method_type, backbone, benchmark="ilias", data="real", gallery=100_000_000,
               i2i=0.1, t2i=0.2, rerank_extra=None, full_pool=None):
    """An evaluation JSON as the harness writes it; ``full_pool`` (INQUIRE-Rerank only) adds the
    full-pool scoring entry: its metrics (mAP@50 = ``full_pool["ap"]``) and per-query counts."""
    search = lambda v, k: {"metrics": {k: v}, "gallery_size": gallery, "ms_per_1k_pairs": 1.0,  # noqa: E731
                           "shortlist": "all"}
    rerank = lambda v, k: {"metrics": {k: v}, "shortlist": 1000, "ms_per_1k_pairs": 2.0,  # noqa: E731
                           **(rerank_extra or {})}
    tasks = ({"i2i": {"search": search(i2i, "mAP@1k"), "rerank": rerank(i2i, "mAP@1k")},
              "t2i": {"search": search(t2i, "mAP@1k"), "rerank": rerank(t2i, "mAP@1k")}}
             if benchmark == "ilias" else
             {"t2i": {"search": {"metrics": {"mAP@50": i2i, "nDCG@50": t2i, "MRR": 0.5},
                                 "gallery_size": gallery, "ms_per_1k_pairs": 1.0, "shortlist": "all"},
                      "rerank": {"metrics": {"mAP@50": i2i, "nDCG@50": t2i, "MRR": 0.5},
                                 "shortlist": 100, "ms_per_1k_pairs": 2.0, "ms_per_100_pairs": 0.2,
                                 **(rerank_extra or {})}}})
    if full_pool is not None:
        tasks["t2i"]["rerank_full_pool"] = {
            "metrics": {"mAP@50": full_pool["ap"], "nDCG@50": 0.3, "MRR": 0.4}, "k": 50,
            "shortlist": 100, "ms_per_1k_pairs": 2.0, "ms_per_100_pairs": 0.2,
            "shortlist_source": "benchmark",
            **{k: v for k, v in full_pool.items() if k != "ap"}}
    return {"run_id": "r", "data": data, "benchmark": benchmark, "backbone": backbone,
            "method": method, "method_type": method_type, "gallery_size": gallery, "tasks": tasks}


# ----------------------------------------------------------------------------- tiny CLIP and SigLIP
WORDS = ["a", "red", "bird", "on", "branch", "photo", "of", "the", "cat"]


def _save_word_tokenizer(directory: Path) -> None:
    """A tiny WordLevel tokenizer saved as a PreTrainedTokenizerFast (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="[EOS]").save_pretrained(directory)


TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def save_tiny_siglip(directory: Path, seed: int = 0) -> BackboneInfo:
    """A randomly initialised tiny SigLIP and its tokenizer saved in ``directory``, and a
    registry entry describing it (loaded through the same path as hub models)."""
    from transformers import SiglipConfig, SiglipModel
    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(TOWER, vocab_size=len(WORDS) + 3, max_position_embeddings=16,
                         pad_token_id=0, eos_token_id=2),
        vision_config=dict(TOWER, image_size=32, patch_size=8))
    SiglipModel(config).save_pretrained(directory)
    _save_word_tokenizer(directory)
    return dataclasses.replace(get_backbone("siglip2-vit-b16@512"), name="tiny-siglip",
                               embed_dim=32, patch_size=8, train_resolution=32, test_resolution=40)


def save_tiny_clip(directory: Path) -> None:
    """A randomly initialised tiny CLIP (24-d embeddings) and its tokenizer saved in ``directory``."""
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(TOWER, vocab_size=len(WORDS) + 3, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(TOWER, image_size=32, patch_size=8), projection_dim=24)
    CLIPModel(config).save_pretrained(directory)
    _save_word_tokenizer(directory)


# ----------------------------------------------------------------------------- files in the benchmarks' official formats
INSTANCES = ["bold_bimp_000", "calm_cork_001", "dark_dune_002"]


def jpeg_bytes(seed: int, size=(24, 18)) -> bytes:
    """A small random-colour JPEG."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A plain tar of ``{member name: bytes}`` in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def shard_sample(key: str, seed: int, url: bool = True) -> dict[str, bytes]:
    members = {f"{key}.jpg": jpeg_bytes(seed), f"{key}.bbox.json": b"[[1, 2, 10, 8]]"}
    if url:
        members[f"{key}.download_url.txt"] = f"https://example.org/{seed}.jpg".encode()
    return members


def make_ilias(root: Path, distractors_per_shard: int = 6, mini_shards: int = 2,
               yfcc_shards: int = 2) -> dict:
    """ILIAS in its official layouts under ``root`` (= data_root/ilias): the extracted
    ``server/ilias_core/`` (images, bbox and text files), mini-ILIAS shards, YFCC100M shards and
    id lists; returns the expected ids."""
    queries, positives, texts = [], [], []
    core = root / "server" / "ilias_core"
    seed = 0
    for n, inst in enumerate(INSTANCES):
        (core / inst / "query").mkdir(parents=True, exist_ok=True)
        (core / inst / "pos").mkdir(parents=True, exist_ok=True)
        for q in range(1 + n % 2):
            name = f"{inst}/query/Q{n:03d}_{q:02d}"
            (core / f"{name}.jpg").write_bytes(jpeg_bytes(seed := seed + 1))
            (core / f"{name}_bbox.txt").write_text("1 2 10 8\n")
            queries.append(f"{name}.jpg")
        for p in range(2 + n):
            name = f"{inst}/pos/P{n:03d}_{p:02d}"
            (core / f"{name}.jpg").write_bytes(jpeg_bytes(seed := seed + 1))
            (core / f"{name}_bbox.txt").write_text("1 2 10 8\n")
            positives.append(f"{name}.jpg")
        text = core / inst / "query" / f"T{n:03d}.txt"
        text.write_text(f"a {WORDS[n + 1]} {WORDS[n + 2]} on the branch\n")
        texts.append(f"{inst}/query/T{n:03d}.txt")
    mini, yfcc = [], []
    for s in range(mini_shards):
        name = f"mini_ilias_yfcc100m-{s:06d}.tar"
        keys = [f"{9000 + 10 * s + d}" for d in range(distractors_per_shard)]
        write_tar(root / "hf" / name,
                  {k: v for d, key in enumerate(keys) for k, v in shard_sample(key, 500 + 10 * s + d).items()})
        mini += [f"{name}/{k}" for k in keys]
    for s in range(yfcc_shards):
        name = f"yfcc100m_{s:06d}.tar"
        keys = [f"{7000 + 10 * s + d}" for d in range(distractors_per_shard + 1)]
        write_tar(root / "server" / "yfcc100m" / name,
                  {k: v for d, key in enumerate(keys) for k, v in shard_sample(key, 800 + 10 * s + d).items()})
        yfcc += [f"{name}/{k}" for k in keys]
    ids = root / "server" / "image_ids"
    ids.mkdir(parents=True)
    (ids / "image_query_ids.txt").write_text("".join(f"{q},0.1\n" for q in queries))
    (ids / "text_query_ids.txt").write_text("".join(f"{t}\n" for t in texts))
    (ids / "positive_ids.txt").write_text("".join(f"{p},0.2,10\n" for p in positives))
    return {"queries": queries, "positives": positives, "texts": texts, "mini": mini, "yfcc": yfcc}


INQUIRE_QUERIES = [("3", "a red bird on a branch"), ("4", "the cat of the photo")]


# the validation split's query: a non-ASCII letter and stray spaces, as in the official CSVs
INQUIRE_VAL_QUERIES = [("9", "Hübner's  Wasp Moth mating ")]


def make_inquire(root: Path, images_per_class: int = 4, dim: int = 24) -> dict:
    """INQUIRE Fullrank CSVs (both splits; the official files carry a leading index column), an
    iNat24 image folder and a clip-retrieval folder of the same pool under ``root``
    (= data_root/inquire); returns the pool ids, the test split's ground truth (``truth``) and
    the validation split's (``val_truth``)."""
    import pandas as pd
    root.mkdir(parents=True, exist_ok=True)
    for name, queries in (("test", INQUIRE_QUERIES), ("val", INQUIRE_VAL_QUERIES)):
        pd.DataFrame({"query_id": [int(q) for q, _ in queries],
                      "query_text": [t for _, t in queries],
                      "supercategory": ["Context", "Behavior"][:len(queries)],
                      "category": ["x", "y"][:len(queries)],
                      "iconic_group": ["Birds", "Mammals"][:len(queries)]}).to_csv(
            root / f"inquire_queries_{name}.csv")
    pool = []
    for c, cls in enumerate(["00001_Animalia_Aves_a", "00002_Animalia_Mammalia_b"]):
        for i in range(images_per_class):
            rel = f"train/{cls}/{c:02d}-{i:04d}-uuid.jpg"
            path = root / "inat24" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(100 + 10 * c + i))
            pool.append(rel)
    truth = {"3": pool[:2], "4": [pool[images_per_class]]}
    val_truth = {"9": pool[images_per_class:]}
    rows = [(int(q), n, p) for q, ps in {**truth, **val_truth}.items() for n, p in enumerate(ps)]
    rows.append((9, 99, val_truth["9"][0]))  # an image annotated twice counts once
    pd.DataFrame(rows, columns=["query_id", "image_id", "image_path"]).to_csv(
        root / "inquire_annotations.csv", index=False)
    emb = root / "embeddings" / "vit-b-16"  # named as INQUIRE names its OpenAI ViT-B/16 folder
    rng = np.random.default_rng(0)
    (emb / "img_emb").mkdir(parents=True)
    (emb / "metadata").mkdir()
    halves = [pool[:3], pool[3:]]
    vectors = []
    for n, part in enumerate(halves):
        v = (rng.standard_normal((len(part), dim)) * 3).astype(np.float16)
        np.save(emb / "img_emb" / f"img_emb_{n}.npy", v)
        pd.DataFrame({"image_path": [p[:-4] for p in part]}).to_parquet(
            emb / "metadata" / f"metadata_{n}.parquet")
        vectors.append(v)
    return {"pool": pool, "truth": truth, "val_truth": val_truth, "precomputed": str(emb),
            "vectors": np.concatenate(vectors).astype(np.float32)}


# Fullrank's queries "9" (validation; here in decomposed Unicode, other case and spacing) and
# "3" (test): Rerank's split need not follow Fullrank's, and its texts are matched loosely
RERANK_QUERIES = ["hu\u0308bner's wasp moth Mating", "a red bird on a branch"]


def make_rerank(path: Path, candidates: int = 5) -> dict:
    """An INQUIRE-Rerank split as parquet with the real column names and embedded images; the
    two queries share one candidate image (ids repeat across queries, as in the benchmark).
    Their relevant candidates (3 and 2) are at most their positives in :func:`make_inquire`'s
    annotations (4 and 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {k: [] for k in ("image", "query", "relevant", "clip_score", "inat24_image_id",
                            "inat24_file_name", "supercategory", "category", "iconic_group")}
    expected = {}
    for qn, query in enumerate(RERANK_QUERIES):
        ids = [1000 + qn * (candidates - 1) + c for c in range(candidates)]
        relevant = [ids[c] for c in range(candidates) if (c + qn) % 2 == 0]
        expected[query] = ([str(i) for i in ids], [str(i) for i in relevant])
        for c, image_id in enumerate(ids):
            rows["image"].append({"bytes": jpeg_bytes(image_id), "path": f"{image_id}.jpg"})
            rows["query"].append(query)
            rows["relevant"].append(int(image_id in relevant))
            rows["clip_score"].append(float(1 - c / 10))
            rows["inat24_image_id"].append(image_id)
            rows["inat24_file_name"].append(f"train/x/{image_id}.jpg")
            rows["supercategory"].append("Context")
            rows["category"].append("c")
            rows["iconic_group"].append("Birds")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=3)
    return expected


def make_collections(root: Path) -> dict:
    """MS-COCO captions, a CC12M-style shard and the UnED list under ``root`` (= data_root)."""
    coco = root / "coco"
    (coco / "train2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    images, annotations = [], []
    for i in range(8):
        name = f"{i + 1:012d}.jpg"
        (coco / "train2017" / name).write_bytes(jpeg_bytes(300 + i))
        images.append({"id": i + 1, "file_name": name, "height": 18, "width": 24})
        for c in range(2):
            annotations.append({"id": 100 + 2 * i + c, "image_id": i + 1,
                                "caption": f"{WORDS[(i + c) % 9]} {WORDS[(i + 3) % 9]} photo"})
    (coco / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images[::-1], "annotations": annotations}))
    members = {}
    for i in range(6):
        members[f"{i:09d}.jpg"] = jpeg_bytes(400 + i)
        members[f"{i:09d}.txt"] = f"the {WORDS[i]} bird".encode()
    write_tar(root / "cc12m" / "cc12m-train-0000.tar", members)
    members = {}  # a second shard: CC12M is embedded one group of shards per job
    for i in range(4):
        members[f"{i:09d}.jpg"] = jpeg_bytes(450 + i)
        members[f"{i:09d}.txt"] = f"a {WORDS[(i + 4) % 9]} bird".encode()
    write_tar(root / "cc12m" / "cc12m-train-0001.tar", members)
    uned = root / "uned"
    lines = []
    for i in range(12):
        rel = f"dom{i % 2}/cls{i % 3}/{i}.jpg"
        (uned / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (uned / "images" / rel).write_bytes(jpeg_bytes(500 + i))
        lines.append(f"{rel},{i % 3},{i % 2}")
    (uned / "uned_paths_1M.txt").write_text("\n".join(lines) + "\n")
    return {"coco_images": 8, "coco_captions": 16, "cc12m": 10, "uned": 12}


# ----------------------------------------------------------------------------- a local HTTP server
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so a transfer spans several read chunks


class FileServerHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with an ETag (``server.etags``, else a digest of the bytes) and
    honours ``If-Range`` unless ``server.if_range`` is False. ``server.mode`` is normal, cut
    (stop after `cut_at` bytes once), corrupt (flip a byte), norange (ignore Range), or
    nolength (no Content-Length; the first transfer is cut at `cut_at`)."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        etag = server.etags.get(self.path) or f'"{hashlib.md5(data).hexdigest()}"'
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if server.if_range and if_range is not None and if_range != etag:
            rng = None  # RFC 9110: a changed object is sent whole
        if rng and server.mode != "norange" and server.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if server.mode == "corrupt":
            body = body[:10] + bytes([body[10] ^ 0xFF]) + body[11:]
        self.send_header("ETag", etag)
        if server.mode == "nolength":
            self.close_connection = True
            self.end_headers()
            if server.cut_once or server.cut_always:
                server.cut_once = False
                body = body[:server.cut_at + 1000 * len(server.requests)]
            self.wfile.write(body)
            self.wfile.flush()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.mode == "cut":
            server.mode = "normal"  # only the first transfer is cut
            self.wfile.write(body[:server.cut_at])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


# ----------------------------------------------------------------------------- tiny DINOv2 and AMES detector
PATCH = 4


def tiny_dinov2(path, registers=0):
    from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersModel)
    torch.manual_seed(0)
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                  patch_size=PATCH, image_size=16)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers,
                                                                   **kwargs))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    # layer norms start at weight 1, bias 0, which gives every output token the same norm; a
    # trained model's do not (and ties would make the top-n ambiguous)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.data = 1 + 0.5 * torch.randn_like(module.weight)
            module.bias.data = 0.5 * torch.randn_like(module.bias)
    model.save_pretrained(path)
    return str(path)


def tiny_detector(path, dim=32):
    """A random AMES detector (non-trivial batch-norm statistics) saved as the official one is:
    its state dict under 'state'."""
    torch.manual_seed(1)
    detector = AMESDetector(dim)
    with torch.no_grad():
        detector.bn.running_mean.normal_()
        detector.bn.running_var.uniform_(0.5, 2.0)
        detector.bn.weight.normal_()
        detector.bn.bias.normal_()
    torch.save({"state": detector.state_dict()}, path)
    return str(path)


# ----------------------------------------------------------------------------- tiny AMES networks
LOCAL_DIM = 8


AMES_SIZE = dict(model_dim=16, nhead=2, num_layers=2, dim_feedforward=32)


def tiny_ames(binarized=False, seed=0, local_dim=LOCAL_DIM) -> AMES:
    """A small random AMES whose layer norms are not the identity (a trained model's are not)."""
    torch.manual_seed(seed)
    model = AMES(AMESConfig(**AMES_SIZE, local_dim=local_dim, binarized=binarized))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("remap_local.1") or name.endswith(".W"):
                p.copy_(p + 0.5 * torch.randn_like(p))
    return model.eval()


def save_official_layout(model, path, **extra) -> str:
    """Save ``model`` as the official training code saves networks: the state dict under
    'state' beside the optimiser's state and other plain values."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    dim = model.config.local_dim
    model(torch.randn(2, 5, dim), torch.randn(2, 4, dim)).sum().backward()
    optimiser.step()
    model.zero_grad()
    model.eval()
    torch.save({"state": model.state_dict(), "optim": optimiser.state_dict(), "epoch": 7,
                "best_map": np.float64(0.613), **extra}, path)
    return str(path)


def save_tiny_ames_checkpoint(path, binarized=False, seed=0, local_dim=LOCAL_DIM) -> str:
    """A tiny random AMES saved in the official checkpoint layout: what the tests that run the
    `ames` method (the conformance test of tests/test_methods.py among them) build it on."""
    return save_official_layout(tiny_ames(binarized, seed, local_dim), path)


# ----------------------------------------------------------------------------- descriptor reads
class RowsRead:
    """Stands in for a descriptor array: records which image rows are read, one at a time, and
    fails if anything reads more than one row at once or the whole array."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.rows: set[int] = set()

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        row = index[0] if isinstance(index, tuple) else index
        if not isinstance(row, (int, np.integer)):
            raise AssertionError(f"more than one image read at once: {index!r}")
        self.rows.add(int(row))
        return self.array[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole descriptor array was read")


def reads_only_candidates(method, run, gallery_ids, shortlist):
    """Run ``run()`` with the method's database arrays wrapped in RowsRead; check that only the
    file rows of shortlisted images were read, and return run()'s result."""
    db = method.database_
    db.descriptors, db.xy = RowsRead(db.descriptors), RowsRead(db.xy)
    try:
        result = run()
        wanted = {db.row_of[gallery_ids[r]] for r in np.ravel(shortlist)
                  if gallery_ids[r] in db.row_of}
        assert db.descriptors.rows <= wanted and db.descriptors.rows
        assert db.xy.rows <= wanted
    finally:
        db.descriptors, db.xy = db.descriptors.array, db.xy.array
    return result


# ----------------------------------------------------------------------------- tiny LLaVA
LLAVA_WORDS = ("USER ASSISTANT Does this picture show Answer the question with either Yes or No and "
         "nothing else a red fox bird on branch green frog").split() + list(':?."')


IMAGE_TOKEN = 4


def build_tiny_llava(path):
    """A randomly initialised LLaVA with its processor, saved as a hub checkpoint would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + LLAVA_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    # a BOS first, as Llama's tokenizer does: the benchmark takes "Yes" at index 1
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                           crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=256, pad_token_id=3, bos_token_id=1,
                                eos_token_id=2),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=4)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # a larger image pathway, so that candidates' scores clearly differ
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(8.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------- the authors' released QuARI
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


def save_tiny_release(directory, extractor="google/siglip2-base-patch16-512", seed=0,
                      dim=HPARAMS["embedding_dim"]):
    """A tiny random checkpoint in the authors' layout (config.yml with hparams and
    feature_extractor, weights.pt a state dict of their module), trained (says its config) on
    ``extractor``; returns (the authors' module, the folder)."""
    hparams = {**HPARAMS, "embedding_dim": dim}
    torch.manual_seed(seed)
    reference = ReleasedHypernetwork(**hparams).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = write_released(directory, reference, hparams)
    (directory / "config.yml").write_text(yaml.safe_dump(
        {"hparams": hparams, "feature_extractor": extractor}))
    return reference, directory


def tiny_backbone(name="siglip2-vit-b16@512", dim=HPARAMS["embedding_dim"]):
    """A registry entry of ``name`` with a tiny embedding width."""
    return dataclasses.replace(get_backbone(name), embed_dim=dim)


# ----------------------------------------------------------------------------- QuARI training on toy data
TOY_DIM = 16


def tiny_model(**overrides):
    fields = dict(embedding_dim=TOY_DIM, hidden_dim=32, nhead=2, num_layers=1, num_steps=2, rank=4,
                  dropout=0.0, token_dropout=0.0)
    fields.update(overrides)
    return QuARIConfig(**fields)


def tiny_train(**overrides):
    fields = dict(batch_size=16, max_steps=8, lr_schedule="released", lr_max=3e-3,
                  use_noise=False, eval_every=4, checkpoint_every=2, device="cpu")
    fields.update(overrides)
    return TrainConfig(**fields)


def toy_data(seed=0, images=40, captions_per_image=2, noise=0.3):
    """Captions are noisy copies of their image; several captions share an image id."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((images, TOY_DIM)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    # image rows repeat once per caption, as (image, caption) pairs store them
    pair_image = np.repeat(np.arange(images), captions_per_image)
    ids = [f"im{i}" for i in pair_image]
    cap = img[pair_image] + noise * rng.standard_normal((len(pair_image), TOY_DIM)).astype(np.float32)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    semi = mine_semipositives(img[pair_image], ids, k=10, top_n=2, progress=False)
    return make_training_data(img[pair_image], ids, cap, np.arange(len(pair_image)), semi)


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- query transforms
VARIANTS = {"released": (1.0, 0.8), "paper": (0.0, 1.0)}


def random_transform(batch, dim, rank, variant, dtype=torch.float64, seed=0):
    anchor, scale = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    left = torch.randn(batch, dim, rank, generator=g, dtype=dtype) / dim ** 0.5
    right = torch.randn(batch, dim, rank, generator=g, dtype=dtype) / dim ** 0.5
    return QueryTransform(query=query, left=left, right=right, scale=scale, anchor=anchor)


