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

from quari.paths import path_inside
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


def _part_meta_path(part: Path) -> Path:
    """Where the identity of the remote object a ``.part`` holds the first bytes of is kept."""
    return part.with_name(f"{part.name}.json")


def _expected(remote: RemoteFile) -> dict:
    return {"sha256": remote.sha256, "md5": remote.md5, "size": remote.size}


def _has_checks(remote: RemoteFile) -> bool:
    return any(v is not None for v in _expected(remote).values())


def _stamp(remote: RemoteFile, stat: os.stat_result, origin: dict | None = None) -> dict:
    """What a verification stamp records: the URL the file came from, the checks it passed, and
    the size and mtime it had then (``origin``, the server's ETag / Last-Modified / size when it
    was downloaded, is kept for the record and not compared)."""
    stamp = {"url": remote.url, "file_size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             **_expected(remote)}
    if origin is not None:
        stamp["origin"] = origin
    return stamp


def _stamp_matches(seen: dict, remote: RemoteFile, stat: os.stat_result) -> bool:
    now = _stamp(remote, stat)
    return all(seen.get(k) == v for k, v in now.items())


def is_verified(remote: RemoteFile) -> bool:
    """True when ``remote.path`` exists and is a verified copy of ``remote.url``.

    Its stamp must name the same URL and checks and the file's current size and mtime; otherwise
    a file with checks (sha256, md5, size) is verified again (and stamped), and a file without
    any is not trusted (nothing can show that it is a complete copy of this URL): it is fetched
    again.
    """
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
        if _stamp_matches(seen, remote, stat):
            return True
        if seen.get("url") not in (None, remote.url):
            logger.info("%s was downloaded from %s, not %s", path, seen.get("url"), remote.url)
            return False
    if not _has_checks(remote):
        return False
    try:
        check_file(path, remote.sha256, remote.md5, remote.size)
    except VerificationError as err:
        logger.warning("%s", err)
        return False
    atomic_write_json(stamp, _stamp(remote, stat))
    return True


def _open(url: str, timeout: float, start: int = 0, if_range: str | None = None):
    headers = {}
    if start:
        headers["Range"] = f"bytes={start}-"
        if if_range:
            headers["If-Range"] = if_range
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _origin(headers) -> dict:
    """The server's identity of the object it sends: ETag and Last-Modified."""
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}


def _content_range(headers) -> tuple[int | None, int | None]:
    """(first byte, total size) of a 206 answer's ``Content-Range: bytes a-b/total``."""
    value = headers.get("Content-Range") or ""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        first = int(span.split("-", 1)[0]) if span != "*" else None
        return first, (int(total) if total.strip() != "*" else None)
    except ValueError:
        return None, None


def _same_object(saved: dict, now: dict) -> bool:
    """Whether the server's answer is the object a ``.part`` was started from."""
    if saved.get("etag"):
        return now.get("etag") == saved["etag"]
    if saved.get("last_modified"):
        return now.get("last_modified") == saved["last_modified"]
    return False


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _part_meta_path(part).unlink(missing_ok=True)


class IncompleteDownload(ConnectionError):
    """A transfer ended before the whole file arrived (the bytes so far are kept to resume)."""


def _resumable(remote: RemoteFile, part: Path) -> dict | None:
    """The recorded origin of ``part`` when it may be resumed (same URL, with an ETag or
    Last-Modified to ask the server about); else None (the ``.part`` is discarded)."""
    if not part.exists() or part.stat().st_size == 0:
        return None
    try:
        saved = json.loads(_part_meta_path(part).read_text())
    except (OSError, ValueError):
        saved = {}
    if saved.get("url") == remote.url and (saved.get("etag") or saved.get("last_modified")):
        return saved
    logger.info("%s: %d bytes of an earlier download whose origin was not recorded (no ETag or "
                "Last-Modified of %s); starting again", part, part.stat().st_size, remote.url)
    _discard(part)
    return None


def _transfer(remote: RemoteFile, part: Path, timeout: float, progress: bool) -> int | None:
    """Append the rest of the file to ``part``; return the file's total size when the server
    said it (None when it did not, and the transfer could still be cut short).

    A ``.part`` is resumed only when its recorded origin (ETag, else Last-Modified, and size)
    is the object the server now sends, asked with ``If-Range``; otherwise it starts again
    from zero. Raises IncompleteDownload when fewer bytes than the announced size arrived.
    """
    saved = _resumable(remote, part)
    start = part.stat().st_size if saved else 0
    meta = _part_meta_path(part)
    try:
        response = _open(remote.url, timeout, start,
                         (saved or {}).get("etag") or (saved or {}).get("last_modified"))
    except urllib.error.HTTPError as err:
        if err.code != 416 or not start:
            raise
        # 416: nothing at or after byte `start`: complete only if that is the recorded size
        if saved.get("size") == start:
            return start
        _discard(part)
        raise IncompleteDownload(f"{remote.url}: the server has fewer bytes than the "
                                 f"{start} of the partial download; starting again") from None
    with response:
        origin = _origin(response.headers)
        total = None
        if start and response.status == 206:
            first, total = _content_range(response.headers)
            total = total if total is not None else saved.get("size")
            if (first != start or not _same_object(saved, origin)
                    or (saved.get("size") is not None and total != saved["size"])):
                logger.warning("%s changed on the server since the partial download (was %s, "
                               "now %s); starting again", remote.url,
                               {k: saved.get(k) for k in ("etag", "last_modified", "size")},
                               {**origin, "size": total})
                response.close()
                _discard(part)
                return _transfer(remote, part, timeout, progress)
            resumed = True
        else:
            if start:
                logger.info("%s: the server sent the whole file (it ignored the range request "
                            "or the file changed); starting again", remote.url)
            start, resumed = 0, False
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            atomic_write_json(meta, {"url": remote.url, **origin, "size": total})
        chunked = bool(getattr(response, "chunked", False))
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, disable=not progress,
                desc=Path(remote.path).name) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None:
        if size != total:
            raise IncompleteDownload(f"{remote.url}: connection closed after {size} of {total} "
                                     "bytes")
        return total
    if chunked:  # http.client checked the closing chunk: the transfer ended cleanly
        return size
    return _confirm_end(remote, part, timeout)


def _confirm_end(remote: RemoteFile, part: Path, timeout: float) -> int:
    """The server sent no size and closed the connection: ask it for the bytes after the ones
    received. 416 (none) proves the file complete; more bytes mean the transfer was cut (the
    next attempt resumes); a server that ignores ranges is asked for the whole file again, and
    two identical copies are taken as complete."""
    size = part.stat().st_size
    saved = json.loads(_part_meta_path(part).read_text())
    try:
        response = _open(remote.url, timeout, size, saved.get("etag") or saved.get("last_modified"))
    except urllib.error.HTTPError as err:
        if err.code == 416:
            return size
        raise
    with response:
        if response.status == 206:
            raise IncompleteDownload(f"{remote.url}: the connection closed after {size} bytes "
                                     "and the server has more (it sent no Content-Length)")
        digest = hashlib.sha256()
        again = 0
        for chunk in iter(lambda: response.read(CHUNK), b""):
            digest.update(chunk)
            again += len(chunk)
    if again == size and digest.hexdigest() == file_digest(part, "sha256"):
        return size
    _discard(part)
    raise IncompleteDownload(f"{remote.url}: two downloads without a Content-Length differ "
                             f"({size} and {again} bytes); the transfer is being cut short")


def fetch(remote: RemoteFile, retries: int = 3, timeout: float = 60.0, progress: bool = True,
          backoff: float = 2.0) -> Path:
    """Make ``remote.path`` a verified copy of ``remote.url`` and return it.

    A verified file in place is kept (nothing is downloaded). Otherwise the bytes go to
    ``<path>.part`` (with the server's ETag / Last-Modified and size in ``<path>.part.json``);
    an interrupted transfer resumes from the bytes already there, on the next attempt or the
    next run, when the server still has the same object. A file without a published checksum
    is complete only when it has the size the server announced, or the server confirms there
    is nothing after its last byte. A complete ``.part`` that fails verification is deleted and
    fetched again from zero; after ``retries`` failed attempts the last error is raised and
    ``path`` is left absent.
    """
    path = Path(remote.path)
    if is_verified(remote):
        logger.info("%s: present and verified", path)
        return path
    if path.exists():
        logger.warning("%s is not a verified copy of %s; removing it and fetching it again",
                       path, remote.url)
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
            _discard(part)
            error = err
        except (OSError, http.client.HTTPException) as err:  # network errors, cut transfers
            logger.warning("attempt %d of %s failed: %s (kept %d bytes to resume)", attempt,
                           remote.url, err, part.stat().st_size if part.exists() else 0)
            error = err
        else:
            meta = _part_meta_path(part)
            origin = json.loads(meta.read_text()) if meta.exists() else None
            os.replace(part, path)
            meta.unlink(missing_ok=True)
            atomic_write_json(_stamp_path(path), _stamp(remote, path.stat(), origin))
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
    target = path_inside(local_dir, filename, f"file of {repo_id}")
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
