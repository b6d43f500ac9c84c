"""Atomic file writes and small helpers shared by every writer: a crash never leaves half a file.

(Named `files`, not `io`, so it never shadows or is confused with the standard library module.)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path", "atomic_write", "json_text", "load_yaml", "read_yaml_mapping", "sha256_file", "write_json",
    "write_text",
]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file beside `path` to write; renamed over `path` when the block ends without error, removed
    when it raises. The one atomic writer: `atomic_write`, `write_text`, `write_json` and
    `crystalae.uri_fs.open_output` all write through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it over `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def json_text(data: Any) -> str:
    """The one JSON form of every file crystalae writes: indented, keys sorted, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json_text(data))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_yaml(text: str) -> Any:
    """YAML as people write configs: `1e-3` is a number (PyYAML's YAML 1.1 rules read it as a string,
    wanting `1.0e-3`). Safe loading only."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # YAML 1.2's float forms without a dot, e.g. 1e-3, 5E4: checked after PyYAML's own int and float rules
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    data = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    _check_expanded_size(data)
    return data


MAX_YAML_VALUES = 100_000


def _check_expanded_size(data: Any) -> None:
    """Refuse YAML whose aliases expand it past MAX_YAML_VALUES values (an "alias bomb": a few hundred
    bytes that any code walking or printing the result would expand to billions)."""
    import yaml

    seen, stack = 0, [data]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise yaml.YAMLError(f"the document expands to over {MAX_YAML_VALUES:,} values "
                                 "(nested aliases?); a config is far smaller")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def read_yaml_mapping(path: Path, option: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; any problem is one error naming the option and the file."""
    import yaml

    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{option} {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{option} {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{option} {path}: expected a mapping of key: value, found a {type(data).__name__}")
    return data
