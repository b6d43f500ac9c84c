"""A training run logged to MLflow (`crystalae train --mlflow URI`, and each trial of a sweep with
`tracking: {mlflow: URI}`, see `crystalae.search.trackers`): its configuration as params, every epoch's
numbers as metrics, and for a trial its best checkpoint as artifacts."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from crystalae import uri_fs
from crystalae.extras import require

__all__ = ["MlflowRun", "experiment_id_of", "is_epoch_metric", "mlflow_client"]

ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite tracking database: where its runs' artifacts go
# crystalae's own per-epoch numbers besides the train_/val_ terms (Ray Tune adds pid, timestamp, done, ...)
_EPOCH_NUMBERS = frozenset({"epochs_done", "lr", "epoch_seconds", "eval_seconds", "parameters"})


def is_epoch_metric(name: str) -> bool:
    """Whether `name` is one of the numbers crystalae reports each epoch (a history entry's loss terms and
    scores, the learning rate, timings, size), as opposed to what Ray Tune adds to a result."""
    return name in _EPOCH_NUMBERS or name.startswith(("train_", "val_"))


class MlflowRun:
    """Called with each epoch's history entry (see `crystalae.progress.EpochLines`). A resumed run
    (same run folder) continues the MLflow run it started."""

    def __init__(self, uri: str, run_dir: str | Path, params: dict[str, Any], experiment: str = "crystalae",
                 tags: dict[str, str] | None = None, client: Any = None):
        """`client`: an MlflowClient of `uri` to share (a client sets up its database connection when made)."""
        self.client = client or mlflow_client(uri)
        experiment_id = experiment_id_of(self.client, uri, experiment)
        tag = str(run_dir) if uri_fs.is_remote(run_dir) else str(Path(run_dir).resolve())
        earlier = self.client.search_runs([experiment_id], filter_string=f"tags.`crystalae.run_dir` = '{tag}'",
                                          max_results=1)
        if earlier:
            self.run_id = earlier[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=uri_fs.name_of(run_dir),
                                                 tags={"crystalae.run_dir": tag, **(tags or {})}).info.run_id
            self.log_params(params)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log `params` (nested mappings as dotted names: train.lr) on the run."""
        from mlflow.entities import Param

        # MLflow caps a param value's length: long values (tuples of species) are cut, not refused
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in _flat(params).items()])

    def __call__(self, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(entry["epoch"])
        metrics = [Metric(k, float(v), stamp, step) for k, v in entry.items()
                   if is_epoch_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_files(self, files: list[Path], artifact_path: str) -> None:
        """Copy local `files` into the run's artifacts, under `artifact_path`."""
        for file in files:
            self.client.log_artifact(self.run_id, str(file), artifact_path)

    def close(self, failed: bool = False, tags: dict[str, str] | None = None) -> None:
        """End the run (FAILED or FINISHED), with `tags` set first."""
        for key, value in (tags or {}).items():
            self.client.set_tag(self.run_id, key, value)
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def mlflow_client(uri: str) -> Any:
    """An MlflowClient of tracking URI `uri` (needs crystalae[tracking])."""
    require("mlflow", "tracking", "--mlflow")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def experiment_id_of(client: Any, uri: str, experiment: str) -> str:
    """The id of MLflow experiment `experiment`, created (artifacts beside a SQLite database) when missing."""
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else client.create_experiment(experiment,
                                                                      artifact_location=_artifact_location(uri))


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a new experiment in a SQLite database go to a folder beside it (MLflow's default,
    ./mlruns, is wherever the command ran); other stores keep their own default (None)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix + ":memory:":
        return None
    return (Path(uri[len(prefix):]).resolve().parent / ARTIFACTS_DIR).as_uri()


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
