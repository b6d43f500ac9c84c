"""Winner -> full-budget model: retrain a sweep trial's configuration, recording where it came from.

    crystalae train --from-trial demo/1a2b3c4d --epochs 60 --name demo-final

The run is an ordinary `crystalae.training.train` run (resumable under its name); each of its
checkpoints carries `lineage` (sweep, trial, params, the trial's objective and the sweep folder) beside
the dataset hash, and a promote copies it into the registry manifest.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from crystalae import uri_fs
from crystalae.config import ConfigError, TrainConfig, check_name
from crystalae.dataset import MANIFEST, config_of
from crystalae.locations import TRAIN
from crystalae.search.config import SweepConfig, point_problem, trial_overrides
from crystalae.search.layout import PARAMS_FILE, SWEEP_FILE, TRIALS_DIR, is_sweep, sweep_dir
from crystalae.search.results import collect_trials
from crystalae.search.sweep import dataset_folder, dataset_for
from crystalae.training import check_run, train

__all__ = ["trial_recipe", "retrain_trial"]


def trial_recipe(storage: str | Path, ref: str) -> dict[str, Any]:
    """The configuration of trial `ref` (`SWEEP/TRIAL`, under `storage`, or a trial folder).

    Returns:
        A dict with `sweep` (the SweepConfig), `root` (the sweep folder), `trial` (its id), `params`
        (the sampled values), `voxel`/`model`/`train` (the overrides a trial built) and `lineage`.

    Raises:
        ValueError: `ref` names no trial of a sweep (or climbs out of `storage` with '..'), the trial never
            wrote its params, or they are not a point of the sweep's search space.
    """
    given = Path(ref)
    if given.is_dir() and given.parent.name == TRIALS_DIR and is_sweep(given.parent.parent):
        root, trial_id = given.parent.parent, given.name
    else:
        sweep_name, _, trial_id = ref.rstrip("/").rpartition("/")
        if not sweep_name or not trial_id:
            raise ValueError(f"--from-trial {ref}: give SWEEP/TRIAL (e.g. demo/1a2b3c4d) or a trial folder")
        for part in (*sweep_name.split("/"), trial_id):  # names below --sweeps: no '..', no absolute path
            try:
                check_name(part, "sweep or trial name")
            except ConfigError as exc:
                raise ValueError(f"--from-trial {ref}: {exc}") from None
        root = sweep_dir(storage, sweep_name)
    if not is_sweep(root):
        raise ValueError(f"--from-trial {ref}: no sweep at {root} (its {SWEEP_FILE} is missing)")
    params_file = uri_fs.join(root, TRIALS_DIR, trial_id, PARAMS_FILE)
    if not uri_fs.is_file(params_file):
        raise ValueError(f"--from-trial {ref}: sweep {uri_fs.name_of(root)} has no trial {trial_id!r} with {PARAMS_FILE}")
    try:
        sweep = SweepConfig.from_dict(uri_fs.read_json(uri_fs.join(root, SWEEP_FILE)))
    except (KeyError, TypeError, AttributeError, ConfigError) as exc:  # valid JSON, but no sweep's settings
        raise ValueError(f"--from-trial {ref}: {uri_fs.join(root, SWEEP_FILE)} holds no sweep configuration "
                         f"({type(exc).__name__}: {exc})") from None
    params = uri_fs.read_json(params_file)
    problem = point_problem(sweep.search_space, params)  # a hand-edited or damaged trial: NaN, a list, extra keys
    if problem:
        raise ValueError(f"--from-trial {ref}: {params_file} does not fit sweep {sweep.name}'s search space "
                         f"({problem})")
    voxel, model, train = trial_overrides(sweep, params)
    with warnings.catch_warnings():  # the other trials' damaged files are not this command's business
        warnings.simplefilter("ignore")
        trial = collect_trials(root).only(trial_id).trials
    best = trial[0].best_value if trial else None
    lineage = {"sweep": sweep.name, "sweep_dir": _recorded(root), "trial": trial_id, "params": params,
               "objective": {"metric": sweep.objective_metric, "mode": sweep.objective_mode, "trial_best": best},
               "trial_epochs": sweep.epochs}
    return {"sweep": sweep, "root": root, "trial": trial_id, "params": params, "voxel": voxel, "model": model,
            "train": train, "lineage": lineage}


def _recorded(root: str | Path) -> str:
    """How lineage names the sweep folder: relative to the working directory where it lies below it,
    so a checkpoint exported from a project records no path of the machine that trained it."""
    if uri_fs.is_remote(root):
        return str(root)
    path = Path(root).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def retrain_trial(storage: str | Path, ref: str, *, epochs: int | None = None, data: str | Path | None = None,
                  train_overrides: dict[str, Any] | None = None, out: str | Path = TRAIN,
                  name: str | None = None, progress: bool = False, mlflow: str | None = None):
    """Train trial `ref`'s configuration again, at `epochs` (default: the sweep's budget).

    `data` is a prepared dataset with the trial's voxel config (default: the sweep's own shards for
    it; where the sweep has none, as a committed record, they are prepared under `out/datasets`).
    `train_overrides` replace TrainConfig values (workers, threads, use_gpu...); `progress` logs a
    line per epoch, `mlflow` (a tracking URI) logs the run there. Returns the Ray
    `Result` of `crystalae.training.train`.

    Raises:
        ValueError: `data` was prepared with another voxel config than the trial's; as `trial_recipe`, or
            `crystalae.training.check_run`, TrainConfig (a bad `epochs`), before anything is written.
    """
    recipe = trial_recipe(storage, ref)
    sweep: SweepConfig = recipe["sweep"]
    name = name or f"{sweep.name}-{recipe['trial']}"
    values = {**recipe["train"], "threads": 0, **(train_overrides or {})}
    if epochs is not None:
        values["epochs"] = epochs
    cfg = TrainConfig.from_dict(values)
    check_run(name, mlflow)  # bad settings are refused before any shards are prepared for the run
    wanted = sweep.voxel_config(recipe["voxel"])
    if data is None:  # the sweep's own shards; a sweep record (no datasets) prepares them beside the run
        data = dataset_folder(sweep, recipe["voxel"], recipe["root"])
        if not uri_fs.exists(uri_fs.join(data, MANIFEST)):
            data = dataset_for(sweep, recipe["voxel"], out)
    elif config_of(data) != wanted:
        raise ValueError(f"--data {data} was prepared with {config_of(data)}, but trial {recipe['trial']} used "
                         f"{wanted}; prepare it with the trial's voxel settings")
    return train(data, cfg, recipe["model"], storage=out, name=name,
                 lineage={**recipe["lineage"], "epochs": cfg.epochs}, progress=progress, mlflow=mlflow)
