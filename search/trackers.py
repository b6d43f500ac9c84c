"""A sweep's trials as MLflow runs, logged from the driver (so a SQLite tracking URI works on a cluster too).

Imported only inside `run_sweep`, so Ray stays a lazy import.
"""
from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from ray.tune import Callback

from crystalae import uri_fs
from crystalae.search.config import SweepConfig
from crystalae.search.layout import CHECKPOINT_GLOB, local_checkpoint, trial_folder
from crystalae.search.results import ended_status, read_trial
from crystalae.tracking import MlflowRun, experiment_id_of, mlflow_client

__all__ = ["MlflowTrials", "trained_with"]

BEST_CHECKPOINT = "best_checkpoint"  # the artifact folder of a trial's best checkpoint


def trained_with(root: str | Path, trial_id: str) -> dict[str, Any] | None:
    """Every field of the configuration a trial trains with, as its checkpoints record it (the form `train
    --mlflow` logs: train, model, voxel, dataset_hash); None before it wrote a checkpoint."""
    folder = trial_folder(root, trial_id)
    names = [name for name, _ in uri_fs.list_files(folder) if fnmatch(name, f"{CHECKPOINT_GLOB}/config.json")]
    if not names:
        return None
    try:  # the oldest: the newest may still be being written
        config = uri_fs.read_json(uri_fs.join(folder, names[0]))
    except uri_fs.DamagedFileError:
        return None
    return {"train": config["train_config"], "model": config["model_config"], "voxel": config["voxel_config"],
            "dataset_hash": config["dataset_hash"]}


class MlflowTrials(Callback):
    """Each trial an MLflow run (`crystalae.tracking.MlflowRun`) in the sweep's experiment: as params, the
    searched values by their names and every field of the configuration it trained with (`train.batch_size`,
    `voxel.grid`, `model.base_width`, ...); as metrics, crystalae's per-epoch numbers only, at step `epoch`;
    at its end, its best checkpoint's config.json as artifacts (the weights too with `mlflow_checkpoint`), and
    tags `crystalae.status` (finished, early-stopped, error) and `crystalae.best_checkpoint_path`.

    A resumed sweep continues each trial's run (found by the trial's folder)."""

    def __init__(self, sweep: SweepConfig, root: str | Path):
        # plain settings only: the callback is pickled with the sweep state
        self.uri, self.experiment = sweep.mlflow, sweep.mlflow_experiment or sweep.name
        self.sweep, self.epochs, self.weights, self.root = sweep.name, sweep.epochs, sweep.mlflow_checkpoint, root
        self._client: Any = None
        self._runs: dict[str, MlflowRun] = {}
        self._configured: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}, "_configured": set()}

    def setup(self, **info: Any) -> None:
        # the database and the experiment before any trial: set up on a trial's first result, they held the driver
        # ~10 s on a loaded machine, and a trial that ended meanwhile hung in Ray's result queue
        self._client = mlflow_client(self.uri)
        experiment_id_of(self._client, self.uri, self.experiment)

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._run(trial)

    def _run(self, trial) -> MlflowRun:
        if trial.trial_id not in self._runs:
            self._runs[trial.trial_id] = MlflowRun(
                self.uri, trial_folder(self.root, trial.trial_id), dict(trial.config), self.experiment,
                tags={"crystalae.sweep": self.sweep, "crystalae.trial": trial.trial_id}, client=self._client)
        return self._runs[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        run = self._run(trial)
        if trial.trial_id not in self._configured:
            configs = trained_with(self.root, trial.trial_id)  # the first report comes with a checkpoint
            if configs is not None:
                run.log_params(configs)
                self._configured.add(trial.trial_id)
        run(result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._end(trial.trial_id, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._end(trial.trial_id, failed=True)

    def _end(self, trial_id: str, failed: bool) -> None:
        run = self._runs.pop(trial_id, None)
        if run is None:  # no report reached the driver: the trial never trained an epoch
            return
        record = read_trial(self.root, trial_id)
        if record.best_checkpoint_path:
            folder = local_checkpoint(self.root, record.best_checkpoint_path)
            run.log_files(sorted(p for p in folder.iterdir() if p.is_file()) if self.weights
                          else [folder / "config.json"], BEST_CHECKPOINT)
        run.close(failed, tags={"crystalae.status": ended_status(failed, record.epochs, self.epochs),
                                "crystalae.best_checkpoint_path": record.best_checkpoint_path or ""})
