"""Downloads: resume after an interruption, verification, atomic landing, refetch of bad files.

A local HTTP server in a thread serves generated files; it can cut a transfer short, serve
corrupt bytes, or ignore Range requests, and records every request it gets.
"""

import hashlib
from pathlib import Path

import pytest

from quari.data import downloads
from quari.data.downloads import (MissingDataError, RemoteFile, fetch, hf_file, read_checksums,
                                  require_files)
from tests.builders import PAYLOAD


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


def test_a_body_cut_short_without_content_length_is_never_accepted(server, tmp_path):
    # no checksum, no size: the INQUIRE CSVs, checksums.txt, id lists, the UnED list
    server.mode = "nolength"
    remote = _remote(server, tmp_path)
    path = fetch(remote, retries=2, progress=False, backoff=0)
    assert path.read_bytes() == PAYLOAD
    # the cut transfer, the server asked for the bytes after it (it had more), the rest
    cut = server.cut_at + 1000
    assert [r[1] for r in server.requests][:3] == [None, f"bytes={cut}-", f"bytes={cut}-"]


def test_a_body_cut_short_every_time_without_content_length_fails(server, tmp_path):
    # no size, no range support, and every transfer cut at another place: never complete
    server.mode, server.ranges, server.cut_always = "nolength", False, True
    remote = _remote(server, tmp_path)
    with pytest.raises(RuntimeError, match="differ"):
        fetch(remote, retries=2, progress=False, backoff=0)
    assert not Path(remote.path).exists()


def test_a_complete_body_without_content_length_is_confirmed_by_the_server(server, tmp_path):
    server.mode, server.cut_once = "nolength", False
    remote = _remote(server, tmp_path)
    assert fetch(remote, progress=False).read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == [None, f"bytes={len(PAYLOAD)}-"]  # 416: complete


@pytest.mark.parametrize("honours_if_range", [True, False])
def test_a_part_of_an_older_version_of_the_file_is_not_resumed(server, tmp_path, honours_if_range):
    server.mode = "cut"
    remote = _remote(server, tmp_path)  # no checksum: only the ETag tells the versions apart
    with pytest.raises(RuntimeError):
        fetch(remote, retries=1, progress=False, backoff=0)
    part = Path(remote.path).with_name("data.bin.part")
    assert part.stat().st_size == server.cut_at
    new = bytes(reversed(PAYLOAD))  # the file changed on the server, same size
    server.files["/data.bin"] = new
    server.if_range = honours_if_range
    fetch(remote, retries=1, progress=False)
    assert Path(remote.path).read_bytes() == new
    assert not part.exists() and not Path(remote.path).with_name("data.bin.part.json").exists()


def test_a_part_without_a_recorded_origin_is_not_resumed(server, tmp_path):
    remote = _remote(server, tmp_path)
    part = Path(remote.path).with_name("data.bin.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000][::-1])  # a leftover of unknown origin
    fetch(remote, progress=False)
    assert Path(remote.path).read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == [None]


def test_a_range_resume_checks_the_servers_total_size(server, tmp_path):
    server.mode = "cut"
    remote = _remote(server, tmp_path)
    with pytest.raises(RuntimeError):
        fetch(remote, retries=1, progress=False, backoff=0)
    # same ETag (a server that keeps it), but the object grew: the total of Content-Range differs
    server.etags["/data.bin"] = f'"{hashlib.md5(PAYLOAD).hexdigest()}"'
    new = PAYLOAD[::-1] + b"more"
    server.files["/data.bin"] = new
    server.if_range = False
    fetch(remote, retries=1, progress=False)
    assert Path(remote.path).read_bytes() == new


def test_a_verified_stamp_is_for_one_url_and_one_set_of_checks(server, tmp_path):
    remote = _remote(server, tmp_path)
    fetch(remote, progress=False)
    fetch(remote, progress=False)
    assert len(server.requests) == 1  # the second call keeps the stamped file
    server.files["/v2/data.bin"] = b"version 2"
    moved = RemoteFile(remote.url.replace("/data.bin", "/v2/data.bin"), remote.path)
    assert fetch(moved, progress=False).read_bytes() == b"version 2"  # another URL: fetched
    # a checksum added to the configuration: the file in place is checked against it
    with pytest.raises(RuntimeError, match="sha256"):
        fetch(RemoteFile(moved.url, moved.path, sha256=SHA), retries=1, progress=False, backoff=0)


def test_a_file_without_checks_and_without_a_stamp_is_fetched_again(server, tmp_path):
    remote = _remote(server, tmp_path)
    Path(remote.path).parent.mkdir(parents=True)
    Path(remote.path).write_bytes(PAYLOAD[:10])  # e.g. a cut download of an older version
    assert fetch(remote, progress=False).read_bytes() == PAYLOAD


def _fake_hub(monkeypatch, files: dict[str, bytes]):
    """The hub's listing and download of a repository holding ``files``."""
    import huggingface_hub

    from quari.data import sources
    fetched = []

    def fake_download(repo_id, filename, repo_type, revision, local_dir):
        fetched.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[filename])
        return str(target)

    def fake_listing(repo_id, pattern, repo_type="dataset", revision=None):
        import fnmatch
        return sorted(n for n in files if fnmatch.fnmatch(n, pattern))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(sources, "hf_matching_files", fake_listing)
    return fetched


def test_a_multi_file_set_is_complete_only_with_every_listed_file(tmp_path, monkeypatch):
    from quari.data.sources import hf_files
    files = {f"shard-{n}.tar": bytes([n]) * 10 for n in range(3)}
    fetched = _fake_hub(monkeypatch, files)
    local = tmp_path / "hf"
    local.mkdir()
    (local / "shard-0.tar").write_bytes(files["shard-0.tar"])  # an interrupted earlier run
    (local / "shard-1.tar").write_bytes(files["shard-1.tar"])
    got = hf_files("org/ds", "*.tar", local, download=True)
    assert [Path(p).name for p in got] == sorted(files) and fetched == ["shard-2.tar"]
    # downloads off afterwards: the listing kept from the download is the reference
    (local / "shard-1.tar").unlink()
    with pytest.raises(MissingDataError, match="shard-1.tar"):
        hf_files("org/ds", "*.tar", local, download=False)


def test_names_of_a_listing_never_leave_the_data_folder(tmp_path, monkeypatch):
    from quari.data.sources import hf_files
    from quari.paths import UnsafePathError
    _fake_hub(monkeypatch, {"../evil.tar": b"x", "ok.tar": b"y"})
    with pytest.raises(UnsafePathError, match="evil"):
        hf_files("org/ds", "*.tar", tmp_path / "hf", download=True)
    assert not (tmp_path / "evil.tar").exists()
    with pytest.raises(UnsafePathError):
        hf_file("org/ds", "/abs/evil.tar", tmp_path / "hf")


def test_fewer_local_yfcc_shards_than_configured_are_reported(tmp_path):
    from quari.data.sources import locate_ilias_yfcc
    shards = tmp_path / "ilias" / "server" / "yfcc100m"
    shards.mkdir(parents=True)
    for n in range(3):
        (shards / f"{n:04d}.tar").write_bytes(b"x")
    assert len(locate_ilias_yfcc({"yfcc_shards": 3}, tmp_path, False)["distractor_tars"]) == 3
    with pytest.raises(MissingDataError, match="3 YFCC100M shards, the configuration asks for 5"):
        locate_ilias_yfcc({"yfcc_shards": 5}, tmp_path, False)


def test_a_list_left_by_a_cut_download_is_fetched_again(server, tmp_path):
    from quari.data.sources import locate_collection
    full = b"a/1.jpg,1,d\nb/2.jpg,2,d\n"
    server.files["/uned_paths_1M.txt"] = full
    root = tmp_path / "uned"
    (root / "images").mkdir(parents=True)
    (root / "uned_paths_1M.txt").write_bytes(full[:9])  # what a cut transfer left, no stamp
    url = f"http://127.0.0.1:{server.server_address[1]}/uned_paths_1M.txt"
    files = locate_collection("uned", {"format": "uned", "paths_url": url}, tmp_path, True)
    assert Path(files["paths"]).read_bytes() == full
    locate_collection("uned", {"format": "uned", "paths_url": url}, tmp_path, True)
    assert len(server.requests) == 1  # now stamped as a verified copy of that URL: kept
