"""Files at a location that is a local path or a pyarrow filesystem URI (s3://, gs://, ...): a small
filesystem API over both (named `uri_fs`, not `storage`, which is what functions call their folder-or-URI
parameter).

Every function takes either kind, so callers never branch on it. Credentials and endpoints come from the
usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), read by pyarrow itself.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import pyarrow as pa
from pyarrow.fs import FileInfo, FileSelector, FileSystem, FileType, LocalFileSystem, copy_files

from crystalae import files

__all__ = [
    "DamagedFileError", "Location", "absolute", "cache_for", "cache_root", "check_bucket", "download",
    "download_file", "exists", "filesystem", "is_file", "is_remote", "join", "list_files", "local_path_of",
    "name_of", "open_input", "open_output", "read_bytes", "read_json", "read_text", "remove_tree", "upload",
    "upload_file", "write_bytes", "write_json", "write_text",
]

Location = str | Path

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
log = logging.getLogger(__name__)
_ENV_PREFIXES = ("AWS_", "GOOGLE_")  # the variables pyarrow reads when it builds a filesystem


def is_remote(location: Location) -> bool:
    """True for a URI with a scheme other than file://."""
    match = _SCHEME.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


def local_path_of(location: Location) -> Path:
    """A local location as a Path (a file:// URI becomes its path)."""
    text = str(location)
    return Path(unquote(urlsplit(text).path)) if text.lower().startswith("file://") else Path(location)


def join(location: Location, *parts: str | Path) -> str | Path:
    """`location` / parts: a Path for a local location, a "/"-joined string for a URI."""
    if not is_remote(location):
        return local_path_of(location).joinpath(*parts)
    pieces = [str(part).strip("/") for part in parts]
    return "/".join([str(location).rstrip("/"), *(piece for piece in pieces if piece)])


def name_of(location: Location) -> str:
    """The last path component."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else local_path_of(location).name


@functools.lru_cache(maxsize=16)
def _remote_root(scheme: str, netloc: str, env: tuple[tuple[str, str], ...]) -> tuple[FileSystem, str]:
    # `env` is only part of the cache key: a changed endpoint or key (tests) must build a new filesystem.
    # from_uri, not S3FileSystem(): only from_uri reads AWS_ENDPOINT_URL (pyarrow 26).
    # allow_delayed_open: a small object goes up in one PUT, not a three-request multipart upload
    return FileSystem.from_uri(f"{scheme}://{netloc}/" + ("?allow_delayed_open=true" if scheme == "s3" else ""))


def filesystem(location: Location) -> tuple[FileSystem, str]:
    """The pyarrow filesystem holding `location` and the path inside it."""
    if not is_remote(location):
        return LocalFileSystem(), os.path.abspath(local_path_of(location))
    parts = urlsplit(str(location))
    env = tuple(sorted((key, value) for key, value in os.environ.items() if key.startswith(_ENV_PREFIXES)))
    fs, root = _remote_root(parts.scheme.lower(), parts.netloc, env)
    path = parts.path.strip("/")
    return fs, f"{root.rstrip('/')}/{path}" if path else root


def absolute(location: Location) -> str | Path:
    """`location` as another process or machine can use it: a URI as given, a local path (or file:// URI)
    made absolute (a Path)."""
    return location if is_remote(location) else local_path_of(location).resolve()


def exists(location: Location) -> bool:
    """True when a file or folder is at `location`."""
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != FileType.NotFound


def is_file(location: Location) -> bool:
    """True when a file (not a folder) is at `location`."""
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == FileType.File


def open_input(location: Location) -> pa.NativeFile:
    """A random-access file for reading (for pyarrow.parquet, for instance)."""
    fs, path = filesystem(location)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(2, "No such file", str(location)) from None


def read_bytes(location: Location) -> bytes:
    """The whole content of a file."""
    with open_input(location) as handle:
        return handle.read()


def read_text(location: Location) -> str:
    """The whole content of a UTF-8 text file."""
    return read_bytes(location).decode("utf-8")


class DamagedFileError(ValueError):
    """A file exists but its content is not what it should be (the message names the file)."""


def read_json(location: Location) -> Any:
    """The parsed content of a JSON file.

    Raises:
        DamagedFileError: the file is not valid JSON (e.g. cut short by a crash).
    """
    text = read_text(location)
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a UnicodeDecodeError subclass
        raise DamagedFileError(f"{location} is damaged: not valid JSON ({exc})") from None


def write_bytes(location: Location, data: bytes) -> Location:
    """Write a whole file at once; readers see the old content or the new one, never a part. Returns
    where it was written (a local path, as `crystalae.files.write_text` returns it, or the URI)."""
    if not is_remote(location):
        return files.atomic_write(local_path_of(location), lambda tmp: tmp.write_bytes(data))
    fs, path = filesystem(location)
    # one PUT (a multipart upload when large): the object store publishes it whole, or not at all, at close
    with fs.open_output_stream(path) as stream:
        stream.write(data)
    return location


def write_text(location: Location, text: str) -> Location:
    """Write a whole UTF-8 text file at once (local or object storage; `crystalae.files.write_text` is the
    local-only form); returns where."""
    return write_bytes(location, text.encode("utf-8"))


def write_json(location: Location, data: Any) -> Location:
    """Write JSON in the one form crystalae writes it (`crystalae.files.json_text`); returns where."""
    return write_text(location, files.json_text(data))


@contextmanager
def open_output(location: Location) -> Iterator[BinaryIO]:
    """A binary file to write; its content appears at `location` whole, and only when the block ends without error."""
    if is_remote(location):
        # pyarrow cannot abort an upload: closing its stream, even after an error, publishes what was written
        with tempfile.TemporaryDirectory(prefix="crystalae-upload-") as folder:
            spool = Path(folder) / "data"
            with open(spool, "wb") as handle:
                yield handle
            upload_file(spool, location)
        return
    with files.atomic_path(local_path_of(location)) as tmp, open(tmp, "wb") as handle:
        yield handle


def _listing(location: Location) -> tuple[FileSystem, list[tuple[str, FileInfo]]]:
    fs, root = filesystem(location)
    prefix = root.rstrip("/") + "/"
    infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    # object stores list "folder" markers too; only files count
    return fs, sorted(((info.path[len(prefix):], info) for info in infos if info.type == FileType.File), key=lambda x: x[0])


def list_files(location: Location) -> list[tuple[str, int]]:
    """Every file below a folder, recursively, as sorted (relative "/" path, size); [] when there is no folder."""
    return [(name, info.size) for name, info in _listing(location)[1]]


def remove_tree(location: Location) -> None:
    """Delete a file, or a folder and everything in it; nothing to do when it is missing."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == FileType.File:
        fs.delete_file(path)
        return
    if is_remote(location) and not urlsplit(str(location)).path.strip("/"):
        fs.delete_dir_contents(path, missing_dir_ok=True)  # a bucket's root: empty it, never delete the bucket
        return
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def cache_root() -> Path:
    """$CRYSTALAE_CACHE, else ~/.cache/crystalae."""
    return Path(os.environ.get("CRYSTALAE_CACHE") or Path.home() / ".cache" / "crystalae").expanduser()


def _check_parts(parts: list[str], location: Location) -> list[str]:
    if ".." in parts:  # a key or URI must never reach outside the folder it is mirrored into
        raise ValueError(f"{location}: '..' is not allowed in a storage location")
    return [part for part in parts if part not in ("", ".")]


def cache_for(location: Location) -> Path:
    """The local mirror folder of a remote location (a local location is its own). Mirrors are kept per
    endpoint: a bucket of the same name on another server (AWS_ENDPOINT_URL) is another store."""
    if not is_remote(location):
        return local_path_of(location)
    parts = urlsplit(str(location))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    store = parts.scheme.lower() + (f"@{hashlib.sha256(endpoint.encode()).hexdigest()[:12]}" if endpoint else "")
    return cache_root().joinpath("remote", store, *_check_parts([parts.netloc, *parts.path.split("/")], location))


def check_bucket(location: Location, role: str = "") -> None:
    """Raise FileNotFoundError naming the bucket when a remote location's bucket does not exist (a
    listing of it would read as empty, and a write fails deep in the store's client); its message is
    the one line "ROLE LOCATION: the bucket s3://B does not exist" (`role`, e.g. "registry", "--out")."""
    if not is_remote(location):
        return
    parts = urlsplit(str(location))
    fs, _ = filesystem(f"{parts.scheme}://{parts.netloc}")
    if fs.get_file_info(parts.netloc).type == FileType.NotFound:
        bucket = f"{parts.scheme}://{parts.netloc}"
        raise FileNotFoundError(2, f"{role} {location}: the bucket {bucket} does not exist".strip(), bucket)


def _fetch(fs: FileSystem, info: FileInfo, target: Path) -> None:
    stat = target.stat() if target.is_file() else None
    if stat and info.mtime_ns is not None and (stat.st_size, stat.st_mtime_ns) == (info.size, info.mtime_ns):
        # the copy carries the object's size and mtime: unchanged since the last download (S3 mtimes have 1 s
        # resolution, so a same-size rewrite within the second of the last download is missed)
        return

    def write(tmp: Path) -> None:
        with fs.open_input_file(info.path) as source:
            source.download(str(tmp))
        if info.mtime_ns is not None:
            os.utime(tmp, ns=(info.mtime_ns, info.mtime_ns))

    files.atomic_write(target, write)


def download(location: Location, local: Path | None = None, include: Callable[[str], bool] | None = None) -> Path:
    """Mirror a remote folder (the files `include` accepts) into `local`, skipping unchanged files; local: returned as is."""
    if not is_remote(location):
        return local_path_of(location)
    local = Path(local) if local is not None else cache_for(location)
    fs, listing = _listing(location)
    for name, info in listing:
        if ".." in name.split("/"):  # a key that would land outside the mirror: skipped, and named
            log.warning("skipped the object %s/%s: '..' in a key", str(location).rstrip("/"), name)
            continue
        if include is None or include(name):
            _fetch(fs, info, local.joinpath(*_check_parts(name.split("/"), location)))
    return local


def download_file(location: Location, local_path: Path) -> Path:
    """Copy one file to `local_path` (skipped when unchanged)."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type != FileType.File:
        raise FileNotFoundError(2, "No such file", str(location))
    _fetch(fs, info, Path(local_path))
    return Path(local_path)


def upload_file(local_path: Path, location: Location) -> None:
    """Copy one local file to `location`; it appears there whole or not at all."""
    if not is_remote(location):
        files.atomic_write(local_path_of(location), lambda tmp: shutil.copyfile(local_path, tmp))
        return
    fs, path = filesystem(location)
    # the copy runs in C++ without the GIL, so Ctrl-C cannot stop it half-way and publish a partial object
    copy_files(str(local_path), path, source_filesystem=LocalFileSystem(), destination_filesystem=fs)
    # pyarrow's delayed-open output streams can swallow a failed PutObject (a missing bucket, no
    # permission): check the object is there, whole, before anyone is told it was stored
    info = fs.get_file_info(path)
    size = Path(local_path).stat().st_size
    if info.type != FileType.File or info.size != size:
        found = "nothing" if info.type == FileType.NotFound else f"{info.size} bytes"
        raise OSError(f"upload to {location} failed: the store holds {found} there, expected {size} bytes "
                      "(does the bucket exist, and may these credentials write to it?)")


def _publishable(name: str) -> bool:
    return not name.endswith((".tmp", ".lock")) and not any(part.startswith(".") for part in name.split("/"))


def upload(
    local: Path, location: Location, include: Callable[[str], bool] | None = None, last: tuple[str, ...] = ()
) -> list[str]:
    """Copy every file under `local` to a folder, the `last` ones (a manifest) after all others; returns them in order."""
    local = Path(local)
    if not local.is_dir():
        raise FileNotFoundError(2, "No such folder", str(local))
    names = sorted(path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file())
    names = [name for name in names if _publishable(name) and (include is None or include(name))]
    ordered = [name for name in names if name not in last] + [name for name in last if name in names]
    for name in ordered:
        upload_file(local / name, join(location, name))
    return ordered
