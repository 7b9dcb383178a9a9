"""Where each dataset's official files come from, and the local files a run will use.

Each ``locate_*`` function takes the dataset's settings (the ``real:`` section of the workflow
configuration), the ``data_root`` and whether downloading is allowed, makes sure every file is
present and verified (fetching what is missing when allowed), and returns a JSON-able manifest of
local paths that the embedding and ground-truth stages read. Files a user already has are used
where they lie under ``data_root`` (same relative layout as a download); with downloading off,
anything missing is reported at once, with where it was expected.

Layout under ``data_root``::

    ilias/hf/                 Hugging Face vrg-prague/ilias files (mini-ILIAS shards)
    ilias/server/             official server: checksums.txt, ilias_core.tar, image_ids/, yfcc100m/
    inquire/                  inquire_queries_{val,test}.csv, inquire_annotations.csv
    inquire/rerank/           Hugging Face evendrow/INQUIRE-Rerank parquet files
    inquire/inat24/           train/ (extracted iNat24 images) and train.tar.gz
    coco/                     annotations/captions_train2017.json, train2017/
    cc12m/                    webdataset shards
    biotrove/, uned/          user-provided (see quari.data.collections)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from quari.data.downloads import (MissingDataError, RemoteFile, fetch, hf_file, hf_matching_files,
                                  read_checksums, require_files)
from quari.paths import path_inside
from quari.store import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def _listing_path(local_dir: Path, repo_id: str, pattern: str) -> Path:
    key = hashlib.sha256(f"{repo_id}\0{pattern}".encode()).hexdigest()[:12]
    return local_dir / f".listing-{key}.json"


def hf_files(repo_id: str, pattern: str, local_dir: Path, download: bool,
             expected: int | None = None, repo_type: str = "dataset") -> list[str]:
    """Local paths of every file of a repository matching ``pattern``.

    With ``download`` the hub's listing says which files the set has (``expected`` of them when
    given): each is used from ``local_dir`` when there, else fetched, and the listing is kept in
    ``local_dir`` (``.listing-<key>.json``). Without, the files found locally are used only
    when complete: every file of a listing kept by an earlier download must be there, or,
    without one, ``expected`` files (any number when None, which cannot be checked).
    """
    listing = _listing_path(local_dir, repo_id, pattern)
    if download:
        names = hf_matching_files(repo_id, pattern, repo_type=repo_type)
        if not names or (expected is not None and len(names) != expected):
            raise ValueError(f"{repo_id}: {len(names)} files match {pattern!r}, expected "
                             f"{expected or 'some'}; check the dataset card and the configuration")
        for name in names:
            path_inside(local_dir, name, f"file of {repo_id}")
        atomic_write_json(listing, {"repo": repo_id, "pattern": pattern, "files": names})
        return [str(hf_file(repo_id, n, local_dir, repo_type=repo_type)) for n in names]
    if listing.is_file():
        names = json.loads(listing.read_text())["files"]
        missing = [n for n in names if not path_inside(local_dir, n).is_file()]
        if missing:
            raise MissingDataError(
                f"{len(missing)} of the {len(names)} files of {repo_id} matching {pattern!r} "
                f"(listed in {listing} when they were downloaded) are missing from {local_dir}, "
                f"e.g. {missing[:3]}; switch downloads on (real.download: true) to fetch them")
        return [str(local_dir / n) for n in names]
    # the hub keeps the repository's folders (data/test-00000-of-00004.parquet): look in them too
    local = sorted(str(p) for p in local_dir.rglob(pattern) if p.is_file())
    if not local or (expected is not None and len(local) != expected):
        want = f"{expected} files" if expected else "files"
        raise MissingDataError(f"expected {want} matching {local_dir / pattern} "
                               f"({repo_id}), found {len(local)}")
    if expected is None:
        logger.warning("%s: %d local files match %s; with downloads off and no listing of %s "
                       "kept, nothing shows the set is complete", local_dir, len(local), pattern,
                       repo_id)
    return local


def _server_file(base_url: str, name: str, root: Path, download: bool,
                 sha256: str | None = None) -> str:
    path = root / name
    if download:
        fetch(RemoteFile(f"{base_url.rstrip('/')}/{name}", str(path), sha256=sha256))
    else:
        require_files([(path, f"{name} of {base_url}")])
    return str(path)


def _checksums(cfg: dict, root: Path, download: bool) -> dict[str, str]:
    """``{file name under the server root: sha256}`` from the server's checksums.txt."""
    path = Path(_server_file(cfg["server_url"], "checksums.txt", root, download))
    base = cfg["server_url"].rstrip("/") + "/"
    table = {}
    for digest, url in read_checksums(path):
        name = url[len(base):] if url.startswith(base) else url.rsplit("/", 1)[-1]
        table[name] = digest
    return table


ID_LISTS = ("image_query_ids.txt", "text_query_ids.txt", "positive_ids.txt")


def locate_ilias_core(cfg: dict, data_root: str | os.PathLike, download: bool) -> dict:
    """The original core images and text queries (the server's ``ilias_core.tar``, or an
    extracted ``ilias_core/`` folder of one's own) and the official id lists."""
    root = Path(data_root) / "ilias"
    manifest = {}
    server = root / "server"
    core_dir = server / "ilias_core"
    if core_dir.is_dir():  # an extracted ilias_core/ folder of one's own
        manifest["core"] = str(core_dir)
    elif (server / "ilias_core.tar").is_file() and not download:
        manifest["core"] = str(server / "ilias_core.tar")
    else:
        sums = _checksums(cfg, server, download) if download else {}
        manifest["core"] = _server_file(cfg["server_url"], "ilias_core.tar", server,
                                        download, sums.get("ilias_core.tar"))
    manifest["text_queries"] = manifest["core"]
    ids = server / "image_ids"
    present = all((ids / n).is_file() for n in ID_LISTS)
    if download:  # each checked against its verification stamp, fetched when not a known copy
        for name in ID_LISTS:
            _server_file(cfg["server_url"], f"image_ids/{name}", server, True)
        present = True
    manifest["image_ids"] = str(ids) if present else None
    if not present:
        logger.warning("%s: official id lists absent; ids are not checked against them", ids)
    return manifest


def ilias_mini_listing(cfg: dict, data_root: str | os.PathLike, download: bool) -> list[str]:
    """Names (relative to ``ilias/hf/``) of the ``mini_shards`` mini-ILIAS distractor shards, in
    order: those under ``data_root`` when all are there, else the hub's listing (nothing is
    fetched here; :func:`locate_ilias_mini` fetches a group of them)."""
    hf = Path(data_root) / "ilias" / "hf"
    local = sorted(p for p in hf.rglob(cfg["mini_pattern"]) if p.is_file())
    if len(local) == cfg["mini_shards"]:
        return [str(p.relative_to(hf)) for p in local]
    if not download:
        raise MissingDataError(f"expected {cfg['mini_shards']} files matching "
                               f"{hf / cfg['mini_pattern']} ({cfg['hf_repo']}), found {len(local)}")
    names = hf_matching_files(cfg["hf_repo"], cfg["mini_pattern"])
    if len(names) != cfg["mini_shards"]:
        raise ValueError(f"{cfg['hf_repo']}: {len(names)} files match {cfg['mini_pattern']!r}, "
                         f"expected {cfg['mini_shards']} (real.ilias.mini_shards)")
    for name in names:  # names from the hub stay inside ilias/hf/
        path_inside(hf, name, f"file of {cfg['hf_repo']}")
    return names


def locate_ilias_mini(cfg: dict, data_root: str | os.PathLike, download: bool,
                      names: Sequence[str] | None = None) -> dict:
    """The mini-ILIAS distractor shards ``names`` (default: all of :func:`ilias_mini_listing`),
    present under ``ilias/hf/`` (fetched from the hub when missing and allowed)."""
    hf = Path(data_root) / "ilias" / "hf"
    names = ilias_mini_listing(cfg, data_root, download) if names is None else names
    return {"distractor_tars": [str(hf_file(cfg["hf_repo"], n, hf, download)) for n in names]}


def ilias_yfcc_listing(cfg: dict, data_root: str | os.PathLike, download: bool) -> list[dict]:
    """The YFCC100M distractor shards, in order, as ``{"name", "path", "sha256"}``: the first
    ``yfcc_shards`` of the server's checksums.txt (fetched; the only file fetched here), or,
    without it and with downloads off, the shards under ``ilias/server/yfcc100m/`` (sha256 None)."""
    server = Path(data_root) / "ilias" / "server"
    if not download and not (server / "checksums.txt").is_file():
        tars = sorted((server / "yfcc100m").glob("*.tar"))
        if not tars:
            require_files([(server / "checksums.txt", "ILIAS server checksums"),
                           (server / "yfcc100m", "YFCC100M distractor shards")])
        limit = cfg.get("yfcc_shards")
        if limit and len(tars) < limit:
            raise MissingDataError(f"{server / 'yfcc100m'}: {len(tars)} YFCC100M shards, the "
                                   f"configuration asks for {limit} (real.ilias.yfcc_shards); "
                                   "switch downloads on or copy the missing shards there")
        if not limit:
            logger.warning("%s: %d YFCC100M shards and no checksums.txt to tell whether that is "
                           "all of them", server / "yfcc100m", len(tars))
        entries = [{"name": f"yfcc100m/{p.name}", "path": str(p), "sha256": None} for p in tars]
    else:
        sums = _checksums(cfg, server, download)
        names = sorted(n for n in sums if "yfcc100m" in n and n.endswith(".tar"))
        entries = [{"name": n, "path": str(server / "yfcc100m" / Path(n).name), "sha256": sums[n]}
                   for n in names]
    limit = cfg.get("yfcc_shards")
    return entries[:limit] if limit else entries


def locate_ilias_yfcc(cfg: dict, data_root: str | os.PathLike, download: bool,
                      listing: Sequence[dict] | None = None) -> dict:
    """The YFCC100M distractor shards of ``listing`` (default: all of :func:`ilias_yfcc_listing`)
    present under ``ilias/server/yfcc100m/``, each verified against checksums.txt when fetched."""
    listing = ilias_yfcc_listing(cfg, data_root, download) if listing is None else listing
    for entry in listing:
        if download and entry["sha256"]:
            fetch(RemoteFile(f"{cfg['server_url'].rstrip('/')}/{entry['name']}", entry["path"],
                             sha256=entry["sha256"]))
        else:
            require_files([(entry["path"], f"{entry['name']} (sha256 {entry['sha256']})")])
    return {"distractor_tars": [e["path"] for e in listing]}


QUERY_FILES = {"val": "inquire_queries_val.csv", "test": "inquire_queries_test.csv"}


def _inquire_csvs(cfg: dict, root: Path, names: Sequence[str], download: bool) -> dict[str, str]:
    """Local paths of INQUIRE's GitHub CSVs ``names`` (downloaded when asked, else required)."""
    files = {name: str(root / name) for name in names}
    if download:
        for name in names:
            fetch(RemoteFile(f"{cfg['csv_url'].rstrip('/')}/{name}", files[name]))
    else:
        require_files([(files[name], f"INQUIRE {name}") for name in names])
    return files


def locate_inquire(cfg: dict, data_root: str | os.PathLike, download: bool,
                   precomputed: dict[str, str] | None = None) -> dict:
    """Fullrank queries and annotations, and the iNat24 pool (images, or precomputed embeddings
    per backbone from ``precomputed``: backbone -> clip-retrieval folder)."""
    root = Path(data_root) / "inquire"
    files = _inquire_csvs(cfg, root, (QUERY_FILES[cfg["split"]], "inquire_annotations.csv"),
                          download)
    manifest = {"queries": files[QUERY_FILES[cfg["split"]]],
                "annotations": files["inquire_annotations.csv"], "precomputed": {}}
    for backbone, folder in (precomputed or {}).items():
        require_files([(Path(folder) / "img_emb", f"precomputed iNat24 embeddings of {backbone}"),
                       (Path(folder) / "metadata", f"their metadata parquet files")])
        manifest["precomputed"][backbone] = str(folder)
    manifest["pool_root"] = str(root / "inat24")
    if cfg["pool"] == "images":
        manifest["pool_root"] = locate_inat24_images(cfg, root / "inat24", download)
    return manifest


def locate_inat24_images(cfg: dict, root: Path, download: bool) -> str:
    """The extracted iNat24 ``train/`` folder (downloading and extracting train.tar.gz if needed)."""
    done = root / ".train-extracted"
    if (root / "train").is_dir() and (done.exists() or not download):
        if not done.exists():
            logger.warning("%s has no %s marker: if it came from an interrupted extraction it "
                           "is incomplete (switch downloads on to extract it again)",
                           root / "train", done.name)
        return str(root)
    archive = root / "train.tar.gz"
    if not download:
        require_files([(root / "train", "extracted iNat24 images"), (archive, "iNat24 archive")])
    fetch(RemoteFile(cfg["inat24_url"], str(archive), md5=cfg["inat24_md5"]))
    logger.info("extracting %s (441 GB)", archive)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    atomic_write_text(done, "ok\n")  # written last: its presence = extraction complete
    return str(root)


def locate_inquire_labels(cfg: dict, data_root: str | os.PathLike, download: bool) -> dict:
    """Fullrank's query CSVs of both splits and its annotations, never the iNat24 pool:
    INQUIRE-Rerank's full-pool scoring counts each Rerank query's positives from them (a Rerank
    query's split need not be its Fullrank split, so both are listed)."""
    root = Path(data_root) / "inquire"
    names = [QUERY_FILES[split] for split in sorted(QUERY_FILES)]
    files = _inquire_csvs(cfg, root, [*names, "inquire_annotations.csv"], download)
    return {"fullrank_queries": [files[name] for name in names],
            "annotations": files["inquire_annotations.csv"]}


def locate_inquire_rerank(cfg: dict, data_root: str | os.PathLike, download: bool) -> dict:
    """INQUIRE-Rerank parquet files of the configured split."""
    local = Path(data_root) / "inquire" / "rerank"
    split = "validation" if cfg["split"] == "val" else "test"
    pattern = cfg["rerank_patterns"][split]
    return {"parquets": hf_files(cfg["rerank_repo"], pattern, local, download)}


def locate_collection(name: str, cfg: dict, data_root: str | os.PathLike, download: bool) -> dict:
    """Files of one training collection (see quari.data.collections for the formats)."""
    root = Path(data_root) / name
    kind = cfg["format"]
    if kind == "coco":
        split = cfg.get("split", "train2017")  # val2017: 5,000 images (1 GB), for a quick run
        captions = root / "annotations" / f"captions_{split}.json"
        images = root / split
        # the URLs are needed only to download (a config with downloads off may leave them out)
        zips = ((cfg.get("annotations_url"), "annotations_trainval2017.zip"),
                (cfg.get("images_url"), f"{split}.zip"))
        if download and not all(url for url, _ in zips):
            raise ValueError(f"real.collections.{name}: downloads are on but annotations_url or "
                             "images_url is not set (paper.yaml has both)")
        if download and not (captions.is_file() and images.is_dir()):
            for url, zip_name in zips:
                _fetch_zip(url, root, zip_name)
        elif download:  # a zip of ours whose extraction was interrupted is extracted again
            for url, zip_name in zips:
                if (root / zip_name).exists() and not _extracted_marker(root, zip_name).exists():
                    _fetch_zip(url, root, zip_name)
        require_files([(captions, "MS-COCO captions"), (images, f"MS-COCO {split} images")])
        return {"format": kind, "captions": str(captions), "images": str(images)}
    if kind == "webdataset":
        pattern = cfg.get("pattern", "*.tar")
        if cfg.get("hf_repo"):
            tars = hf_files(cfg["hf_repo"], pattern, root, download, expected=None)
        else:
            tars = sorted(str(p) for p in root.glob(pattern))
            if not tars:
                require_files([(root / pattern, f"{name} webdataset shards")])
        if cfg.get("max_shards"):
            tars = tars[:cfg["max_shards"]]
        return {"format": kind, "tars": tars}
    if kind == "table":
        table = root / cfg["table"]
        require_files([(table, f"{name} image-caption table")])
        return {"format": kind, "table": str(table), "image_root": str(root / cfg.get("image_root", "."))}
    if kind == "uned":
        paths = root / "uned_paths_1M.txt"
        if download:  # a copy not stamped as downloaded from paths_url is fetched again
            fetch(RemoteFile(cfg["paths_url"], str(paths)))
        require_files([(paths, "UnED 1M image list (ILIAS misc/uned_paths_1M.txt)"),
                       (root / "images", "UnED images (assembled with UnED's own scripts)")])
        return {"format": kind, "paths": str(paths), "image_root": str(root / "images")}
    raise ValueError(f"collection {name}: unknown format {kind!r}")


def webdataset_listing(name: str, cfg: dict, data_root: str | os.PathLike,
                       download: bool) -> list[str]:
    """The shards of a webdataset collection embedded in groups (CC12M), relative to
    ``data_root/<name>``, in order, without fetching any: the hub's listing (with downloads on,
    kept as ``hf_files`` keeps it), else the listing an earlier download kept, else the shards
    found there; the first ``max_shards`` when set. :func:`locate_webdataset_group` fetches a
    group of them."""
    root = Path(data_root) / name
    pattern = cfg.get("pattern", "*.tar")
    repo = cfg.get("hf_repo")
    kept = _listing_path(root, repo, pattern) if repo else None
    if repo and download:
        names = hf_matching_files(repo, pattern)
        for n in names:
            path_inside(root, n, f"file of {repo}")
        atomic_write_json(kept, {"repo": repo, "pattern": pattern, "files": names})
    elif kept is not None and kept.is_file():
        names = json.loads(kept.read_text())["files"]
    else:
        names = sorted(str(p.relative_to(root)) for p in root.rglob(pattern) if p.is_file())
    if not names:
        require_files([(root / pattern, f"{name} webdataset shards")])
    return names[:cfg["max_shards"]] if cfg.get("max_shards") else names


def locate_webdataset_group(name: str, cfg: dict, data_root: str | os.PathLike, download: bool,
                            names: Sequence[str]) -> dict:
    """The shards ``names`` (of :func:`webdataset_listing`) of a webdataset collection, present
    under ``data_root/<name>`` (fetched from the hub when missing and allowed)."""
    root = Path(data_root) / name
    repo = cfg.get("hf_repo")
    if repo:
        tars = [str(hf_file(repo, n, root, download)) for n in names]
    else:
        tars = [str(path_inside(root, n, f"{name} shard")) for n in names]
        require_files([(t, f"{name} webdataset shard") for t in tars])
    return {"format": "webdataset", "tars": tars}


def _fetch_zip(url: str, root: Path, name: str) -> None:
    """Download a zip (verified by the CRC of every member) and extract it into ``root``."""
    import zipfile
    archive = root / name
    fetch(RemoteFile(url, str(archive)))
    with zipfile.ZipFile(archive) as z:
        bad = z.testzip()
        if bad is not None:
            archive.unlink()
            raise ValueError(f"{archive}: member {bad} fails its CRC; removed, run again")
        z.extractall(root)
    atomic_write_text(_extracted_marker(root, name), "ok\n")  # last: extraction complete


def _extracted_marker(root: Path, name: str) -> Path:
    return root / f".{name}.extracted"
