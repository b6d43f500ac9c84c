"""Training: one epoch, the Ray Train worker loop and the TorchTrainer driver.
Losses live in `crystalae.losses`, augmentation in `crystalae.augment`, the data in `crystalae.dataset`
end-to-end validation (`evaluate`) in `crystalae.evaluation` and the configuration (`TrainConfig`) in
`crystalae.config`.

    crystalae train --data runs/demo/data --workers 2 --epochs 10

The same `run_epoch` serves the Ray worker loop and the plain single-process loop of
`bench/train_throughput.py`, so the two are compared on identical work.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystalae.augment import augment
from crystalae.base_model import base_configs, check_base_voxel, find_base, load_base_weights
from crystalae.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from crystalae.config import ConfigError, Objective, TrainConfig, VoxelConfig, blank_problem, check_name
from crystalae.dataset import WorkerShare, config_of, dataset_species, prefetched, read_manifest, read_table, table_batches
from crystalae.evaluation import evaluate
from crystalae.files import read_yaml_mapping
from crystalae.library_logs import library_logs_to
from crystalae.locations import TRAIN
from crystalae.losses import loss_terms
from crystalae.models import PAPER_PRESET, CrystalAE, ModelConfig, model_config_for
from crystalae.progress import EpochLines
from crystalae.ray_env import runtime_env
from crystalae.units import class_lookup, density_scale
from crystalae.uri_fs import absolute
from crystalae.uri_fs import is_remote as storage_is_remote

__all__ = [
    "REPORTED_METRICS", "best_checkpoint_path", "build_configs", "check_run", "dataset_species", "lr_factor",
    "read_train_spec", "run_epoch", "train",
]

SCORE = ("val_score", "max")  # the default objective: comparable across sigma, grid and architecture
# Metrics every epoch reports (a sweep objective must be one of them); lattice terms need the cell grid.
REPORTED_METRICS = (
    "val_score", "val_recovery", "val_match_rate", "val_rms", "val_species_accuracy", "val_atom_count_rate",
    "val_density_mse",
    *(f"{split}_{term}" for split in ("val", "train") for term in ("loss", "recon", "kl", "species", "lattice")),
    "epoch_seconds", "eval_seconds", "parameters",
)


TRAIN_SPEC_SECTIONS = ("train", "model", "preset")


def read_train_spec(path: str | Path | None) -> dict[str, Any]:
    """A `crystalae train --config` YAML: optional sections `train` (TrainConfig fields), `model`
    (ModelConfig overrides) and `preset`; unknown sections are an error naming the file."""
    if path is None:
        return {}
    data = read_yaml_mapping(path, "--config")
    unknown = set(data) - set(TRAIN_SPEC_SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(map(str, unknown))} (allowed: {', '.join(TRAIN_SPEC_SECTIONS)})")
    for section in ("train", "model"):
        if not isinstance(data.get(section) or {}, dict):
            raise ValueError(f"{path}: `{section}` must be a mapping of field: value")
    return data


def lr_factor(cfg: TrainConfig, progress: float) -> float:
    """Multiplier of `lr` at `progress` epochs into training (linear warm-up, then cosine)."""
    if cfg.schedule == "constant":
        return 1.0
    if progress < cfg.warmup_epochs:
        return max(progress / cfg.warmup_epochs, 0.01)
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    t = min((progress - cfg.warmup_epochs) / span, 1.0)
    floor = min(cfg.min_lr / cfg.lr, 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def run_epoch(model, batches: Iterable[dict], cfg: TrainConfig, scale: float, lut: torch.Tensor,
              device: torch.device, optimizer: torch.optim.Optimizer | None = None,
              prepare: Callable[[dict], dict] | None = None,
              schedule: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass; trains when given an optimizer. `prepare` transforms each CPU batch (augmentation),
    `schedule(step)` sets the learning rate before each step. Returns sample-weighted mean loss terms."""
    model.train(optimizer is not None)
    use_amp = cfg.amp and device.type == "cuda"
    sums: dict[str, float] = {}
    count = 0
    for step, batch in enumerate(prefetched(batches, prepare, background=device.type == "cuda")):
        if schedule is not None:
            schedule(step)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.set_grad_enabled(optimizer is not None), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            terms = loss_terms(model, batch, cfg, scale, lut)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        n = len(batch["density"])
        count += n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
    return {k: v / max(count, 1) for k, v in sums.items()} | {"samples": count}


def _train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: data-parallel epochs over the `train` shard, rank 0 validates and checkpoints."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["train"])
    voxel = VoxelConfig.from_dict(loop_config["voxel"])
    model_cfg = ModelConfig.from_dict(loop_config["model"])
    torch.set_num_threads(cfg.threads)  # Ray sets OMP_NUM_THREADS=1 in workers
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    model = CrystalAE(model_cfg)
    if cfg.init_from:
        load_base_weights(model, cfg.init_from, vae_only=cfg.reader_only)  # a resumed run's checkpoint replaces these
    if cfg.reader_only:
        model.freeze_vae()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # Restore: a resumed run continues from its latest checkpoint (weights, optimizer, history).
    start_epoch, history, last_metrics = _restore(model, optimizer)
    if start_epoch >= cfg.epochs:
        # Finished before a restart (e.g. a resumed sweep): report the final metrics again so
        # the caller (Tune) sees its objective, and train no further.
        ray.train.report({**_scalars(last_metrics), "epochs_done": start_epoch})
        return

    # Data: this worker's share of the train split; rank 0 alone reads the val split.
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    context = ray.train.get_context()
    rank = context.get_world_rank()
    val_table = read_table(loop_config["data"], split="val") if rank == 0 else None
    scale, lut = density_scale(voxel), class_lookup(model_cfg.species)
    share = WorkerShare(loop_config["data"], rank, context.get_world_size(), cfg.batch_size,
                        keep=cfg.cache_dataset, seed=cfg.seed)
    steps_per_epoch = max(1, math.ceil(share.rows / cfg.batch_size))
    rng = np.random.default_rng([cfg.seed, rank, start_epoch])

    def prepare(batch: dict) -> dict:
        return augment(batch, cfg, voxel, model_cfg.species, rng)

    for epoch in range(start_epoch, cfg.epochs):
        # Train one epoch (every worker: DDP averages the gradients each step).
        started = time.perf_counter()
        schedule = _lr_schedule(optimizer, cfg, epoch, steps_per_epoch)
        train_terms = run_epoch(model, share.batches(epoch), cfg, scale, lut, device, optimizer, prepare, schedule)
        metrics = _epoch_metrics(epoch, time.perf_counter() - started, optimizer, train_terms)
        if rank != 0:
            ray.train.report(metrics)
            continue
        # Validate (rank 0): loss terms and end-to-end reconstruction of the val split.
        metrics.update(_validate(core, val_table, voxel, cfg, scale, lut, device))
        metrics["eval_seconds"] = time.perf_counter() - started - metrics["epoch_seconds"]
        metrics["parameters"] = sum(p.numel() for p in core.parameters())  # a size objective for sweeps
        metrics["finished_at"] = time.time()  # wall clock: orders epochs of concurrent trials (sweep budgets)
        # Save and report: a checkpoint of this epoch, which Ray keeps or drops by the score metric.
        history.append(_scalars(metrics))
        _save_and_report(core, voxel, cfg, optimizer, metrics, history, loop_config)


def _restore(model: CrystalAE, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict], dict[str, Any]]:
    """Load Ray Train's latest checkpoint, if any, into `model` and `optimizer`; returns the first
    epoch still to run, the metric history so far and the last epoch's metrics (0, [], {} on a fresh run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, [], {}
    with checkpoint.as_directory() as folder:
        payload = read_checkpoint(folder)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return payload["epoch"] + 1, list(payload.get("history") or []), payload["metrics"]


def _lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int, steps_per_epoch: int
                 ) -> Callable[[int], None]:
    """`schedule(step)` for `run_epoch`: sets the learning rate of step `step` of `epoch`."""
    def schedule(step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, epoch + step / steps_per_epoch)

    return schedule


def _epoch_metrics(epoch: int, seconds: float, optimizer: torch.optim.Optimizer, train_terms: dict[str, float]
                   ) -> dict[str, Any]:
    """What every worker reports after training an epoch."""
    import ray.util

    # epochs_done counts from the run's start, not the process's: a resumed trial's Tune
    # training_iteration restarts at 1, so schedulers and the console count this instead.
    metrics: dict[str, Any] = {"epoch": epoch, "epochs_done": epoch + 1, "epoch_seconds": seconds,
                               "lr": optimizer.param_groups[0]["lr"], "node_ip": ray.util.get_node_ip_address()}
    metrics.update({f"train_{k}": v for k, v in train_terms.items()})
    return metrics


def _validate(model: CrystalAE, val_table, voxel: VoxelConfig, cfg: TrainConfig, scale: float, lut: torch.Tensor,
              device: torch.device) -> dict[str, Any]:
    """`val_` metrics: the loss terms on the val split and `evaluate`'s end-to-end reconstruction."""
    if val_table is None or not val_table.num_rows:
        # No validation data, so no validation loss: NaN, not the training loss, which would pass a
        # training fit off as a held-out one (progress lines and best_checkpoint_path skip NaN;
        # checkpoints store None). The scores stay 0.0: Ray ranks the kept checkpoints by one of them.
        return {"val_loss": float("nan"), "val_score": 0.0, "val_recovery": 0.0}
    terms = run_epoch(model, table_batches(val_table, cfg.batch_size), cfg, scale, lut, device)
    metrics = {f"val_{k}": v for k, v in terms.items() if k != "samples"}
    metrics.update({f"val_{k}": v for k, v in evaluate(model, val_table, voxel, cfg, device).items()})
    return metrics


def _save_and_report(model: CrystalAE, voxel: VoxelConfig, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                     metrics: dict[str, Any], history: list[dict], loop_config: dict[str, Any]) -> None:
    """Checkpoint this epoch (weights, optimizer, history, lineage) and report it to Ray Train."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, model, voxel, epoch=metrics["epoch"], metrics=metrics, train_config=cfg.as_dict(),
                        dataset_hash=loop_config["dataset_hash"], optimizer=optimizer, history=history,
                        lineage=loop_config.get("lineage"))
        ray.train.report(_scalars(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder))


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray results keep numbers; the confusion matrix etc. stay in the checkpoint's metrics."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, str)) or v is None:
            out[k] = float("nan") if v is None else v
    return out


def build_configs(data: str | Path, model_overrides: dict[str, Any], preset: str | None = None
                  ) -> tuple[VoxelConfig, ModelConfig]:
    """The dataset's voxel settings and a ModelConfig fitted to them and its elements (+ the overrides)."""
    voxel = config_of(data)
    overrides = {**(PAPER_PRESET if preset == "paper" else {}), **model_overrides}
    return voxel, model_config_for(voxel, dataset_species(data), **overrides)


def check_run(name: Any, mlflow: str | None = None) -> None:
    """Refuse a run `name` that is no plain folder name (no '..', no absolute path: the run lives under its
    storage) and an empty `mlflow` tracking URI (it would log nowhere without a word).

    Raises:
        ConfigError: naming the setting.
    """
    check_name(name, "run name")
    problem = blank_problem(mlflow, "--mlflow")
    if problem:
        raise ConfigError(problem)


def train(data: str | Path, cfg: TrainConfig = TrainConfig(), model_overrides: dict[str, Any] | None = None, *,
          storage: str | Path = TRAIN, name: str = "crystalae", preset: str | None = None,
          callbacks: list | None = None, score: tuple[str, str] = SCORE, lineage: dict[str, Any] | None = None,
          progress: bool = False, mlflow: str | None = None):
    """Train with Ray Train's TorchTrainer; rerunning the same storage/name resumes from the latest
    checkpoint. `score` (metric, mode) ranks the kept checkpoints; `lineage` (where this configuration
    came from, e.g. a sweep trial) is recorded in every checkpoint with the dataset hash. `progress`
    logs a line per epoch, and `mlflow` (a tracking URI) logs the run there (local storage). Returns the
    Ray `Result` (its `checkpoint` is the newest, `best_checkpoints` ranked)."""
    import ray

    check_run(name, mlflow)
    manifest = read_manifest(data)
    cfg = cfg.resolved()
    base_voxel = None
    if cfg.init_from:
        cfg = replace(cfg, init_from=find_base(cfg.init_from))
        base_model, base_voxel = base_configs(cfg.init_from)
        model_overrides = {**base_model, **(model_overrides or {})}
    voxel, model_cfg = build_configs(data, model_overrides or {}, preset)
    if base_voxel is not None:
        check_base_voxel(cfg.init_from, base_voxel, voxel)
    storage = absolute(storage)
    _check_resume(None if storage_is_remote(storage) else Path(storage) / name, model_cfg, voxel)
    with library_logs_to(_library_log(storage, name), ("ray", *(("mlflow",) if mlflow else ()))) as route_logs:
        if not ray.is_initialized():
            # Logical CPUs must cover the driver and every worker's threads.
            ray.init(num_cpus=max(4, cfg.workers * cfg.threads + 2), include_dashboard=False, log_to_driver=False,
                     configure_logging=False, runtime_env=runtime_env())
            route_logs()
        return _fit(data, cfg, voxel, model_cfg, manifest, storage, name, callbacks, score, lineage, progress, mlflow)


def _library_log(storage: str | Path, name: str) -> Path:
    """Where Ray's and MLflow's own log lines go during a run: `ray.log` in a local run folder; for a run on
    object storage, a file in this machine's temp folder."""
    if storage_is_remote(storage):
        return Path(tempfile.gettempdir()) / f"crystalae-{name}-ray.log"
    return Path(storage) / name / "ray.log"


def _fit(data, cfg: TrainConfig, voxel: VoxelConfig, model_cfg: ModelConfig, manifest: dict[str, Any],
         storage: str | Path, name: str, callbacks: list | None, score: tuple[str, str],
         lineage: dict[str, Any] | None, progress: bool, mlflow: str | None):
    """`train` once Ray is up: the TorchTrainer, followed by the epoch lines and MLflow when asked."""
    import ray.train
    from ray.train.torch import TorchTrainer

    # Workers read their share of the shards themselves (WorkerShare): no Ray Data pipeline to start per run.
    loop_config = {"train": cfg.as_dict(), "voxel": voxel.as_dict(), "model": model_cfg.as_dict(),
                   "data": str(absolute(data)),
                   "dataset_hash": manifest["dataset_hash"], "lineage": lineage,
                 "train_rows": manifest["counts"]["splits"].get("train", 0)}
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.threads}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage), callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=score[0],
                                                         checkpoint_score_order=score[1]),
            failure_config=ray.train.FailureConfig(max_failures=1)),
    )
    if not (progress or mlflow) or storage_is_remote(storage):
        return trainer.fit()
    sinks = []
    if mlflow:
        from crystalae.tracking import MlflowRun

        sinks.append(MlflowRun(mlflow, Path(storage) / name, {k: v for k, v in loop_config.items() if k != "data"}))
    with EpochLines(Path(storage) / name, cfg.epochs, sinks=sinks):
        result = trainer.fit()
    for sink in sinks:
        sink.close(failed=result.error is not None)
    return result


def _check_resume(run_dir: Path | None, model_cfg: ModelConfig, voxel: VoxelConfig) -> None:
    """Refuse to resume a run whose checkpoints were made with another model or voxel config."""
    if run_dir is None or not run_dir.exists():
        return
    for file in sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))[-1:]:
        payload = read_checkpoint(file)
        # read back through the config classes: a field added since the run started takes its default
        for label, saved, wanted in (("model", ModelConfig.from_dict(payload["model_config"]).as_dict(), model_cfg.as_dict()),
                                     ("voxel", VoxelConfig.from_dict(payload["voxel_config"]).as_dict(), voxel.as_dict())):
            diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            if diff:
                raise CheckpointError(f"run {run_dir} holds checkpoints of another {label} config "
                                      f"(saved vs requested: {diff}); use another --name")


def best_checkpoint_path(result, metric: str = SCORE[0], mode: str = SCORE[1]) -> str | None:
    """The best of a training run's kept checkpoints on `metric`, by the one rule for "best"
    (`crystalae.config.Objective.best`: numbers only, NaN never counts; of equal values the earliest epoch,
    the first to reach it), as the sweep reader ranks a trial's checkpoints.

    Returns:
        The checkpoint folder's path; the newest checkpoint's when none has a value of `metric`; None when
        the run kept no checkpoint.
    """
    kept = sorted(result.best_checkpoints or [], key=lambda pair: pair[1].get("epoch", math.inf))
    best = Objective(metric, mode).best(kept, lambda pair: pair[1].get(metric))
    if best is None:
        return result.checkpoint.path if result.checkpoint else None
    return best[0].path
