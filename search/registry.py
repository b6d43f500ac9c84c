"""Model registry: immutable, versioned copies of chosen checkpoints, plus movable aliases.

    <root>/<name>/v<N>/checkpoint.pt, config.json, manifest.json   (never modified once written)
    <root>/aliases.json                                           {"champion": "demo@3", ...}

A version folder is assembled in a temp folder and renamed into place; version numbers and aliases
change under a file lock, so concurrent promotes never collide or corrupt the registry.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from crystalae.checkpoint import FILENAME, read_checkpoint
from crystalae.io import sha256_file, write_json
from search.config import check_name

DEFAULT_ROOT = Path("runs/registry")


class RegistryError(ValueError):
    """Unknown model, version or alias, or an invalid name."""


class Registry:
    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)

    def _lock(self):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

    def promote(self, checkpoint: str | Path, name: str, alias: str | None = None,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
        """Copy `checkpoint` into a new version of `name` (and point `alias` at it)."""
        check_name(name, "model name")
        if alias is not None:
            check_name(alias, "alias")
        payload = read_checkpoint(checkpoint)  # validates before anything is copied
        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        with self._lock():
            version = 1 + max(self.versions(name), default=0)
            target = self.root / name / f"v{version}"
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-v{version}-", dir=target.parent))
            try:
                shutil.copy2(folder / FILENAME, staging / FILENAME)
                if (folder / "config.json").exists():
                    shutil.copy2(folder / "config.json", staging / "config.json")
                manifest = {
                    "name": name, "version": version, "ref": f"{name}@{version}",
                    "sha256": sha256_file(staging / FILENAME), "metrics": payload["metrics"],
                    "epoch": payload["epoch"], "model_config": payload["model_config"],
                    "voxel_config": payload["voxel_config"], "train_config": payload["train_config"],
                    "dataset_hash": payload["dataset_hash"], "source": {"checkpoint": str(Path(checkpoint).resolve()),
                                                                        **(source or {})},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                write_json(staging / "manifest.json", manifest)
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if alias is not None:
                self._set_alias_locked(alias, manifest["ref"])
        return manifest

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in folder.iterdir()
                      if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit())

    def aliases(self) -> dict[str, str]:
        path = self.root / "aliases.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def set_alias(self, alias: str, ref: str) -> None:
        check_name(alias, "alias")
        with self._lock():
            self.resolve(ref)
            self._set_alias_locked(alias, ref)

    def _set_alias_locked(self, alias: str, ref: str) -> None:
        aliases = self.aliases()
        aliases[alias] = ref
        write_json(self.root / "aliases.json", aliases)

    def resolve(self, ref: str) -> Path:
        """`alias`, `name@version` or `name` (latest version) -> the version folder."""
        aliases = self.aliases()
        if ref in aliases:
            ref = aliases[ref]
        name, _, version = ref.partition("@")
        check_name(name, "model name")
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"no model or alias {ref!r} in registry {self.root}")
        if not version:
            number = versions[-1]
        elif version.lstrip("v").isdigit() and int(version.lstrip("v")) in versions:
            number = int(version.lstrip("v"))
        else:
            raise RegistryError(f"model {name} has no version {version!r} (versions: {versions})")
        return self.root / name / f"v{number}"

    def entries(self) -> list[dict[str, Any]]:
        """Every version's manifest, with the aliases pointing at it."""
        by_ref: dict[str, list[str]] = {}
        for alias, ref in self.aliases().items():
            by_ref.setdefault(ref, []).append(alias)
        result = []
        if not self.root.exists():
            return result
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for version in self.versions(folder.name):
                manifest = json.loads((folder / f"v{version}" / "manifest.json").read_text())
                result.append({**manifest, "aliases": sorted(by_ref.get(manifest["ref"], []))})
        return result
