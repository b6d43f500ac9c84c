"""Reading sweep results from disk (no Ray needed): the one owner of the sweep folder layout and of the
trial and summary types. The CLI, the dashboard and the benchmarks read sweeps only through here.

Layout of a sweep folder (`<storage>/<name>/`):
    sweep.json          the validated config
    optuna.db           the Optuna study (open with `optuna-dashboard sqlite:///optuna.db`)
    datasets/<key>/     voxelized shards, one per distinct voxel config (shared by trials with one sigma)
    trials/<trial_id>/  the trial's Ray Train run: params.json, checkpoint_*/ (weights + metric history)
    tune/               Ray Tune experiment state (what `--resume` restores)
    summary.json        trial table written when the sweep ends (status, params, best metrics)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"
STUDY_FILE = "optuna.db"
TRIALS_DIR = "trials"
DATASETS_DIR = "datasets"
TUNE_DIR = "tune"
PARAMS_FILE = "params.json"
CHECKPOINT_GLOB = "checkpoint_*"  # Ray Train's checkpoint folder names


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "min" or "max"

    def best(self, items: list, value) -> Any:
        """The item whose `value(item)` is best under this objective (None for no items)."""
        return (min if self.mode == "min" else max)(items, key=value) if items else None


@dataclass(frozen=True)
class CheckpointRecord:
    path: str  # relative to the sweep folder
    epoch: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Trial:
    trial_id: str
    params: dict[str, Any]
    status: str  # running, finished, early-stopped, error, unknown
    epochs: int
    history: list[dict[str, Any]]  # per-epoch metrics
    checkpoints: list[CheckpointRecord]  # kept checkpoints, by epoch
    best_value: float | None  # the objective at the best kept checkpoint
    best_checkpoint: str | None  # its path, relative to the sweep folder

    @property
    def best_epoch(self) -> int | None:
        return next((c.epoch for c in self.checkpoints if c.path == self.best_checkpoint), None)


@dataclass(frozen=True)
class SweepSummary:
    name: str
    objective: Objective
    trials: list[Trial]

    def best_trial(self) -> Trial | None:
        """The sweep's own rule: the trial whose best kept checkpoint scores best on the objective."""
        return self.objective.best([t for t in self.trials if t.best_value is not None], lambda t: t.best_value)

    def best_checkpoint(self, metric: str | None = None, mode: str | None = None) -> tuple[Trial, CheckpointRecord]:
        """(trial, checkpoint) scoring best on `metric` (default: the objective) over every kept checkpoint."""
        objective = Objective(metric or self.objective.metric, mode or self.objective.mode)
        pairs = [(t, c) for t in self.trials for c in t.checkpoints if _number(c.metrics.get(objective.metric))]
        if not pairs:
            raise ValueError(f"no checkpoint of sweep {self.name} has metric {objective.metric!r}")
        return objective.best(pairs, lambda p: p[1].metrics[objective.metric])

    def only(self, trial_id: str) -> SweepSummary:
        return replace(self, trials=[t for t in self.trials if t.trial_id == trial_id])

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to summary.json."""
        return asdict(self)


def sweep_dir(storage: str | Path, name: str) -> Path:
    return Path(storage).resolve() / name


def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / SWEEP_FILE).is_file()


def find_sweeps(storage: str | Path) -> list[Path]:
    """Sweep folders at most two levels below `storage` (a storage may group sweeps in folders), sorted."""
    root = Path(storage)
    if not root.is_dir():
        return []
    return sorted({p.parent for pattern in (SWEEP_FILE, f"*/{SWEEP_FILE}", f"*/*/{SWEEP_FILE}")
                   for p in root.glob(pattern)})


def trial_folder(root: str | Path, trial_id: str) -> Path:
    return Path(root) / TRIALS_DIR / trial_id


def study_path(root: str | Path) -> Path:
    return Path(root) / STUDY_FILE


def dataset_folders(root: str | Path) -> list[Path]:
    """Finished prepared datasets of a sweep (those with a manifest)."""
    from crystalae.shards import MANIFEST

    return sorted(p.parent for p in (Path(root) / DATASETS_DIR).glob(f"*/{MANIFEST}"))


def sweep_config(root: str | Path) -> dict[str, Any]:
    path = Path(root) / SWEEP_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def collect_trials(root: str | Path, statuses: dict[str, str] | None = None) -> SweepSummary:
    """Read every trial of a sweep from disk (works while it runs, and with Ray down).

    A trial's status comes from summary.json once the sweep has ended; before that it is "running".
    """
    root = Path(root)
    sweep = sweep_config(root)
    if statuses is None and (root / SUMMARY_FILE).exists():
        statuses = {t["trial_id"]: t["status"] for t in json.loads((root / SUMMARY_FILE).read_text())["trials"]}
    objective = Objective(sweep.get("objective_metric", "val_score"), sweep.get("objective_mode", "max"))
    trials = []
    folders = sorted(p for p in (root / TRIALS_DIR).glob("*") if p.is_dir()) if (root / TRIALS_DIR).exists() else []
    for folder in folders:
        found = []
        for config_file in folder.glob(f"{CHECKPOINT_GLOB}/config.json"):
            config = json.loads(config_file.read_text())
            found.append((CheckpointRecord(str(config_file.parent.relative_to(root)), config["epoch"], config["metrics"]),
                          config.get("history", [])))
        found.sort(key=lambda f: f[0].epoch)
        checkpoints = [record for record, _ in found]
        history = found[-1][1] if found else []  # the newest checkpoint carries the whole curve
        best = objective.best([c for c in checkpoints if _number(c.metrics.get(objective.metric))],
                              lambda c: c.metrics[objective.metric])
        params_file = folder / PARAMS_FILE
        trials.append(Trial(
            trial_id=folder.name, params=json.loads(params_file.read_text()) if params_file.exists() else {},
            status=_status(statuses, folder.name, len(history), sweep.get("epochs")), epochs=len(history),
            history=history, checkpoints=checkpoints,
            best_value=best.metrics.get(objective.metric) if best else None,
            best_checkpoint=best.path if best else None,
        ))
    return SweepSummary(sweep.get("name", root.name), objective, trials)


def promote_best(root: str | Path, registry, name: str | None = None, alias: str | None = None,
                 metric: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """Promote the sweep's best kept checkpoint into `registry` (a crystalae.registry.Registry)."""
    root = Path(root)
    summary = collect_trials(root)
    trial, checkpoint = summary.best_checkpoint(metric, mode)
    return registry.promote(root / checkpoint.path, name or summary.name, alias=alias,
                            source={"sweep": summary.name, "trial": trial.trial_id, "epoch": checkpoint.epoch})


def _status(statuses: dict[str, str] | None, trial_id: str, epochs: int, budget: int | None) -> str:
    if statuses is None:
        return "running"  # the sweep has not ended (or its driver was killed)
    status = statuses.get(trial_id, "unknown")
    if status == "finished" and budget is not None and epochs < budget:
        return "early-stopped"  # ASHA ended it before the epoch budget
    return status


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
