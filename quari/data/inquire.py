"""INQUIRE: Fullrank queries and annotations, the iNat24 pool, and INQUIRE-Rerank.

- Fullrank (the benchmark's GitHub CSVs): ``inquire_queries_{val,test}.csv`` with columns
  ``query_id``, ``query_text`` (plus category fields) and ``inquire_annotations.csv`` with
  ``query_id``, ``image_id``, ``image_path``. A pool image's id is its path inside the iNat24
  archive, ``train/<class folder>/<uuid>.jpg``, exactly the annotations' ``image_path``.
- The iNat24 pool: image files under ``<root>/train/...`` (competition ``train.tar.gz``), or the
  benchmark's precomputed embeddings (published for a few models only, :data:`PRECOMPUTED_MODELS`,
  checked against the backbone by :func:`check_precomputed`) in clip-retrieval layout, ``img_emb/img_emb_<n>.npy`` with
  ``metadata/metadata_<n>.parquet`` whose ``image_path`` column holds the path without ``.jpg``;
  :func:`convert_clip_retrieval` turns those into an embedding set with the same ids.
- INQUIRE-Rerank (Hugging Face ``evendrow/INQUIRE-Rerank``, parquet): one row per (query,
  candidate image) with columns ``image`` (a struct holding the encoded ``bytes``), ``query``,
  ``relevant`` (0/1), ``clip_score``, ``inat24_image_id``, ``inat24_file_name``, ... Each query
  has a fixed candidate list (100 images). A query's id is its text; an image's id is its
  ``inat24_image_id``. Scored the paper's way (Table 3b), a Rerank query also needs its number
  of positives in the whole pool: :func:`rerank_full_pool_positives` finds its Fullrank query
  by text and counts that query's annotations.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quari.paths import safe_file_name
from quari.store import EmbeddingSetWriter, atomic_write_bytes, l2_normalize

logger = logging.getLogger(__name__)


def _require_columns(frame, columns: Sequence[str], source) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; has {list(frame.columns)}")


def read_queries(csv_path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(query id, raw query text)`` of an ``inquire_queries_*.csv`` file, in file order."""
    import pandas as pd
    frame = pd.read_csv(csv_path)
    _require_columns(frame, ["query_id", "query_text"], csv_path)
    return [(str(q), str(t)) for q, t in zip(frame["query_id"], frame["query_text"])]


def read_annotations(csv_path: str | os.PathLike, query_ids: Sequence[str]
                     ) -> dict[str, list[str]]:
    """``{query id: relevant pool ids}`` for the given queries from ``inquire_annotations.csv``.

    A query without any annotation is an error (every INQUIRE query has relevant images).
    """
    import pandas as pd
    frame = pd.read_csv(csv_path, dtype={"query_id": str})
    _require_columns(frame, ["query_id", "image_path"], csv_path)
    wanted = set(query_ids)
    positives: dict[str, list[str]] = {q: [] for q in query_ids}
    for q, path in zip(frame["query_id"], frame["image_path"]):
        if q in wanted:
            positives[q].append(pool_id(path))
    empty = [q for q, p in positives.items() if not p]
    if empty:
        raise ValueError(f"{csv_path}: no annotation for queries {empty[:5]}")
    return {q: sorted(set(p)) for q, p in positives.items()}


def pool_id(image_path: str) -> str:
    """The id of a pool image: its archive path, ``train/...jpg`` (``.jpg`` added if absent)."""
    path = str(image_path).replace("\\", "/").lstrip("/")
    return path if path.lower().endswith(".jpg") else path + ".jpg"


def pool_items(root: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """``(pool id, file path)`` of the iNat24 images under ``root/train/``, sorted by id."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root / 'train'}: the extracted iNat24 train/ folder is missing")
    paths = sorted(root.glob("train/*/*.jpg"))
    if limit is not None:
        paths = paths[:limit]
    return [(p.relative_to(root).as_posix(), str(p)) for p in paths]


def _numbered(folder: Path, pattern: str) -> list[Path]:
    """Files of ``folder`` matching ``pattern``, ordered by the number in their name."""
    def number(p: Path) -> int:
        digits = re.findall(r"\d+", p.stem)
        return int(digits[-1]) if digits else -1
    return sorted(folder.glob(pattern), key=lambda p: (number(p), p.name))


#: INQUIRE's published iNat24 embeddings: folder name (``data/inat24/embs/<name>/`` in its
#: src/utils.py NaiveKNNIndex) -> the model that made them (src/utils.py
#: TopKPredictionStore.models, lines 132-146; data/README.md lines 51-56 link four of them).
PRECOMPUTED_MODELS = {
    "vit-b-32": "hf_clip:openai/clip-vit-base-patch32",
    "rn50": "open_clip:RN50/openai",
    "rn50x16": "open_clip:RN50x16/openai",
    "vit-b-16": "hf_clip:openai/clip-vit-base-patch16",
    "vit-l-14": "hf_clip:openai/clip-vit-large-patch14",
    "vit-b-16-dfn": "open_clip:ViT-B-16/dfn2b",
    "vit-l-14-dfn": "open_clip:ViT-L-14-quickgelu/dfn2b",
    "vit-h-14-378": "open_clip:ViT-H-14-378-quickgelu/dfn5b",
    "siglip-vit-l-16-384": "open_clip:ViT-L-16-SigLIP-384/webli",
    "siglip-so400m-14-384": "open_clip:ViT-SO400M-14-SigLIP-384/webli",
}


def check_precomputed(info, folder: str | os.PathLike | None = None) -> str:
    """The INQUIRE folder name of backbone ``info``'s precomputed pool embeddings, after checking
    that INQUIRE published embeddings of exactly these weights (the registry's
    ``inquire_precomputed``) and, given ``folder``, that it is that folder (INQUIRE names each
    folder after its model) and holds vectors of the backbone's width. Two models of the same
    width are thus never mixed up. ValueError otherwise."""
    expected = info.inquire_precomputed
    if expected is None or expected not in PRECOMPUTED_MODELS:
        published = ", ".join(f"{n} ({m})" for n, m in PRECOMPUTED_MODELS.items())
        raise ValueError(f"INQUIRE publishes no precomputed iNat24 embeddings of backbone "
                         f"{info.name} ({info.model}); it publishes: {published}. Embed the "
                         "pool instead (real.inquire.pool: images)")
    if folder is None:
        return expected
    folder = Path(folder)
    if folder.name != expected:
        raise ValueError(f"{folder}: INQUIRE's embeddings of {info.name} are its folder "
                         f"{expected!r} ({PRECOMPUTED_MODELS[expected]}); this folder is named "
                         f"{folder.name!r}, which would be "
                         f"{PRECOMPUTED_MODELS.get(folder.name, 'no published model')}")
    parts = _numbered(folder / "img_emb", "*.npy")
    if parts:
        width = np.load(parts[0], mmap_mode="r").shape[1]
        if width != info.embed_dim:
            raise ValueError(f"{parts[0]}: {width}-d embeddings, backbone {info.name} embeds at "
                             f"{info.embed_dim}")
    return expected


def convert_clip_retrieval(folder: str | os.PathLike, out_dir: str | os.PathLike,
                           meta: dict | None = None) -> int:
    """Write the precomputed embeddings of a clip-retrieval folder as an embedding set.

    Rows of ``img_emb/img_emb_<n>.npy`` pair with rows of ``metadata/metadata_<n>.parquet``
    (``image_path``, without ``.jpg``); ids become pool ids, vectors are L2-normalised and stored
    fp16, one shard per part. Returns the number of rows. A row-count mismatch names the part.
    """
    import pyarrow.parquet as pq
    folder = Path(folder)
    embeddings = _numbered(folder / "img_emb", "*.npy")
    metadata = _numbered(folder / "metadata", "*.parquet")
    if not embeddings:
        raise FileNotFoundError(f"{folder / 'img_emb'}: no img_emb_*.npy files")
    if len(embeddings) != len(metadata):
        raise ValueError(f"{folder}: {len(embeddings)} embedding parts but {len(metadata)} "
                         "metadata parts")
    writer = None
    rows = 0
    for emb_path, meta_path in zip(embeddings, metadata):
        vectors = np.load(emb_path, mmap_mode="r")
        table = pq.read_table(meta_path, columns=["image_path"])
        if table.num_rows != len(vectors):
            raise ValueError(f"{emb_path} has {len(vectors)} rows, {meta_path} {table.num_rows}")
        if writer is None:
            writer = EmbeddingSetWriter(out_dir, vectors.shape[1])
            if writer.shards:
                raise FileExistsError(f"{out_dir} holds a partial set; remove it first")
        ids = [pool_id(p) for p in table.column("image_path").to_pylist()]
        writer.add_shard(l2_normalize(np.asarray(vectors, dtype=np.float32)), ids)
        rows += len(ids)
    writer.close({**(meta or {}), "kind": "images", "source": str(folder), "requested": rows,
                  "embedded": rows, "skipped": 0})
    return rows


def query_text_key(text: str) -> str:
    """The form in which Rerank and Fullrank query texts are matched: Unicode NFC, runs of
    whitespace collapsed to one space, no leading or trailing space, case-folded.

    The official Fullrank CSVs need it: one test query ends with a space ("red fox showing signs
    of sarcoptic mange "), one has a non-ASCII letter ("Hübner's Wasp Moth mating"); their 250
    texts stay distinct under it (checked against the INQUIRE repository's CSVs).
    """
    return " ".join(unicodedata.normalize("NFC", str(text)).split()).casefold()


def rerank_full_pool_positives(rerank_queries: Sequence[str],
                               query_csvs: Sequence[str | os.PathLike],
                               annotations_csv: str | os.PathLike) -> dict[str, int]:
    """``{Rerank query: its number of positives in the whole iNat24 pool}``, for INQUIRE-Rerank's
    full-pool scoring (:func:`quari.metrics.inquire_rerank_fullpool_metrics`).

    INQUIRE-Rerank identifies a query only by its text, so each one is matched by text
    (:func:`query_text_key`) to a Fullrank query of ``query_csvs`` (``inquire_queries_val.csv``
    and ``inquire_queries_test.csv``: Rerank's 40 / 160 split need not follow Fullrank's
    50 / 200), and its positives are the distinct images ``annotations_csv`` lists for that
    query id (the INQUIRE repository counts them the same way, ``len(set(image_path))``).
    A Rerank query without a Fullrank match is an error naming it: every Rerank query is one of
    the 250 INQUIRE queries.
    """
    by_key: dict[str, tuple[str, str]] = {}  # text key -> (query id, file it came from)
    for csv_path in query_csvs:
        for query_id, text in read_queries(csv_path):
            key = query_text_key(text)
            seen = by_key.setdefault(key, (query_id, str(csv_path)))
            if seen[0] != query_id:
                raise ValueError(f"query text {text!r} belongs to query {seen[0]} ({seen[1]}) "
                                 f"and to query {query_id} ({csv_path})")
    matched = {q: by_key.get(query_text_key(q), (None, ""))[0] for q in rerank_queries}
    unmatched = [q for q, query_id in matched.items() if query_id is None]
    if unmatched:
        raise ValueError(f"{len(unmatched)} INQUIRE-Rerank queries match no Fullrank query of "
                         f"{[str(p) for p in query_csvs]} by text: {unmatched}")
    positives = read_annotations(annotations_csv, sorted(set(matched.values())))
    counts = {q: len(positives[query_id]) for q, query_id in matched.items()}
    logger.info("%d INQUIRE-Rerank queries matched to Fullrank queries; %d to %d positives each",
                len(counts), min(counts.values(), default=0), max(counts.values(), default=0))
    return counts


@dataclass
class RerankSplit:
    """One INQUIRE-Rerank split: queries, each with its fixed candidates and relevant ones."""

    queries: list[str]                 # query ids (= texts), in first-appearance order
    candidates: dict[str, list[str]]   # query -> candidate image ids, in the benchmark's order
    relevant: dict[str, list[str]]     # query -> relevant candidate image ids
    images: list[str]                  # distinct image ids, in first-appearance order


RERANK_COLUMNS = ("query", "relevant", "inat24_image_id")


def read_rerank(parquet_files: Sequence[str | os.PathLike]) -> RerankSplit:
    """Queries, candidates and relevance of an INQUIRE-Rerank split (its parquet files, in order)."""
    import pyarrow.parquet as pq
    queries: list[str] = []
    candidates: dict[str, list[str]] = {}
    relevant: dict[str, list[str]] = {}
    images: dict[str, None] = {}
    for path in parquet_files:
        table = pq.read_table(path, columns=list(RERANK_COLUMNS))
        for query, rel, image in zip(*(table.column(c).to_pylist() for c in RERANK_COLUMNS)):
            image = str(image)
            if query not in candidates:
                queries.append(query)
                candidates[query], relevant[query] = [], []
            candidates[query].append(image)
            if int(rel):
                relevant[query].append(image)
            images.setdefault(image, None)
    if not queries:
        raise ValueError(f"no rows in {list(map(str, parquet_files))}")
    return RerankSplit(queries, candidates, relevant, list(images))


def extract_rerank_images(parquet_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike
                          ) -> list[tuple[str, str]]:
    """Write each distinct candidate image once as ``<out_dir>/<inat24_image_id>.jpg`` (atomically;
    files already there are kept; an id that is not a plain file name, such as ``../x``, is
    written under a digest of it, :func:`quari.paths.safe_file_name`) and return ``(image id, path)`` in first-appearance order.

    Reads one parquet row group at a time, so memory stays bounded by a row group. With pyarrow,
    not ``datasets.load_dataset``: the files are the ones the download job verified, read in
    place, with no second copy in the ``datasets`` Arrow cache (the tests decode the same images
    with ``datasets`` as the reference)."""
    import pyarrow.parquet as pq
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items: dict[str, str] = {}
    for path in parquet_files:
        parquet = pq.ParquetFile(path)
        if "image" not in parquet.schema_arrow.names:
            raise ValueError(f"{path}: no 'image' column; has {parquet.schema_arrow.names}")
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["image", "inat24_image_id"])
            for image, image_id in zip(table.column("image").to_pylist(),
                                       table.column("inat24_image_id").to_pylist()):
                image_id = str(image_id)
                if image_id in items:
                    continue
                target = out_dir / f"{safe_file_name(image_id)}.jpg"  # ids are data
                if not target.exists():
                    data = image.get("bytes") if isinstance(image, dict) else image
                    if not data:
                        raise ValueError(f"{path}: image {image_id} has no bytes")
                    atomic_write_bytes(target, data)
                items[image_id] = str(target)
    return list(items.items())


def rerank_gallery_items(parquet_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike
                         ) -> list:
    """``(image id, image)`` of INQUIRE-Rerank's candidates for embedding: the files of
    :func:`extract_rerank_images`, decoded with their EXIF orientation applied, as the Hugging
    Face ``datasets`` Image feature decodes them for INQUIRE's own evaluation
    (src/eval_rerank_with_clip.py loads the split with ``load_dataset``; requirements.txt pins
    datasets 2.19.2, whose Image feature applies ``ImageOps.exif_transpose``)."""
    from quari.data.ilias import ExifImage
    from quari.data.tars import ImageRef
    return [(i, ExifImage(ImageRef(path)))
            for i, path in extract_rerank_images(parquet_files, out_dir)]


def rerank_candidates(method, queries, gallery, candidates: dict[str, list[str]],
                      relevant: dict[str, list[str]], batch_size: int = 64,
                      full_pool_positives: dict[str, int] | None = None, k: int = 50) -> dict:
    """INQUIRE-Rerank with ``method``: re-rank each query's fixed candidate list (not a cosine
    top-k) and score it as the benchmark does (plain AP / nDCG / MRR over the list, P = relevant
    candidates; ``quari.metrics.inquire_rerank_metrics``).

    ``queries`` and ``gallery`` are embedding sets whose ids are the query ids and candidate image
    ids. Returns metrics (mAP@50 / nDCG@50 / MRR keys, as the paper labels them), the list length
    and the re-ranking time per 1k and per 100 pairs (warm-up outside the timer).

    With ``full_pool_positives`` (query -> positives in the whole pool, from
    :func:`rerank_full_pool_positives`) the same ranking is also scored the paper's way
    (``quari.metrics.inquire_rerank_fullpool_metrics``, cut-off ``k``), under the key
    ``"full_pool"``: its metrics (mAP@k / nDCG@k / MRR), k, and per query the relevant candidates
    and P, from which the best possible ordering's scores follow.
    """
    from quari import metrics
    from quari.evaluation import rerank_metrics, rerank_timing, timed_reranks
    row_of = gallery.index_of()
    missing = sorted({c for q in queries.ids for c in candidates[q] if c not in row_of})
    if missing:
        raise ValueError(f"{len(missing)} candidate images are not in the gallery (unreadable?), "
                         f"e.g. {missing[:3]}")
    order_of_queries = list(range(len(queries)))
    # queries of equal list length are re-ranked together (the benchmark has 100 for all)
    by_length: dict[int, list[int]] = {}
    for n in order_of_queries:
        by_length.setdefault(len(candidates[queries.ids[n]]), []).append(n)

    def batches():
        for members in by_length.values():
            for start in range(0, len(members), batch_size):
                batch = members[start:start + batch_size]
                ids = [queries.ids[n] for n in batch]
                q = np.asarray(queries.embeddings[batch], dtype=np.float32)
                rows = np.array([[row_of[c] for c in candidates[i]] for i in ids], dtype=np.int64)
                yield q, rows, ids, batch

    ranked: dict[int, list[str]] = {}
    seconds, pairs = 0.0, 0
    for (_, rows, ids, batch), order, batch_seconds in timed_reranks(method, gallery.embeddings,
                                                                     batches()):
        seconds += batch_seconds
        pairs += rows.size
        for n, i, o in zip(batch, ids, order):
            ranked[n] = [candidates[i][j] for j in o]
    relevance = [metrics.relevance_of(ranked[n], set(relevant[queries.ids[n]]))
                 for n in order_of_queries]
    hits = [int(sum(r)) for r in relevance]
    full_pool = None
    if full_pool_positives is not None:
        query_ids = list(queries.ids)
        missing = [q for q in query_ids if q not in full_pool_positives]
        if missing:
            raise ValueError(f"{len(missing)} queries have no full-pool positive count, "
                             f"e.g. {missing[:3]}")
        counts = [int(full_pool_positives[q]) for q in query_ids]
        full_pool = {"metrics": rerank_metrics(relevance, counts, "inquire_full_pool", k,
                                               query_ids),
                     "k": k, "relevant_in_shortlist": hits, "num_positives": counts}
    result = {"metrics": rerank_metrics(relevance, hits, "inquire", k),
              **rerank_timing(seconds, pairs), "shortlist": max(by_length),
              "num_queries": len(queries), "gallery_size": len(gallery),
              "shortlist_source": "benchmark",
              # what the best possible ordering of these lists scores (quari.reporting.tables)
              "relevant_in_shortlist": hits, "num_positives": hits}
    if full_pool is not None:
        result["full_pool"] = full_pool
    return result
