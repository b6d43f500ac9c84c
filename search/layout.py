"""The layout of a sweep folder (`<storage>/<name>/`, a local folder or an object-storage URI), and where
its files are on this machine (mirrors of object storage). No Ray needed.

    sweep.json          the validated config
    optuna.db           the Optuna study (open with `optuna-dashboard sqlite:///optuna.db`)
    datasets/<key>/     voxelized shards, one per distinct voxel config (shared by trials with one sigma)
    trials/<trial_id>/  the trial's Ray Train run: params.json, checkpoint_*/ (weights + metric history)
    tune/, tune-2/, …   Ray Tune experiment state, one per run of trials (`--resume` restores the
                        newest; `--resume --trials N` on an ended sweep starts the next one)
    summary.json        trial table written when the sweep ends (status, params, best metrics, budget)
    ray.log             Ray's own log output while the sweep ran (the console shows one line per event)
"""
from __future__ import annotations

from pathlib import Path

from crystalae.dataset import MANIFEST, local_dataset
from crystalae.uri_fs import absolute, cache_for, download, is_file, is_remote, list_files, read_json
from crystalae.uri_fs import join as storage_join

__all__ = [
    "CHECKPOINT_GLOB", "DATASETS_DIR", "LOG_FILE", "PARAMS_FILE", "STUDY_FILE", "SUMMARY_FILE", "SWEEP_FILE",
    "TRIALS_DIR", "dataset_folders", "find_sweeps", "is_sweep", "local_checkpoint", "local_root",
    "mirror_sweeps", "next_tune_dir", "study_path", "sweep_dataset", "sweep_dir", "trial_folder", "tune_dirs",
]

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"
STUDY_FILE = "optuna.db"
TRIALS_DIR = "trials"
DATASETS_DIR = "datasets"
TUNE_DIR = "tune"
PARAMS_FILE = "params.json"
LOG_FILE = "ray.log"
CHECKPOINT_GLOB = "checkpoint_*"  # Ray Train's checkpoint folder names


def sweep_dir(storage: str | Path, name: str) -> str | Path:
    """The sweep folder: `<storage>/<name>`, a local path or an object-storage URI (s3://...)."""
    return storage_join(absolute(storage), name)


def local_root(root: str | Path) -> Path:
    """Where a sweep's files are read: the folder itself, or for object storage a local mirror of its
    small files (configs, metrics, optuna.db), refreshed from the store on each call."""
    if not is_remote(root):
        return Path(root)
    return download(root, cache_for(root), include=_mirrored)


def _is_tune_dir(name: str) -> bool:
    """A Tune experiment folder of a sweep: tune, tune-2, tune-3, ..."""
    return name == TUNE_DIR or (name.startswith(TUNE_DIR + "-") and name.removeprefix(TUNE_DIR + "-").isdigit())


def _mirrored(relative: str) -> bool:
    """The files a reader of a sweep needs: not Tune's state, not the shards or the weights."""
    top, _, rest = relative.partition("/")
    if _is_tune_dir(top):
        return False
    if top == DATASETS_DIR:
        return rest.count("/") == 1 and rest.endswith(("/manifest.json", "/prepare.json"))
    return relative.endswith(".json") or relative in (STUDY_FILE, LOG_FILE)


def mirror_sweeps(storage: str | Path) -> Path:
    """A local copy of every sweep under `storage` (for the dashboard): all but Tune's own state."""
    def wanted(relative: str) -> bool:
        return not any(_is_tune_dir(part) for part in relative.split("/")[:-1])

    return download(storage, cache_for(storage), include=wanted) if is_remote(storage) else Path(storage)


def local_checkpoint(root: str | Path, relative: str) -> Path:
    """A checkpoint folder of the sweep on this machine (downloaded once from object storage)."""
    if not is_remote(root):
        return Path(root) / relative
    return download(storage_join(root, relative))


def is_sweep(folder: str | Path) -> bool:
    return is_file(storage_join(folder, SWEEP_FILE))


def find_sweeps(storage: str | Path) -> list[str | Path]:
    """Sweep folders at most two levels below `storage` (a storage may group sweeps in folders), sorted."""
    if is_remote(storage):
        found = {relative.rpartition("/")[0] for relative, _ in list_files(storage)
                 if relative.rpartition("/")[2] == SWEEP_FILE and 1 <= relative.count("/") <= 3}
        return [storage_join(storage, *folder.split("/")) for folder in sorted(found)]
    root = Path(storage)
    if not root.is_dir():
        return []
    return sorted({p.parent for pattern in (SWEEP_FILE, f"*/{SWEEP_FILE}", f"*/*/{SWEEP_FILE}")
                   for p in root.glob(pattern)})


def trial_folder(root: str | Path, trial_id: str) -> str | Path:
    return storage_join(root, TRIALS_DIR, trial_id)


def study_path(root: str | Path) -> Path:
    """The Optuna study: a SQLite file, so for a sweep on object storage the local copy (the driver
    uploads it as trials end; readers get it with the mirror)."""
    return cache_for(root) / STUDY_FILE if is_remote(root) else Path(root) / STUDY_FILE


def dataset_folders(root: str | Path) -> list[Path]:
    """Finished prepared datasets of a sweep (those with a manifest), as local folders."""
    if is_remote(root):
        return [local_dataset(storage_join(root, DATASETS_DIR, p.parent.name))
                for p in sorted((local_root(root) / DATASETS_DIR).glob(f"*/{MANIFEST}"))]
    return sorted(p.parent for p in (Path(root) / DATASETS_DIR).glob(f"*/{MANIFEST}"))


def tune_dirs(root: str | Path) -> list[str | Path]:
    """The sweep's Tune experiment folders, oldest first (tune, tune-2, tune-3, ...)."""
    if is_remote(root):
        names = {relative.partition("/")[0] for relative, _ in list_files(root) if "/" in relative}
    else:
        names = {p.name for p in Path(root).glob(f"{TUNE_DIR}*") if p.is_dir()}
    found = [n for n in names if _is_tune_dir(n)]
    ordered = sorted(found, key=lambda n: int(n.removeprefix(TUNE_DIR + "-")) if n != TUNE_DIR else 1)
    return [storage_join(root, n) for n in ordered]


def next_tune_dir(root: str | Path) -> str | Path:
    count = len(tune_dirs(root))
    return storage_join(root, TUNE_DIR if count == 0 else f"{TUNE_DIR}-{count + 1}")


def sweep_dataset(root: str | Path, dataset_hash: str) -> str | Path | None:
    """The prepared dataset under the sweep's `datasets/` whose manifest has `dataset_hash` (None: gone)."""
    base = storage_join(root, DATASETS_DIR)
    if is_remote(base):
        names = sorted({relative.split("/")[0] for relative, _ in list_files(base) if relative.endswith(MANIFEST)})
    else:
        names = sorted(p.parent.name for p in Path(base).glob(f"*/{MANIFEST}"))
    for folder in (storage_join(base, n) for n in names):
        try:
            if read_json(storage_join(folder, MANIFEST)).get("dataset_hash") == dataset_hash:
                return folder
        except (OSError, ValueError):
            continue
    return None
