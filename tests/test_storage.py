"""crystalae.uri_fs against a local folder and a loopback S3 server (moto)."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow.fs import LocalFileSystem

from crystalae import uri_fs


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A folder location that does not exist yet: under tmp_path, or inside a fresh S3 bucket."""
    if request.param == "local":
        return tmp_path / "store"
    return request.getfixturevalue("s3_bucket") + "/store"


def test_is_remote_join_and_name_of():
    assert uri_fs.is_remote("s3://bucket/key") and uri_fs.is_remote("gs://bucket") and uri_fs.is_remote("S3://b")
    assert not uri_fs.is_remote("file:///tmp/x") and not uri_fs.is_remote("/tmp/x") and not uri_fs.is_remote(Path("a/b"))
    assert not uri_fs.is_remote("relative/s3:/x")
    assert uri_fs.join("s3://bucket/", "runs/", "/a.json") == "s3://bucket/runs/a.json"
    assert uri_fs.join("s3://bucket/runs", Path("x") / "y") == "s3://bucket/runs/x/y"
    assert uri_fs.join("/tmp/runs", "a", "b.json") == Path("/tmp/runs/a/b.json")
    assert uri_fs.join(Path("runs"), "a") == Path("runs/a")
    assert uri_fs.name_of("s3://bucket/runs/a.json") == "a.json"
    assert uri_fs.name_of("s3://bucket/runs/") == "runs"
    assert uri_fs.name_of("s3://bucket") == "bucket"
    assert uri_fs.name_of(Path("/tmp/x/y.parquet")) == "y.parquet"


def test_filesystem_paths_and_cache(s3_bucket, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    fs, path = uri_fs.filesystem("rel/file.txt")
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "rel" / "file.txt")
    assert uri_fs.filesystem("file:///tmp/x.txt")[1] == "/tmp/x.txt"
    bucket = s3_bucket.removeprefix("s3://")
    fs, path = uri_fs.filesystem(s3_bucket + "/a/b.json")
    assert fs.type_name == "s3" and path == f"{bucket}/a/b.json"
    assert uri_fs.filesystem(s3_bucket)[1] == bucket
    assert uri_fs.filesystem(s3_bucket + "/other")[0] is fs  # cached per bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert uri_fs.filesystem(s3_bucket)[0] is not fs  # a changed environment builds a new one


def test_write_read_round_trip(root):
    location = uri_fs.join(root, "a", "b.json")
    data = {"b": [1, 2.5, None], "a": "é"}
    assert not uri_fs.exists(location) and not uri_fs.is_file(location)
    uri_fs.write_json(location, data)
    assert uri_fs.exists(location) and uri_fs.is_file(location)
    assert uri_fs.exists(uri_fs.join(root, "a")) and not uri_fs.is_file(uri_fs.join(root, "a"))
    assert uri_fs.read_json(location) == data
    assert uri_fs.read_text(location) == '{\n  "a": "\\u00e9",\n  "b": [\n    1,\n    2.5,\n    null\n  ]\n}\n'
    uri_fs.write_text(location, "héllo")
    assert uri_fs.read_bytes(location) == "héllo".encode()
    uri_fs.write_bytes(location, b"\x00\x01")
    assert uri_fs.read_bytes(location) == b"\x00\x01"


def test_missing_file_names_the_location(root):
    location = uri_fs.join(root, "missing.json")
    for read in (uri_fs.read_bytes, uri_fs.read_json, uri_fs.open_input):
        with pytest.raises(FileNotFoundError, match="missing.json"):
            read(location)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        uri_fs.download_file(location, Path("/nonexistent/never-written"))


def test_list_files_and_remove_tree(root):
    assert uri_fs.list_files(root) == []
    uri_fs.write_bytes(uri_fs.join(root, "z.bin"), b"1")
    uri_fs.write_bytes(uri_fs.join(root, "sub", "b.bin"), b"123")
    uri_fs.write_bytes(uri_fs.join(root, "sub", "deeper", "c.bin"), b"12345")
    assert uri_fs.list_files(root) == [("sub/b.bin", 3), ("sub/deeper/c.bin", 5), ("z.bin", 1)]
    assert uri_fs.list_files(uri_fs.join(root, "sub")) == [("b.bin", 3), ("deeper/c.bin", 5)]
    uri_fs.remove_tree(uri_fs.join(root, "sub"))
    assert uri_fs.list_files(root) == [("z.bin", 1)]
    uri_fs.remove_tree(root)
    assert uri_fs.list_files(root) == [] and not uri_fs.exists(root)
    uri_fs.remove_tree(root)  # already gone: no error


def test_remove_tree_on_a_bucket_root_keeps_the_bucket(s3_bucket):
    uri_fs.write_bytes(uri_fs.join(s3_bucket, "a", "x.bin"), b"x")
    uri_fs.remove_tree(s3_bucket)
    assert uri_fs.list_files(s3_bucket) == []
    uri_fs.write_bytes(uri_fs.join(s3_bucket, "y.bin"), b"y")  # the bucket is still there
    assert uri_fs.list_files(s3_bucket) == [("y.bin", 1)]


def test_parquet_through_open_output_and_open_input(root):
    location = uri_fs.join(root, "t", "table.parquet")
    table = pa.table({"id": ["a", "b", "c"], "value": [1.5, 2.5, None]})
    with uri_fs.open_output(location) as handle:
        pq.write_table(table, handle)
    with uri_fs.open_input(location) as handle:
        assert pq.read_table(handle).equals(table)
    assert [name for name, _ in uri_fs.list_files(root)] == ["t/table.parquet"]  # no temp file left behind


def test_open_output_publishes_nothing_when_the_writer_fails(root):
    location = uri_fs.join(root, "out.bin")
    uri_fs.write_bytes(location, b"old")
    with pytest.raises(RuntimeError), uri_fs.open_output(location) as handle:
        handle.write(b"partial")
        raise RuntimeError("writer failed")
    assert uri_fs.read_bytes(location) == b"old"
    assert uri_fs.list_files(root) == [("out.bin", 3)]


def _local_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_upload_publishes_last_files_last(root, tmp_path, monkeypatch):
    local = _local_tree(tmp_path / "src", {
        "manifest.json": b"{}", "b.bin": b"bb", "a/c.bin": b"c", "skip.txt": b"s",
        ".hidden": b"h", "x.bin.tmp": b"t", "y.lock": b"l", ".git/config": b"g",
    })
    order = []
    upload_file = uri_fs.upload_file

    def recording(path, location):
        order.append(uri_fs.name_of(location))
        upload_file(path, location)

    monkeypatch.setattr(uri_fs, "upload_file", recording)
    uploaded = uri_fs.upload(local, root, include=lambda name: name != "skip.txt", last=("manifest.json", "absent.json"))
    assert uploaded == ["a/c.bin", "b.bin", "manifest.json"]
    assert order == ["c.bin", "b.bin", "manifest.json"]
    assert uri_fs.list_files(root) == [("a/c.bin", 1), ("b.bin", 2), ("manifest.json", 2)]
    assert uri_fs.read_bytes(uri_fs.join(root, "a", "c.bin")) == b"c"
    with pytest.raises(FileNotFoundError):
        uri_fs.upload(tmp_path / "nowhere", root)


def test_upload_file_and_download_file(root, tmp_path):
    source = _local_tree(tmp_path / "src", {"one.bin": b"payload"}) / "one.bin"
    location = uri_fs.join(root, "deep", "one.bin")
    uri_fs.upload_file(source, location)
    assert uri_fs.read_bytes(location) == b"payload"
    target = uri_fs.download_file(location, tmp_path / "dl" / "one.bin")
    assert target.read_bytes() == b"payload"
    fs, path = uri_fs.filesystem(location)
    assert target.stat().st_mtime_ns == fs.get_file_info(path).mtime_ns


def test_download_of_a_local_location_is_the_location(tmp_path):
    assert uri_fs.download(tmp_path / "here") == tmp_path / "here"
    assert uri_fs.download(str(tmp_path)) == tmp_path
    assert not (tmp_path / "here").exists()


def test_download_mirrors_and_skips_unchanged_files(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYSTALAE_CACHE", str(tmp_path / "cache"))
    remote = uri_fs.join(s3_bucket, "run")
    uri_fs.upload(_local_tree(tmp_path / "src", {"a.json": b"{}", "w/model.pt": b"weights", "w/log.txt": b"log"}), remote)
    local = uri_fs.download(remote)
    mirror = uri_fs.cache_for(remote)  # per endpoint: the loopback server is not AWS's s3
    assert local == mirror and mirror.parent.parent.name.startswith("s3@") and mirror.parts[-2:] == (s3_bucket[5:], "run")
    with monkeypatch.context() as default_endpoint:
        default_endpoint.delenv("AWS_ENDPOINT_URL")
        assert uri_fs.cache_for(remote) == tmp_path / "cache" / "remote" / "s3" / s3_bucket[5:] / "run"
    assert [name for name, _ in uri_fs.list_files(local)] == ["a.json", "w/log.txt", "w/model.pt"]
    assert (local / "w" / "model.pt").read_bytes() == b"weights"
    inodes = {p.name: p.stat().st_ino for p in local.rglob("*") if p.is_file()}

    uri_fs.write_bytes(uri_fs.join(remote, "w", "log.txt"), b"longer log")  # a changed size: fetched again
    assert uri_fs.download(remote) == local
    after = {p.name: p.stat().st_ino for p in local.rglob("*") if p.is_file()}
    assert after["a.json"] == inodes["a.json"] and after["model.pt"] == inodes["model.pt"]  # unchanged: not rewritten
    assert after["log.txt"] != inodes["log.txt"] and (local / "w" / "log.txt").read_bytes() == b"longer log"

    only = uri_fs.download(remote, tmp_path / "only", include=lambda name: name.endswith(".json"))
    assert [p.name for p in only.rglob("*") if p.is_file()] == ["a.json"]


def test_cache_root_and_cache_for(monkeypatch, tmp_path):
    monkeypatch.delenv("CRYSTALAE_CACHE", raising=False)
    assert uri_fs.cache_root() == Path.home() / ".cache" / "crystalae"
    monkeypatch.setenv("CRYSTALAE_CACHE", str(tmp_path))
    assert uri_fs.cache_root() == tmp_path
    assert uri_fs.cache_for("s3://bucket/runs/r1/") == tmp_path / "remote" / "s3" / "bucket" / "runs" / "r1"
    assert uri_fs.cache_for("gs://b") == tmp_path / "remote" / "gs" / "b"
    assert uri_fs.cache_for(tmp_path / "x") == tmp_path / "x"
    for bad in ("s3://bucket/../../etc", "s3://../x", "s3://b/a/../../.."):
        with pytest.raises(ValueError, match=r"\.\."):
            uri_fs.cache_for(bad)


def test_download_skips_and_names_keys_that_climb_out(s3_bucket, tmp_path, caplog):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key="run/../../escape.txt", Body=b"x")
    assert uri_fs.list_files(uri_fs.join(s3_bucket, "run")) == [("../../escape.txt", 1)]
    uri_fs.download(uri_fs.join(s3_bucket, "run"), tmp_path / "mirror" / "run")  # the rest still mirrors (issue 24)
    assert "skipped the object" in caplog.text and "../../escape.txt" in caplog.text
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "mirror" / "escape.txt").exists()
