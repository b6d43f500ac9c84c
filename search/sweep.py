"""Ray Tune + Optuna sweep: each trial is a Tune function trainable that runs a Ray Train TorchTrainer.

The sweep folder's layout and the reading of its results (trials, best checkpoint, promote) live in
`crystalae.search.results`, which needs no Ray.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from crystalae import uri_fs
from crystalae.dataset import MANIFEST
from crystalae.files import write_json
from crystalae.locations import SWEEPS
from crystalae.provenance import provenance
from crystalae.ray_env import free_local_port, runtime_env
from crystalae.ray_shards import check_ray_address
from crystalae.search.config import (
    NOT_IDENTITY,
    SAMPLER_ONLY,
    SCHEDULER_ONLY,
    SweepConfig,
    point_problem,
    split_options,
    trial_overrides,
)
from crystalae.search.layout import (
    DATASETS_DIR,
    LOG_FILE,
    PARAMS_FILE,
    STUDY_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    TRIALS_DIR,
    local_root,
    next_tune_dir,
    sweep_dir,
    trial_folder,
    tune_dirs,
)
from crystalae.search.results import SweepSummary, best_params, collect_trials, ended_runs, recorded_statuses
from crystalae.shards import prepare_dataset
from crystalae.training import TrainConfig

__all__ = [
    "RunPlan", "dataset_folder", "dataset_for", "node_local_storage", "publish_driver_files",
    "run_sweep", "run_trial", "tracker_callbacks", "trial_settings", "warm_start_points",
]

# File systems whose folders every node can mount at one path; a folder on any other is node-local.
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "9p", "fuse")

log = logging.getLogger(__name__)


def dataset_for(sweep: SweepConfig, voxel_overrides: dict[str, Any], root: str | Path) -> str | Path:
    """Prepared shards for this voxel config, cached by its hash, so trials with one sigma share them.

    A file lock makes trials on one machine wait for each other. On object storage, trials on
    several nodes may prepare the same dataset at once: harmless, as both write the same bytes and
    the manifest, written last, is the same.
    """
    folder = dataset_folder(sweep, voxel_overrides, root)
    with _machine_lock(folder):
        if not uri_fs.exists(uri_fs.join(folder, MANIFEST)):
            prepare_dataset(sweep.data["source"], folder, sweep.voxel_config(voxel_overrides),
                            split_options(sweep.data), workers=1)
    return folder


def dataset_folder(sweep: SweepConfig, voxel_overrides: dict[str, Any], root: str | Path) -> str | Path:
    """Where `dataset_for` keeps the shards of this voxel config under `root` (prepared or not)."""
    voxel = sweep.voxel_config(voxel_overrides)
    options = split_options(sweep.data)
    key = hashlib.sha256(json.dumps({"source": sweep.data["source"], "voxel": voxel.as_dict(),
                                     "options": [options.val_fraction, options.test_fraction]},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return uri_fs.join(root, DATASETS_DIR, key)


def _machine_lock(folder: str | Path):
    """A file lock beside a local folder; object storage has none (see `dataset_for`)."""
    if uri_fs.is_remote(folder):
        return contextlib.nullcontext()
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder) + ".lock")


def trial_settings(sweep: SweepConfig, params: dict[str, Any]):
    """Split a Tune sample into voxel overrides, model overrides and the TrainConfig."""
    voxel, model, train = trial_overrides(sweep, params)
    return voxel, model, TrainConfig.from_dict(train)


def run_trial(params: dict[str, Any], sweep_dict: dict[str, Any], root: str | Path) -> None:
    """Tune function trainable: prepare (or reuse) shards, then TorchTrainer.fit() with metrics to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from crystalae.training import train

    sweep = SweepConfig.from_dict(sweep_dict)
    trial_id = tune.get_context().get_trial_id()
    voxel, model, train_cfg = trial_settings(sweep, params)
    uri_fs.write_json(uri_fs.join(trial_folder(root, trial_id), PARAMS_FILE), params)
    data = dataset_for(sweep, voxel, root)
    result = train(data, train_cfg, model, storage=uri_fs.join(root, TRIALS_DIR), name=trial_id,
                   callbacks=[TuneReportCallback()], score=(sweep.objective_metric, sweep.objective_mode))
    if result.error is not None:
        raise result.error


def warm_start_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """What a sweep's first run evaluates before the sampler proposes: the configured `points`, then the
    best configurations of the sweep named by `warm_start` that this search space can produce."""
    points = [dict(p) for p in sweep.points]
    if sweep.warm_start is None:
        return points
    space = {p.name: p for p in sweep.search_space}
    earlier: list[dict[str, Any]] = []
    for params in best_params(sweep.warm_start):
        point = {k: v for k, v in params.items() if k in space}
        if point_problem(sweep.search_space, point) is None and point not in points + earlier:
            earlier.append(point)
    return points + earlier[:sweep.warm_start_trials]


def run_sweep(sweep: SweepConfig, storage: str | Path = SWEEPS, address: str | None = None,
              resume: bool = False) -> SweepSummary:
    """Run (or resume) a sweep; returns the summary that is also written to summary.json.

    `resume` continues the newest run of trials where its driver stopped; on a sweep that has ended,
    a larger `trials` budget than it has trials runs the difference as a new run on the same study.
    """
    import ray

    from crystalae.search.console import ray_output_to

    check_ray_address(address)  # before anything is written
    root = sweep_dir(storage, sweep.name)
    work = local_root(root)  # the driver's own files; on object storage, a local copy it publishes
    work.mkdir(parents=True, exist_ok=True)
    sweep_dict = sweep.as_dict()
    sweep_dict["data"]["source"] = _absolute_source(sweep.data["source"])  # trials run elsewhere
    if sweep.warm_start is not None:
        sweep_dict["warm_start"] = _absolute_source(sweep.warm_start)
    sweep_dict = json.loads(json.dumps(sweep_dict))  # the form sweep.json holds (lists, not tuples)
    previous = work / SWEEP_FILE
    if previous.exists() and _identity(json.loads(previous.read_text())) != _identity(sweep_dict):
        raise ValueError(f"{root} holds a sweep with another config; use another --name")
    runs = tune_dirs(root)
    if previous.exists() and not resume and runs:
        raise ValueError(f"sweep {sweep.name} already exists at {root}; pass --resume to continue it")
    write_json(previous, sweep_dict)
    publish_driver_files(work, root)

    # Ray, Optuna and the trackers log to ray.log from the start: Ray's start-up notices and Optuna's
    # "new study" line included, so the console holds only the sweep's own lines
    libraries = ("ray", "optuna", *(("mlflow",) if sweep.mlflow else ()), *(("wandb",) if sweep.wandb_project else ()))
    with ray_output_to(work / LOG_FILE, libraries) as route_logs:
        own_ray = not ray.is_initialized()
        if own_ray and address:
            ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=runtime_env())
        elif own_ray:
            start_local_ray(sweep)
        route_logs()
        problem = node_local_storage(root, ray.nodes())
        if problem:
            log.warning(problem)
        try:
            ended = _run_trials(sweep, root, work, sweep_dict, runs)
        finally:
            if own_ray:  # a Ray left running printed its raylet's warnings after the command's last line
                ray.shutdown()
    # A trial that failed before its first report has no trial_id in its metrics: find it by the
    # params it wrote (each trial's sampled config), never by parsing Ray's folder names.
    by_params = {_params_key(t.params): t.trial_id for t in collect_trials(root).trials}
    statuses = recorded_statuses(root)  # earlier runs' trials keep their status
    for metrics, config, failed in ended:
        trial_id = metrics.get("trial_id") or by_params.get(_params_key(config))
        if trial_id:
            statuses[str(trial_id)] = "error" if failed else "finished"
    summary = collect_trials(root, statuses)
    write_json(work / SUMMARY_FILE, {**summary.as_dict(), "tune_runs": len(tune_dirs(root)),
                                     "provenance": provenance(seed=sweep.seed)})
    publish_driver_files(work, root)
    return summary


def _run_trials(sweep: SweepConfig, root: str | Path, work: Path, sweep_dict: dict[str, Any], runs: list
                ) -> list[tuple[dict[str, Any], dict[str, Any], bool]]:
    """Restore, extend or start the sweep's Tune run on the Ray now connected and run it to the end;
    (metrics, config, failed) of each trial the run ended."""
    from ray import tune

    from crystalae.search.console import SweepConsole

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep_dict=sweep_dict, root=str(root)),
                                    {"cpu": 0.01})
    plan = _plan_run(runs, restorable=bool(runs) and tune.Tuner.can_restore(str(runs[-1])), ended=ended_runs(root),
                     had=len(collect_trials(root).trials) if runs else 0, trials=sweep.trials,
                     next_dir=next_tune_dir(root))
    console = SweepConsole(sweep.objective_metric, sweep.objective_mode, plan.new_trials, sweep.epochs)
    if plan.action == "restore":
        tuner = tune.Tuner.restore(str(plan.experiment), trainable=trainable, resume_errored=True)
    elif plan.action == "new":
        tuner = _new_tuner(sweep, root, work, trainable, plan, console)
    else:
        return []
    # read while Ray is up; the tuner and its tracker callbacks go with this frame, not at interpreter exit
    # (W&B's callback printed a traceback from __del__ there)
    return [(r.metrics or {}, r.config or {}, r.error is not None) for r in tuner.fit()]


def start_local_ray(sweep: SweepConfig) -> None:
    """A Ray instance on this machine for the sweep: enough logical CPUs, its dashboard on loopback."""
    import ray

    per_trial = sweep.workers_per_trial * sweep.cpus_per_worker
    # Logical CPUs must cover trial drivers and Train workers, or trials wait for resources.
    # The dashboard serves the State API that Ray Train's PlacementGroupCleaner polls: without it, or
    # without its address (ray_env.API_SERVER_ENV) when another Ray runs on the machine, a trial ASHA
    # stops keeps its workers' CPUs for the whole sweep, until the sweep hangs waiting for resources.
    port = free_local_port()
    ray.init(num_cpus=max(4, sweep.max_concurrent * (per_trial + 2) + 2), include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False, configure_logging=False,
             runtime_env=runtime_env(api_server=f"http://127.0.0.1:{port}"))


def node_local_storage(root: str | Path, nodes: list[dict[str, Any]], host: str | None = None,
                       mounts: str | Path = "/proc/mounts") -> str | None:
    """Why the sweep folder `root` is unsafe for a cluster of `nodes` (`ray.nodes()`), or None.

    Trial drivers, Train controllers and workers write to the folder on the node they run on. A folder
    on this machine's own disk is one folder only while every live node runs on this machine (`host`,
    default this one) or the folder is on a network file system (`mounts` lists them); otherwise each
    node keeps its checkpoints on its own disk, and a lost node takes them with it.
    """
    if uri_fs.is_remote(root):
        return None
    hosts = sorted({n["NodeManagerHostname"] for n in nodes if n.get("Alive")} - {host or socket.gethostname()})
    kind = _filesystem_of(Path(root), mounts)
    if not hosts or kind.split(".")[0] in SHARED_FILESYSTEMS:
        return None
    return (f"--storage {root} is a folder on this machine's disk ({kind}), but nodes on {', '.join(hosts)} "
            f"write their trials' checkpoints to their own disks: this machine (promote, the dashboard, "
            f"--resume) will not see them, and a lost node loses them (its trials start again from epoch 0). "
            f"Use object storage (--storage s3://...) or a shared mount at the same path on every node.")


def _filesystem_of(path: Path, mounts: str | Path) -> str:
    """The type of the file system holding `path` (the longest mount point above it), e.g. ext4, nfs4."""
    best, kind = "", "unknown"
    path = path.resolve()
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and (path.as_posix() + "/").startswith(fields[1].rstrip("/") + "/") \
                and len(fields[1]) >= len(best):
            best, kind = fields[1], fields[2]
    return kind


def tracker_callbacks(sweep: SweepConfig, root: str | Path) -> list:
    """The experiment trackers the sweep's `tracking` section asks for: crystalae's MLflow runs (every
    configuration field, crystalae's metrics, the best checkpoint; `search.trackers`), Ray Tune's W&B logger."""
    callbacks = []
    if sweep.mlflow:
        from crystalae.extras import require

        require("mlflow", "tracking", "tracking: {mlflow: ...}")
        from crystalae.search.trackers import MlflowTrials

        callbacks.append(MlflowTrials(sweep, root))
    if sweep.wandb_project:
        from crystalae.extras import require

        require("wandb", "wandb", "tracking: {wandb_project: ...}")
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=sweep.wandb_project, group=sweep.name))
    return callbacks


@dataclass(frozen=True)
class RunPlan:
    """What `run_sweep` does with a sweep folder: restore its newest Tune run, start a new one, or
    nothing (every trial of the budget has ended)."""

    action: Literal["restore", "new", "none"]
    experiment: str | Path  # the Tune run folder to restore or to start in
    new_trials: int  # trials this run may start
    warm_start: bool  # a sweep's first run evaluates the warm-start points first
    study_run: int  # which run of trials on the study (seeds the sampler)


def _plan_run(runs: list, restorable: bool, ended: int, had: int, trials: int, next_dir: str | Path) -> RunPlan:
    """Restore, extend or start new, from what the sweep folder holds: its Tune `runs` (oldest first),
    whether the newest can be restored, how many `ended`, the trials it `had`, and the `trials` budget.

    - no runs: a new run in `next_dir`;
    - every run ended and the budget grew: an extension, a new run of the difference in `next_dir`;
    - the newest run can be restored: it is (a driver that was stopped, or a finished run read back);
    - otherwise (killed before Tune saved any state): that run's folder starts over with the trials
      not yet recorded.
    """
    if not runs:
        return RunPlan("new", next_dir, trials, warm_start=True, study_run=0)
    if ended >= len(runs) and trials > had:
        return RunPlan("new", next_dir, trials - had, warm_start=False, study_run=len(runs))
    if restorable:
        return RunPlan("restore", runs[-1], trials, warm_start=False, study_run=0)
    left = trials - had
    return RunPlan("new" if left > 0 else "none", runs[-1], left, warm_start=False, study_run=0)


def _new_tuner(sweep: SweepConfig, root: str | Path, work: Path, trainable: Any, plan: RunPlan, console: Any):
    """A Tuner for a new run of `plan.new_trials` trials: the persistent Optuna searcher, ASHA (or
    FIFO), the console and the trackers."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from crystalae.search.console import FreeDeadRuns, PublishOnTrialEnd
    from crystalae.search.searcher import persistent_searcher

    searcher = persistent_searcher(sweep, root, points=warm_start_points(sweep) if plan.warm_start else None,
                                   run=plan.study_run)
    several = sweep.multi_objective  # the searcher holds the objectives; ASHA the first
    primary = {"metric": sweep.objective_metric, "mode": sweep.objective_mode}
    scheduler = (ASHAScheduler(time_attr="epochs_done", max_t=sweep.epochs, grace_period=sweep.asha_grace_period(),
                               reduction_factor=sweep.reduction_factor, **(primary if several else {}))
                 if sweep.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space={p.name: p.to_tune() for p in sweep.search_space},
        tune_config=tune.TuneConfig(**({} if several else primary), search_alg=searcher, scheduler=scheduler,
                                    num_samples=plan.new_trials, max_concurrent_trials=sweep.max_concurrent,
                                    time_budget_s=sweep.time_budget_s),
        run_config=tune.RunConfig(
            name=uri_fs.name_of(plan.experiment), storage_path=str(root), verbose=0,
            callbacks=[console, PublishOnTrialEnd(publish_driver_files, work, root), FreeDeadRuns(),
                       *tracker_callbacks(sweep, root)],
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
    )


def publish_driver_files(work: Path, root: str | Path) -> None:
    """For a sweep on object storage: upload the driver's own files (config, Optuna study, log, and
    the summary last), so readers elsewhere see them. A local sweep writes them in place."""
    if uri_fs.is_remote(root):
        driver_files = (SWEEP_FILE, STUDY_FILE, LOG_FILE, SUMMARY_FILE)
        uri_fs.upload(work, root, include=lambda name: name in driver_files, last=(SUMMARY_FILE,))


def _identity(sweep_dict: dict[str, Any]) -> dict[str, Any]:
    """What makes two sweep configs the same sweep: everything but the trial budget (which may grow) and
    settings its scheduler or sampler never reads (a FIFO sweep has no grace period). Fields added since a
    sweep.json was written take their defaults, so older sweeps still resume."""
    normal = json.loads(json.dumps(SweepConfig.from_dict(sweep_dict).as_dict()))
    unread = (*NOT_IDENTITY, *(SCHEDULER_ONLY if normal["scheduler"] == "fifo" else ()),
              *(SAMPLER_ONLY if normal["algorithm"] == "random" else ()))
    return {k: v for k, v in normal.items() if k not in unread}


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _absolute_source(source: str | list) -> str | list:
    if isinstance(source, (list, tuple)):
        return [_absolute_source(part) for part in source]
    return source if str(source).startswith("demo") else str(uri_fs.absolute(source))
