"""Fetching the official files: resumable, verified, atomic; or found where a user already has them.

- :func:`fetch` downloads one URL into ``<path>.part``, resuming with an HTTP ``Range`` request
  after an interruption, verifies the complete file (sha256, md5 and/or size) and only then moves
  it to ``path``. A file at ``path`` that fails verification (truncated, corrupt) is removed and
  fetched again, never used. Verification of a file already in place is remembered in a stamp
  (``.<name>.verified``, holding its size, mtime and digest), so an unchanged multi-GB file is not
  re-hashed on every run; any change of size or mtime makes it be verified again.
- :func:`hf_file` gives the local path of a file of a Hugging Face repository: from ``data_root``
  when the user already has it there, else through ``huggingface_hub.hf_hub_download`` (resumable
  and cached by the hub client).
- With downloading switched off, :func:`require_files` raises one :class:`MissingDataError` listing
  every expected file and where it was looked for.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from quari.store import atomic_write_json

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read per network / disk step


class MissingDataError(FileNotFoundError):
    """Files a stage needs are not where the configuration says they are (downloads are off)."""


class VerificationError(ValueError):
    """A complete download does not match its expected checksum or size."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch and how to recognise a correct copy (at least one check is advisable)."""

    url: str                   # where the official copy is
    path: str                  # where it lands locally
    sha256: str | None = None  # expected hex digest
    md5: str | None = None     # expected hex digest (what iNat publishes)
    size: int | None = None    # expected number of bytes


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: str | os.PathLike, sha256: str | None = None, md5: str | None = None,
               size: int | None = None) -> None:
    """Raise VerificationError naming the file and the first check that fails."""
    path = Path(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise VerificationError(f"{path}: {actual} bytes, expected {size}")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            got = file_digest(path, algorithm)
            if got.lower() != expected.lower():
                raise VerificationError(f"{path}: {algorithm} {got}, expected {expected}")


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _expected(remote: RemoteFile) -> dict:
    return {"sha256": remote.sha256, "md5": remote.md5, "size": remote.size}


def is_verified(remote: RemoteFile) -> bool:
    """True when ``remote.path`` exists and matches its checks (re-hashed only if it changed since
    the last successful verification)."""
    path = Path(remote.path)
    if not path.is_file():
        return False
    stat = path.stat()
    stamp = _stamp_path(path)
    if stamp.exists():
        try:
            seen = json.loads(stamp.read_text())
        except (OSError, ValueError):
            seen = {}
        if seen == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **_expected(remote)}:
            return True
    try:
        check_file(path, remote.sha256, remote.md5, remote.size)
    except VerificationError as err:
        logger.warning("%s", err)
        return False
    atomic_write_json(stamp, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **_expected(remote)})
    return True


def _open(url: str, start: int, timeout: float):
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    return urllib.request.urlopen(request, timeout=timeout)


def _transfer(remote: RemoteFile, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of the file to ``part`` (restarting from zero if the server ignores Range)."""
    start = part.stat().st_size if part.exists() else 0
    try:
        response = _open(remote.url, start, timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not start:  # 416: the .part already holds every byte
            raise
        return
    with response:
        resumed = start > 0 and response.status == 206
        if start and not resumed:
            logger.info("%s: server ignored the range request; starting again", remote.url)
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, disable=not progress,
                desc=Path(remote.path).name) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"{remote.url}: connection closed after {part.stat().st_size} of "
                              f"{total} bytes")


def fetch(remote: RemoteFile, retries: int = 3, timeout: float = 60.0, progress: bool = True,
          backoff: float = 2.0) -> Path:
    """Make ``remote.path`` a verified copy of ``remote.url`` and return it.

    A verified file in place is kept (nothing is downloaded). Otherwise the bytes go to
    ``<path>.part``; an interrupted transfer resumes from the bytes already there, on the next
    attempt or the next run. A complete ``.part`` that fails verification is deleted and fetched
    again from zero; after ``retries`` failed attempts the last error is raised and ``path`` is
    left absent.
    """
    path = Path(remote.path)
    if is_verified(remote):
        logger.info("%s: present and verified", path)
        return path
    if path.exists():
        logger.warning("%s fails verification; removing it and fetching it again", path)
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            _transfer(remote, part, timeout, progress)
            check_file(part, remote.sha256, remote.md5, remote.size)
        except VerificationError as err:
            logger.warning("attempt %d: %s; discarding the download", attempt, err)
            part.unlink(missing_ok=True)
            error = err
        except (OSError, http.client.HTTPException) as err:  # network errors, cut transfers
            logger.warning("attempt %d of %s failed: %s (kept %d bytes to resume)", attempt,
                           remote.url, err, part.stat().st_size if part.exists() else 0)
            error = err
        else:
            os.replace(part, path)
            stat = path.stat()
            atomic_write_json(_stamp_path(path), {"size": stat.st_size,
                                                  "mtime_ns": stat.st_mtime_ns, **_expected(remote)})
            logger.info("%s: downloaded and verified", path)
            return path
        if attempt < retries:
            time.sleep(backoff * attempt)
    raise RuntimeError(f"could not fetch {remote.url} into {path} after {retries} attempts: "
                       f"{error}") from error


def read_checksums(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(sha256, url)`` pairs of a checksums file of ``<sha256> <url>`` lines (the ILIAS server's)."""
    pairs = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path}:{lineno}: expected '<sha256> <url>', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def require_files(expected: Iterable[tuple[str | os.PathLike, str]]) -> None:
    """Raise MissingDataError listing every ``(path, what it is)`` whose path does not exist."""
    missing = [(str(p), what) for p, what in expected if not Path(p).exists()]
    if missing:
        lines = "\n".join(f"  {p}   ({what})" for p, what in missing)
        raise MissingDataError(f"{len(missing)} expected data file(s) are missing "
                               f"(downloads are off, or data_root points elsewhere):\n{lines}")


def hf_file(repo_id: str, filename: str, local_dir: str | os.PathLike, download: bool = True,
            repo_type: str = "dataset", revision: str | None = None) -> Path:
    """Local path of ``filename`` from a Hugging Face repository, kept under ``local_dir``.

    A file already at ``local_dir/filename`` is used as is (a user's own copy). Otherwise, with
    ``download``, ``huggingface_hub.hf_hub_download`` fetches it there (resumable, checked by the
    hub client against the repository's own hashes); without, MissingDataError says what is
    expected where.
    """
    target = Path(local_dir) / filename
    if target.is_file():
        return target
    if not download:
        require_files([(target, f"{filename} of the Hugging Face {repo_type} {repo_id}")])
    from huggingface_hub import hf_hub_download
    return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision,
                                local_dir=str(local_dir)))


def hf_matching_files(repo_id: str, pattern: str, repo_type: str = "dataset",
                      revision: str | None = None) -> list[str]:
    """Names of a Hugging Face repository's files matching a glob ``pattern``, sorted (one call
    to the hub's file listing, for shard sets whose count is not fixed in advance)."""
    import fnmatch

    from huggingface_hub import list_repo_files
    names = list_repo_files(repo_id, repo_type=repo_type, revision=revision)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))
