"""Downloads: resume after an interruption, verification, atomic landing, refetch of bad files.

A local HTTP server in a thread serves generated files; it can cut a transfer short, serve
corrupt bytes, or ignore Range requests, and records every request it gets.
"""

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from quari.data import downloads
from quari.data.downloads import (MissingDataError, RemoteFile, fetch, hf_file, read_checksums,
                                  require_files)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so a transfer spans several read chunks


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; ``server.mode`` is normal, cut (stop after `cut_at` bytes once),
    corrupt (flip a byte), or norange (ignore Range)."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and server.mode != "norange":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if server.mode == "corrupt":
            body = body[:10] + bytes([body[10] ^ 0xFF]) + body[11:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.mode == "cut":
            server.mode = "normal"  # only the first transfer is cut
            self.wfile.write(body[:server.cut_at])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files = {"/data.bin": PAYLOAD}
    httpd.mode, httpd.cut_at, httpd.requests = "normal", 300_000, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _remote(server, tmp_path, **checks):
    url = f"http://127.0.0.1:{server.server_address[1]}/data.bin"
    return RemoteFile(url, str(tmp_path / "out" / "data.bin"), **checks)


SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_fetch_verifies_lands_atomically_and_is_not_repeated(server, tmp_path):
    remote = _remote(server, tmp_path, sha256=SHA, md5=MD5, size=len(PAYLOAD))
    path = fetch(remote, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("data.bin.part").exists()
    assert len(server.requests) == 1
    fetch(remote, progress=False)  # verified already: no second request, not re-hashed
    assert len(server.requests) == 1


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    server.mode = "cut"
    remote = _remote(server, tmp_path, sha256=SHA)
    with pytest.raises(RuntimeError, match="after 1 attempts"):
        fetch(remote, retries=1, progress=False, backoff=0)
    part = Path(remote.path).with_name("data.bin.part")
    assert part.stat().st_size == server.cut_at and not Path(remote.path).exists()
    fetch(remote, retries=1, progress=False)  # the next run picks up where the last stopped
    assert server.requests[-1] == ("/data.bin", f"bytes={server.cut_at}-")
    assert Path(remote.path).read_bytes() == PAYLOAD and not part.exists()


def test_retries_within_one_call_resume(server, tmp_path):
    server.mode = "cut"
    remote = _remote(server, tmp_path, size=len(PAYLOAD))
    fetch(remote, retries=2, progress=False, backoff=0)
    assert [r[1] for r in server.requests] == [None, f"bytes={server.cut_at}-"]
    assert Path(remote.path).read_bytes() == PAYLOAD


def test_corrupt_download_is_discarded_never_used(server, tmp_path):
    server.mode = "corrupt"
    remote = _remote(server, tmp_path, sha256=SHA)
    with pytest.raises(RuntimeError, match="sha256"):
        fetch(remote, retries=2, progress=False, backoff=0)
    assert not Path(remote.path).exists()
    assert not Path(remote.path).with_name("data.bin.part").exists()
    assert len(server.requests) == 2  # every attempt starts again from zero


def test_truncated_or_changed_file_in_place_is_fetched_again(server, tmp_path):
    remote = _remote(server, tmp_path, md5=MD5)
    path = fetch(remote, progress=False)
    path.write_bytes(PAYLOAD[:1000])  # truncated after verification (size and mtime change)
    fetch(remote, progress=False)
    assert path.read_bytes() == PAYLOAD and len(server.requests) == 2


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    remote = _remote(server, tmp_path, sha256=SHA)
    part = Path(remote.path).with_name("data.bin.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes from elsewhere")
    server.mode = "norange"
    fetch(remote, progress=False)
    assert Path(remote.path).read_bytes() == PAYLOAD


def test_checksums_file_and_missing_files(tmp_path):
    sums = tmp_path / "checksums.txt"
    sums.write_text(f"{SHA} https://host/ilias_data/yfcc100m/a.tar\n\n{MD5 * 2} https://host/b\n")
    assert read_checksums(sums) == [(SHA, "https://host/ilias_data/yfcc100m/a.tar"),
                                    (MD5 * 2, "https://host/b")]
    sums.write_text("nothex https://host/x\n")
    with pytest.raises(ValueError, match="checksums.txt:1"):
        read_checksums(sums)
    (tmp_path / "here.txt").write_text("x")
    with pytest.raises(MissingDataError) as err:
        require_files([(tmp_path / "here.txt", "present"), (tmp_path / "a.tar", "shard a"),
                       (tmp_path / "b.csv", "table b")])
    assert "a.tar" in str(err.value) and "shard a" in str(err.value) and "b.csv" in str(err.value)
    assert "here.txt" not in str(err.value)


def test_hf_file_uses_local_copy_or_the_hub_client(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, repo_type, revision, local_dir):
        calls.append((repo_id, filename, repo_type, local_dir))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("from hub")
        return str(target)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    mine = tmp_path / "data" / "shard.tar"
    mine.parent.mkdir()
    mine.write_text("mine")
    assert hf_file("org/ds", "shard.tar", tmp_path / "data") == mine and not calls
    with pytest.raises(MissingDataError, match="other.tar"):
        hf_file("org/ds", "other.tar", tmp_path / "data", download=False)
    got = hf_file("org/ds", "sub/other.tar", tmp_path / "data")
    assert got.read_text() == "from hub"
    assert calls == [("org/ds", "sub/other.tar", "dataset", str(tmp_path / "data"))]


def test_file_digest_matches_hashlib(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(PAYLOAD * 3)
    assert downloads.file_digest(path, "sha256") == hashlib.sha256(PAYLOAD * 3).hexdigest()
