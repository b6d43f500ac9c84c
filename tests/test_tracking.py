"""What a sweep leaves in its experiment tracker (MLflow): the fixture's tiny sweep, read back."""
import dataclasses
import json

import pytest

from crystalae.tracking import is_epoch_metric


def test_a_sweeps_mlflow_runs_hold_every_config_field_its_own_metrics_and_the_best_checkpoint(tiny_sweep, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from crystalae.config import TrainConfig
    from crystalae.models import ModelConfig

    client = MlflowClient(tiny_sweep["mlflow"])
    experiment = client.get_experiment_by_name("tiny")
    # artifacts beside the SQLite database, not in whatever folder the sweep ran from
    assert experiment.artifact_location.startswith((tiny_sweep["storage"].parent / "mlartifacts").as_uri())
    runs = {r.data.tags.get("crystalae.trial"): r for r in client.search_runs([experiment.experiment_id])}
    for trial in tiny_sweep["summary"].trials:
        run = runs[trial.trial_id]
        params = run.data.params
        # the searched values by name, and every field of the configuration the trial trained with
        assert {k: params[k] for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        assert {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)} <= set(params)
        assert {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)} <= set(params)
        assert (params["voxel.grid"], params["train.batch_size"], params["model.base_width"]) == ("8", "8", "4")
        assert params["voxel.sigma"] == str(trial.params["sigma"]) and params["dataset_hash"]
        # crystalae's numbers only, each epoch at its step: none of Tune's pid, timestamp, done, config/lr
        assert "val_score" in run.data.metrics and all(is_epoch_metric(k) for k in run.data.metrics), run.data.metrics
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_score")]
        assert sorted(steps) == list(range(trial.epochs))
        assert run.data.tags["crystalae.status"] == trial.status
        assert run.data.tags["crystalae.best_checkpoint_path"] == trial.best_checkpoint_path
        # the best checkpoint's record (without weights unless tracking: {mlflow_checkpoint: true})
        assert [a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")] == \
            ["best_checkpoint/config.json"]
        local = client.download_artifacts(run.info.run_id, "best_checkpoint/config.json", str(tmp_path))
        assert json.loads(open(local).read())["epoch"] == trial.best_epoch


def test_only_crystalaes_numbers_count_as_epoch_metrics():
    tune_keys = ["pid", "timestamp", "done", "config/lr", "training_iteration", "time_total_s", "trial_id", "epoch"]
    assert not any(is_epoch_metric(k) for k in tune_keys)
    assert all(is_epoch_metric(k) for k in ("val_score", "train_loss", "lr", "epochs_done", "parameters"))
