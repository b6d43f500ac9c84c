"""Model registry: immutable, versioned copies of chosen checkpoints, plus movable aliases.

    <root>/<name>/v<N>/checkpoint.pt, config.json, manifest.json   (never modified once written)
    <root>/aliases.json                                           {"champion": "demo@3", ...}

A version folder is assembled in a temp folder and renamed into place; version numbers and aliases
change under a file lock, so concurrent promotes never collide or corrupt the registry. A promote is
all or nothing: if its alias cannot be written, the new version is removed again.

On object storage (`s3://...`) the registry works on a local mirror of its manifests and aliases. A
promote publishes the version's files with `manifest.json` last (a version exists iff its manifest
does), then `aliases.json`. The lock only covers this machine: object stores have no lock, so promote
into one remote registry from one place at a time (single writer). A promote checks that its version
number is still free just before publishing, which catches most, not all, races.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from crystalae import uri_fs
from crystalae.checkpoint import FILENAME, read_checkpoint
from crystalae.config import ConfigError, check_name
from crystalae.files import sha256_file, write_json
from crystalae.locations import REGISTRY
from crystalae.pretrained import pretrained_models
from crystalae.provenance import provenance

__all__ = ["CLAIM", "Registry", "RegistryError", "check_model_name", "lineage_text"]

log = logging.getLogger(__name__)

ALIASES = "aliases.json"
CLAIM = ".claim"  # in a version folder on object storage: which promote took the number
CLAIM_WAIT_S = 1.0
_RESERVED_SUFFIXES = (".json", ".lock", ".tmp")  # the registry's own files live beside the model folders


def _check_weights(folder: Path, ref: str) -> None:
    """A version's weights must be the bytes its manifest recorded (a version is never rewritten)."""
    try:
        recorded = json.loads((folder / "manifest.json").read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable manifest is reported where versions are listed
    if not (folder / FILENAME).is_file() or sha256_file(folder / FILENAME) != recorded:
        raise RegistryError(f"{ref}: {folder / FILENAME} is not the checkpoint promoted as this version "
                            "(its sha256 differs from the manifest's): the version was modified after promotion")


class RegistryError(ValueError):
    """Unknown model, version or alias, an invalid name, or a damaged registry file."""


def check_model_name(name: Any, what: str = "model name") -> str:
    """A registry name: a safe folder name that cannot collide with the registry's own files."""
    try:
        check_name(name, what)
    except ConfigError as exc:
        raise RegistryError(str(exc)) from None
    if name.lower().endswith(_RESERVED_SUFFIXES):
        raise RegistryError(f"invalid {what} {name!r}: names ending in {', '.join(_RESERVED_SUFFIXES)} "
                            "are reserved for the registry's own files")
    return name


class Registry:
    def __init__(self, root: str | Path = REGISTRY):
        self.location = root  # where the registry lives: a folder or an object-storage URI
        self.remote = uri_fs.is_remote(root)
        self.root = uri_fs.cache_for(root) if self.remote else Path(root)

    def _refresh(self) -> None:
        """Mirror the remote registry's manifests and aliases (the weights come with `resolve`); locally,
        finish what a killed promote left."""
        if not self.remote:
            self._recover_if_idle()
            return
        try:
            uri_fs.check_bucket(self.location, "registry")
        except FileNotFoundError as missing:
            raise RegistryError(missing.strerror) from None
        uri_fs.download(self.location, self.root,
                        include=lambda name: name == ALIASES or name.endswith("/manifest.json"))
        self._prune_mirror()

    def _prune_mirror(self) -> None:
        """Drop what the local mirror holds and the store no longer does (a version or aliases deleted
        there): the store is the truth."""
        on_store = {name for name, _ in uri_fs.list_files(self.location)}
        for manifest in self.root.glob("*/v*/manifest.json"):
            if manifest.relative_to(self.root).as_posix() not in on_store:
                shutil.rmtree(manifest.parent, ignore_errors=True)
        if ALIASES not in on_store:
            (self.root / ALIASES).unlink(missing_ok=True)

    def _publish_aliases(self) -> None:
        if self.remote:
            uri_fs.upload_file(self.root / ALIASES, uri_fs.join(self.location, ALIASES))

    def _publish_version(self, name: str, version: int) -> None:
        """Upload a new version, manifest last; refuse if another writer published that number."""
        if not self.remote:
            return
        remote = uri_fs.join(self.location, name, f"v{version}")
        claim, token = uri_fs.join(remote, CLAIM), uuid.uuid4().hex
        taken = RegistryError(f"{self.location}: {name}@{version} was taken by another writer during this promote; "
                              "promote again (promote into one registry from one place at a time)")
        if uri_fs.exists(uri_fs.join(remote, "manifest.json")) or uri_fs.exists(claim):
            raise taken
        # Object stores have no "create if absent" here: claim the number, wait for a concurrent writer's
        # claim to land, and go on only if ours is still the one there (the later claim wins, the other fails).
        uri_fs.write_text(claim, token)
        time.sleep(CLAIM_WAIT_S)
        if uri_fs.read_text(claim) != token:
            raise taken
        try:
            uri_fs.upload(self.root / name / f"v{version}", remote, last=("manifest.json",))
        except BaseException:  # all or nothing on the store too: no half-published version
            try:
                if uri_fs.read_text(claim) == token:  # never remove what another writer now owns
                    uri_fs.remove_tree(remote)
            except OSError:
                pass  # e.g. the bucket does not exist: nothing was stored
            raise
        if uri_fs.read_text(claim) != token:  # a claim that landed after our check: the version is theirs
            raise taken

    def _lock(self):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

    def promote(self, checkpoint: str | Path, name: str, alias: str | None = None,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
        """Copy `checkpoint` into a new version of `name` (and point `alias` at it), all or nothing.

        Promote a sweep trial with `crystalae.search.promote.promote_trial`, which names the checkpoint
        and records where it came from in `source`.

        Args:
            checkpoint: a checkpoint folder (or its `checkpoint.pt`) on this machine.
            name: the model name; the version is the next free number of `name`.
            alias: an alias to point at the new version (e.g. champion).
            source: where the checkpoint came from, stored in the manifest's `source` (its "checkpoint" key
                defaults to the folder's absolute path).

        Returns:
            The new version's manifest: name, version, ref (NAME@VERSION), sha256 of the weights, metrics,
            epoch, configs, dataset hash, lineage, source, created, provenance.

        Raises:
            RegistryError: an invalid name or alias, a damaged aliases.json (with `alias`), or on object
                storage a version number another writer took meanwhile, or a missing bucket.
            CheckpointError: `checkpoint` is missing or not a readable crystalae checkpoint.
            OSError: the copy or, on object storage, the upload failed (nothing is left published).
        """
        self.check_names(name, alias)
        payload = read_checkpoint(checkpoint)  # validates before anything is copied
        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        with self._lock():
            self._refresh()
            self._finish_interrupted()
            self._check_unshadowed(name, alias)
            aliases = self.aliases() if alias is not None else {}  # a damaged alias file stops us here
            version = 1 + max(self.versions(name), default=0)
            target = self.root / name / f"v{version}"
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-v{version}-", dir=target.parent))
            pending = _pending_alias_file(target)
            try:
                shutil.copy2(folder / FILENAME, staging / FILENAME)
                if (folder / "config.json").exists():
                    shutil.copy2(folder / "config.json", staging / "config.json")
                manifest = _manifest(name, version, payload, sha256_file(staging / FILENAME),
                                     {"checkpoint": str(Path(checkpoint).resolve()), **(source or {})})
                write_json(staging / "manifest.json", manifest)
                if alias is not None:  # a promote killed after the rename still moves its alias (next open)
                    pending.write_text(alias, encoding="utf-8")
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                pending.unlink(missing_ok=True)
                raise
            try:
                self._publish_version(name, version)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            if alias is not None:
                try:
                    write_json(self.root / ALIASES, {**aliases, alias: manifest["ref"]})
                    self._publish_aliases()
                    pending.unlink(missing_ok=True)
                except BaseException:  # all or nothing: the version goes again
                    pending.unlink(missing_ok=True)
                    shutil.rmtree(target, ignore_errors=True)
                    if self.remote:
                        uri_fs.remove_tree(uri_fs.join(self.location, name, f"v{version}"))
                    raise
        return manifest

    def check_names(self, name: str, alias: str | None = None) -> None:
        """What `promote` checks of a new version's `name` and `alias` before anything is read or copied
        (`promote_trial` asks first too, before it spends minutes fitting a prior): safe folder names, and
        neither hidden by another name (`_check_unshadowed`).

        Raises:
            RegistryError: naming the problem.
        """
        check_model_name(name)
        if alias is not None:
            check_model_name(alias, "alias")
        self._check_unshadowed(name, alias)

    def _check_unshadowed(self, name: str | None, alias: str | None) -> None:
        """Refuse a model name or alias that another name would hide: `--model X` takes a shipped model
        first, and `resolve` an alias before a model's latest version, so the new name would never be reached
        (or would silently hide the other).

        Raises:
            RegistryError: naming the clash.
        """
        shipped = {m["name"] for m in pretrained_models()}
        for value, what in ((name, "model name"), (alias, "alias")):
            if value in shipped:
                raise RegistryError(f"{what} {value!r} is a shipped model's name (--model {value} always means "
                                    "the shipped one): choose another")
        if alias is not None and (alias == name or self.versions(alias)):
            raise RegistryError(f"alias {alias!r} is the name of a model in registry {self.location} (an alias "
                                "would hide its latest version): choose another alias")
        if name is not None:
            try:
                aliases = self.aliases()
            except RegistryError:  # a damaged alias file is reported where aliases are needed
                aliases = {}
            if name in aliases:
                raise RegistryError(f"model name {name!r} is an alias in registry {self.location} (pointing at "
                                    f"{aliases[name]}), which would hide the new model: choose another name")

    def _finish_interrupted(self) -> None:
        """Under the lock: clean up after promotes that were killed. Their staging copies go; a version
        that was published but whose alias was not yet moved gets its alias now."""
        if not self.root.exists():
            return
        for staging in self.root.glob("*/.*-v*-*"):
            if staging.is_dir():  # no promote is running (we hold the lock): a leftover
                shutil.rmtree(staging, ignore_errors=True)
        for pending in sorted(self.root.glob("*/.v*.alias")):
            target = pending.parent / pending.name[1:-len(".alias")]
            if target.is_dir():
                alias = pending.read_text(encoding="utf-8").strip()
                write_json(self.root / ALIASES, {**self.aliases(), alias: f"{target.parent.name}@{target.name[1:]}"})
                self._publish_aliases()
            pending.unlink(missing_ok=True)

    def _recover_if_idle(self) -> None:
        """Finish killed promotes now, unless a promote holds the lock (its files are not leftovers)."""
        if self.remote or not any(self.root.glob("*/.v*.alias")) and not any(self.root.glob("*/.*-v*-*")):
            return
        from filelock import Timeout

        try:
            with self._lock().acquire(timeout=0):
                self._finish_interrupted()
        except Timeout:
            pass

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in folder.iterdir()
                      if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit())

    def aliases(self) -> dict[str, str]:
        """alias -> NAME@VERSION; a damaged aliases.json raises RegistryError naming the file."""
        path = self.root / ALIASES
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path} is damaged ({type(exc).__name__}); fix or delete it "
                                "(it only holds aliases: the model versions are intact)") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise RegistryError(f"{path} is damaged: expected a mapping of alias to NAME@VERSION; fix or delete it")
        return data

    def set_alias(self, alias: str, ref: str) -> str:
        """Point `alias` at the version `ref` names (NAME is pinned to its latest version now)."""
        check_model_name(alias, "alias")
        with self._lock():
            self._finish_interrupted()
            folder = self.resolve(ref)
            self._check_unshadowed(None, alias)
            pinned = f"{folder.parent.name}@{folder.name[1:]}"
            write_json(self.root / ALIASES, {**self.aliases(), alias: pinned})
            self._publish_aliases()
        return pinned

    def resolve(self, ref: str) -> Path:
        """The version folder that `ref` names: an alias, NAME@VERSION (or NAME@vVERSION), or NAME (its
        latest version).

        `name@version` and `name` still resolve when aliases.json is damaged; only aliases need it.
        On object storage the version's files are downloaded (once) and the local copy returned.

        Returns:
            The version's folder on this machine (`checkpoint.pt`, `config.json`, `manifest.json`).

        Raises:
            RegistryError: no such model, version or alias; an invalid name; a damaged aliases.json when
                `ref` needs it; weights whose sha256 differs from the manifest's (modified after promotion);
                on object storage, a missing bucket.
        """
        self._refresh()
        try:
            aliases = self.aliases()
        except RegistryError as damaged:
            if "@" in ref or self.versions(ref.partition("@")[0]):
                aliases = {}
            else:
                raise RegistryError(f"cannot resolve {ref!r}: {damaged}") from None
        if ref in aliases:
            ref = aliases[ref]
        name, _, version = ref.partition("@")
        check_model_name(name)
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"no model or alias {ref!r} in registry {self.location}")
        if not version:
            number = versions[-1]
        elif re.fullmatch(r"v?[0-9]{1,9}", version) and int(version.lstrip("v")) in versions:  # ASCII digits only
            number = int(version.lstrip("v"))
        else:
            raise RegistryError(f"model {name} has no version {version!r} (versions: {versions})")
        folder = self.root / name / f"v{number}"
        if self.remote:
            uri_fs.download(uri_fs.join(self.location, name, f"v{number}"), folder)
        _check_weights(folder, f"{name}@{number}")
        return folder

    def entries(self) -> list[dict[str, Any]]:
        """Every complete version's manifest, with the aliases pointing at it.

        A damaged version (no readable manifest) or alias file is skipped with a warning on stderr,
        so one bad file never hides the rest of the registry.
        """
        result: list[dict[str, Any]] = []
        self._refresh()
        if not self.root.exists():
            return result
        try:
            aliases = self.aliases()
        except RegistryError as exc:
            log.warning("%s; listing models without aliases", exc)
            aliases = {}
        by_ref: dict[str, list[str]] = {}
        for alias, ref in aliases.items():
            by_ref.setdefault(ref, []).append(alias)
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for version in self.versions(folder.name):
                path = folder / f"v{version}" / "manifest.json"
                try:
                    manifest = json.loads(path.read_text(encoding="utf-8"))
                    ref = manifest["ref"]
                except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                    log.warning("skipped %s: no readable manifest.json (%s)", path.parent, type(exc).__name__)
                    continue
                result.append({**manifest, "aliases": sorted(by_ref.get(ref, []))})
        return result


def _manifest(name: str, version: int, payload: dict[str, Any], sha256: str, source: dict[str, Any]) -> dict[str, Any]:
    """A version's manifest.json: what it is, where it came from, and what made it."""
    return {
        "name": name, "version": version, "ref": f"{name}@{version}", "sha256": sha256,
        "metrics": payload["metrics"], "epoch": payload["epoch"], "model_config": payload["model_config"],
        "voxel_config": payload["voxel_config"], "train_config": payload["train_config"],
        "dataset_hash": payload["dataset_hash"], "lineage": payload.get("lineage"), "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # the checkpoint's own versions (what trained it) and this promote's
        "provenance": {"trained_with": payload.get("versions"), **provenance()},
    }


def _pending_alias_file(version_folder: Path) -> Path:
    """Beside the version folder (not in it: it is never published): the alias its promote will move."""
    return version_folder.parent / f".{version_folder.name}.alias"


def lineage_text(entry: dict[str, Any]) -> str:
    """Where a registry version came from, in a few words: the sweep and trial it was found by, and
    whether it is that trial's own checkpoint or a retrain of its configuration (`train --from-trial`)."""
    lineage, source = entry.get("lineage") or {}, entry.get("source") or {}
    if lineage.get("trial"):
        return (f"retrain of sweep {lineage.get('sweep')} trial {lineage['trial']} "
                f"({lineage.get('epochs')} epochs, dataset {str(entry.get('dataset_hash'))[:12]})")
    if source.get("trial"):
        return f"sweep {source.get('sweep')} trial {source['trial']} epoch {source.get('epoch', entry.get('epoch'))}"
    return f"imported from {source.get('given') or source.get('checkpoint') or 'a checkpoint'}"
