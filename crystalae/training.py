"""Training: losses, one epoch, validation metrics, and the Ray Train (TorchTrainer) driver.

    crystalae train --data runs/demo/data --workers 2 --epochs 10

The same `run_epoch` serves the Ray worker loop and the plain single-process loop of
`bench/train_throughput.py`, so the two are compared on identical work.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from crystalae.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from crystalae.config import StrictConfig, VoxelConfig
from crystalae.inference import (class_lookup, decode_latents, density_scale, lattice_targets,
                                 model_config_for, structures_from_outputs)
from crystalae.metrics import compare, summarize
from crystalae.models import PAPER_PRESET, CrystalAE, ModelConfig


@dataclass(frozen=True)
class TrainConfig(StrictConfig):
    """Optimisation and loss weights; model architecture lives in ModelConfig."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    beta: float = 1e-3  # KL weight (KL is averaged over latent dims, reconstruction over voxels)
    seg_weight: float = 1.0  # lambda: species cross-entropy on the reconstructed density
    lattice_weight: float = 1.0
    background_weight: float = 0.1  # class weight of empty voxels in the cross-entropy
    workers: int = 1  # Ray Train workers (data parallel)
    use_gpu: bool = False
    amp: bool = True  # mixed precision (bf16) when on GPU; ignored on CPU
    threads: int = 1  # torch threads per worker (Ray sets OMP threads to 1)
    seed: int = 0
    keep_checkpoints: int = 2  # best k by validation loss
    eval_limit: int = 64  # validation crystals decoded end to end per epoch (StructureMatcher is slow)
    # Keep the decoded training shards in Ray's object store after the first read: without it every
    # epoch re-runs the Parquet read and tensor conversion. Turn off when the set exceeds memory.
    cache_dataset: bool = True


def loss_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               scale: float, lut: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reconstruction MSE + beta * KL + lambda * CE(segmenter(recon)) + lattice MSE."""
    x = batch["density"].unsqueeze(1).float() * scale  # (B, 1, N, N, N)
    target = lut.to(x.device)[batch["labels"].long()]  # (B, N, N, N) class indices
    out = model(x)
    recon = F.mse_loss(out["recon"].float(), x)
    kl = -0.5 * torch.mean(1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp())
    n_classes = out["species_logits"].shape[1]
    weights = torch.ones(n_classes, device=x.device)
    weights[0] = cfg.background_weight
    seg = F.cross_entropy(out["species_logits"].float(), target, weight=weights)
    terms = {"recon": recon, "kl": kl, "seg": seg}
    total = recon + cfg.beta * kl + cfg.seg_weight * seg
    if "lattice" in out:
        terms["lattice"] = F.mse_loss(out["lattice"].float(), lattice_targets(batch["lattice"]).to(x.device))
        total = total + cfg.lattice_weight * terms["lattice"]
    terms["loss"] = total
    return terms


def run_epoch(model, batches: Iterable[dict], cfg: TrainConfig, scale: float, lut: torch.Tensor,
              device: torch.device, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """One pass; trains when given an optimizer. Returns sample-weighted mean of each loss term."""
    model.train(optimizer is not None)
    use_amp = cfg.amp and device.type == "cuda"
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.set_grad_enabled(optimizer is not None), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            terms = loss_terms(model, batch, cfg, scale, lut)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
        n = len(batch["density"])
        count += n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
    return {k: v / max(count, 1) for k, v in sums.items()} | {"samples": count}


def table_batches(table, batch_size: int, columns=("density", "labels", "lattice")):
    """Torch batches from an Arrow table (the plain, non-Ray data path)."""
    arrays = {c: _column_numpy(table, c) for c in columns}
    for start in range(0, table.num_rows, batch_size):
        yield {c: torch.from_numpy(a[start : start + batch_size]) for c, a in arrays.items()}


def _column_numpy(table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if name in ("density", "labels"):
        return column.to_numpy_ndarray()
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float64)


@torch.no_grad()
def evaluate(model: CrystalAE, table, voxel: VoxelConfig, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Validation metrics: density MSE, voxel species accuracy on occupied voxels, per-element
    confusion, and end to end (encode -> decode -> segment -> atoms) match rate, RMS, atom counts."""
    from pymatgen.core import Structure

    model.eval()
    scale, species = density_scale(voxel), (0,) + tuple(model.config.species)
    lut = class_lookup(model.config.species)
    n_classes = len(species)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    mse_sum, rows, records = 0.0, 0, []
    limit = min(table.num_rows, cfg.eval_limit)
    for start in range(0, table.num_rows, cfg.batch_size):
        part = table.slice(start, cfg.batch_size)
        batch = next(table_batches(part, cfg.batch_size))
        x = batch["density"].unsqueeze(1).to(device) * scale
        mu, _ = model.vae.encode(x)
        recon = model.vae.decode(mu)
        mse_sum += float(F.mse_loss(recon, x, reduction="sum")) / x[0].numel()
        rows += len(x)
        pred = model.segmenter(recon).argmax(1).cpu().numpy()
        true = lut[batch["labels"].long()].numpy()
        occupied = true > 0
        np.add.at(confusion, (true[occupied], pred[occupied]), 1)
        if start < limit:
            take = min(len(x), limit - start)
            outputs = decode_latents(model, voxel, mu[:take])
            lattices = None if model.vae.lattice is not None else batch["lattice"][:take].numpy()
            origins = None if lattices is None else _column_numpy(part, "origin")[:take]
            predicted = structures_from_outputs(voxel, outputs, lattices, origins)
            for i, p in enumerate(predicted):
                records.append(compare(p, Structure.from_str(part.column("cif")[i].as_py(), fmt="cif")))
    occupied_total = confusion.sum()
    per_element = {int(species[k]): float(confusion[k, k] / confusion[k].sum())
                   for k in range(1, n_classes) if confusion[k].sum() > 0}
    summary = summarize(records)
    return {
        "density_mse": mse_sum / max(rows, 1),
        "species_accuracy": float(np.trace(confusion) / occupied_total) if occupied_total else None,
        "atom_count_rate": summary["atom_count_accuracy"],
        "match_rate": summary["match_rate"],
        "rms": summary["mean_rms"],
        "per_element_accuracy": per_element,
        "confusion": confusion.tolist(),
        "confusion_species": list(species),
    }


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: data-parallel epochs over the `train` shard, rank 0 validates and checkpoints."""
    import ray.train
    import ray.train.torch
    import ray.util

    from crystalae.shards import read_table

    cfg = TrainConfig.from_dict(loop_config["train"])
    voxel = VoxelConfig.from_dict(loop_config["voxel"])
    model_cfg = ModelConfig.from_dict(loop_config["model"])
    torch.set_num_threads(cfg.threads)  # Ray sets OMP_NUM_THREADS=1 in workers
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    model = CrystalAE(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            payload = read_checkpoint(folder)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        start_epoch = payload["epoch"] + 1
        history = list(payload.get("history") or [])
        if start_epoch >= cfg.epochs:
            # Finished before a restart (e.g. a resumed sweep): report the final metrics again so
            # the caller (Tune) sees its objective, and train no further.
            ray.train.report(_scalars(payload["metrics"]))
            return
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    rank = ray.train.get_context().get_world_rank()
    val_table = read_table(loop_config["data"], split="val") if rank == 0 else None
    scale, lut = density_scale(voxel), class_lookup(model_cfg.species)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        batches = shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=False)
        train_terms = run_epoch(model, batches, cfg, scale, lut, device, optimizer)
        metrics: dict[str, Any] = {"epoch": epoch, "epoch_seconds": time.perf_counter() - started,
                                   "node_ip": ray.util.get_node_ip_address()}
        metrics.update({f"train_{k}": v for k, v in train_terms.items()})
        if rank != 0:
            ray.train.report(metrics)
            continue
        if val_table is not None and val_table.num_rows:
            val_terms = run_epoch(core, table_batches(val_table, cfg.batch_size), cfg, scale, lut, device)
            metrics.update({f"val_{k}": v for k, v in val_terms.items() if k != "samples"})
            metrics.update({f"val_{k}": v for k, v in evaluate(core, val_table, voxel, cfg, device).items()})
        else:
            metrics["val_loss"] = metrics["train_loss"]
        history.append(_scalars(metrics))
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(folder, core, voxel, epoch=epoch, metrics=metrics, train_config=cfg.as_dict(),
                            dataset_hash=loop_config["dataset_hash"], optimizer=optimizer, history=history)
            ray.train.report(_scalars(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder))


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray results keep numbers; the confusion matrix etc. stay in the checkpoint's metrics."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, str)) or v is None:
            out[k] = float("nan") if v is None else v
    return out


def dataset_species(data: str | Path) -> tuple[int, ...]:
    """Sorted atomic numbers present anywhere in a prepared dataset (the segmenter's classes)."""
    from pymatgen.core import Composition

    from crystalae.shards import read_table

    formulas = set(read_table(data, columns=["composition"]).column("composition").to_pylist())
    return tuple(sorted({el.Z for f in formulas for el in Composition(f).elements}))


def build_configs(data: str | Path, model_overrides: dict[str, Any], preset: str | None = None
                  ) -> tuple[VoxelConfig, ModelConfig]:
    from crystalae.shards import config_of

    voxel = config_of(data)
    overrides = {**(PAPER_PRESET if preset == "paper" else {}), **model_overrides}
    return voxel, model_config_for(voxel, dataset_species(data), **overrides)


def train(data: str | Path, cfg: TrainConfig = TrainConfig(), model_overrides: dict[str, Any] | None = None,
          storage: str | Path = "runs/train", name: str = "crystalae", preset: str | None = None,
          callbacks: list | None = None, score: tuple[str, str] = ("val_loss", "min")):
    """Train with Ray Train's TorchTrainer; rerunning the same storage/name resumes from the latest
    checkpoint. `score` (metric, mode) ranks the kept checkpoints. Returns the Ray `Result` (its
    `checkpoint` is the newest, `best_checkpoints` ranked)."""
    import ray
    import ray.train
    from ray.data.expressions import col
    from ray.train.torch import TorchTrainer

    from crystalae.shards import read_manifest, shard_paths

    manifest = read_manifest(data)
    voxel, model_cfg = build_configs(data, model_overrides or {}, preset)
    storage = Path(storage).resolve() if "://" not in str(storage) else storage
    _check_resume(Path(storage) / name if "://" not in str(storage) else None, model_cfg, voxel)
    if not ray.is_initialized():
        # Logical CPUs must cover the driver, every worker and Ray Data's tasks, or startup hangs.
        ray.init(num_cpus=max(4, cfg.workers * cfg.threads + 2), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    train_ds = (ray.data.read_parquet([str(p) for p in shard_paths(data)], columns=["density", "labels", "lattice", "split"])
                .filter(expr=col("split") == "train").select_columns(["density", "labels", "lattice"]))
    if cfg.cache_dataset:
        train_ds = train_ds.materialize()
    loop_config = {"train": cfg.as_dict(), "voxel": voxel.as_dict(), "model": model_cfg.as_dict(),
                   "data": str(Path(data).resolve()), "dataset_hash": manifest["dataset_hash"]}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets={"train": train_ds},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.threads}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage), callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=score[0],
                                                         checkpoint_score_order=score[1]),
            failure_config=ray.train.FailureConfig(max_failures=1)),
    )
    return trainer.fit()


def _check_resume(run_dir: Path | None, model_cfg: ModelConfig, voxel: VoxelConfig) -> None:
    """Refuse to resume a run whose checkpoints were made with another model or voxel config."""
    if run_dir is None or not run_dir.exists():
        return
    for file in sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))[-1:]:
        payload = read_checkpoint(file)
        for label, saved, wanted in (("model", payload["model_config"], model_cfg.as_dict()),
                                     ("voxel", payload["voxel_config"], voxel.as_dict())):
            diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            if diff:
                raise CheckpointError(f"run {run_dir} holds checkpoints of another {label} config "
                                      f"(saved vs requested: {diff}); use another --name")


def best_checkpoint_path(result, metric: str = "val_loss", mode: str = "min") -> str | None:
    ranked = [(m.get(metric), c) for c, m in (result.best_checkpoints or []) if m.get(metric) is not None
              and not (isinstance(m.get(metric), float) and math.isnan(m.get(metric)))]
    if not ranked:
        return result.checkpoint.path if result.checkpoint else None
    ranked.sort(key=lambda t: t[0], reverse=(mode == "max"))
    return ranked[0][1].path


