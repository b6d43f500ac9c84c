"""A training run logged to MLflow (`crystalae train --mlflow URI`): its configuration as params, every
epoch's numbers as metrics. Sweeps use Ray Tune's own MLflow and W&B callbacks (`search.sweep`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from crystalae.extras import require

__all__ = ["MlflowRun"]


class MlflowRun:
    """Called with each epoch's history entry (see `crystalae.progress.EpochLines`). A resumed run
    (same run folder) continues the MLflow run it started."""

    def __init__(self, uri: str, run_dir: str | Path, params: dict[str, Any], experiment: str = "crystalae"):
        require("mlflow", "tracking", "--mlflow")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tag = str(Path(run_dir).resolve())
        earlier = self.client.search_runs([experiment_id], filter_string=f"tags.`crystalae.run_dir` = '{tag}'",
                                          max_results=1)
        if earlier:
            self.run_id = earlier[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=Path(run_dir).name,
                                                 tags={"crystalae.run_dir": tag}).info.run_id
            from mlflow.entities import Param

            # MLflow caps a param value's length: long values (tuples of species) are cut, not refused
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in _flat(params).items()])

    def __call__(self, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(entry["epoch"])
        metrics = [Metric(k, float(v), stamp, step) for k, v in entry.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and k != "epoch"]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
