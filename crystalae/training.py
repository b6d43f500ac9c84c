"""Training: losses, one epoch, validation metrics, and the Ray Train (TorchTrainer) driver.

    crystalae train --data runs/demo/data --workers 2 --epochs 10

The same `run_epoch` serves the Ray worker loop and the plain single-process loop of
`bench/train_throughput.py`, so the two are compared on identical work.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from crystalae.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from crystalae.config import StrictConfig, VoxelConfig, in_range, set_by
from crystalae.inference import (
    class_lookup,
    decode_latents,
    density_scale,
    lattice_targets,
    model_config_for,
    structures_from_outputs,
)
from crystalae.metrics import compare, reconstruction_score, site_confusion, summarize
from crystalae.models import PAPER_PRESET, CrystalAE, ModelConfig
from crystalae.shards import column_numpy, shard_paths
from crystalae.storage import is_remote as storage_is_remote
from crystalae.voxelize import voxelize_arrays

SCORE = ("val_score", "max")  # the default objective: comparable across sigma, grid and architecture
BATCH_COLUMNS = ("density", "labels", "lattice", "sites")
# Metrics every epoch reports (a sweep objective must be one of them); lattice terms need the cell grid.
REPORTED_METRICS = (
    "val_score", "val_recovery", "val_match_rate", "val_rms", "val_species_accuracy", "val_atom_count_rate",
    "val_density_mse", *(f"{split}_{term}" for split in ("val", "train") for term in ("loss", "recon", "kl", "seg", "lattice")),
    "epoch_seconds", "eval_seconds", "parameters",
)


@dataclass(frozen=True)
class TrainConfig(StrictConfig):
    """Optimisation and loss weights; model architecture lives in ModelConfig."""

    epochs: int = set_by(20, "sweep budget")  # (in a sweep; `crystalae train` takes it directly)
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    beta: float = 1e-3  # KL weight (KL is averaged over latent dims, reconstruction over voxels)
    seg_weight: float = 1.0  # lambda: species cross-entropy (segmenter voxels or site-head atoms)
    lattice_weight: float = 1.0
    count_weight: float = 1.0  # cross-entropy of the atom-count head (models with count_head)
    # Divide the reconstruction MSE by the batch's mean squared density, so its weight against the KL,
    # species and lattice terms does not depend on the elements (carbon peaks are ~10x lower than Pb's).
    recon_normalize: bool = True
    background_weight: float = 0.1  # class weight of empty voxels in the cross-entropy
    workers: int = set_by(1, "sweep resources")  # Ray Train workers (data parallel)
    use_gpu: bool = set_by(False, "sweep resources")
    amp: bool = True  # mixed precision (bf16) when on GPU; ignored on CPU
    # torch threads (= CPUs Ray reserves) per worker; 0: the machine's cores / workers
    threads: int = set_by(0, "sweep resources")
    seed: int = 0
    keep_checkpoints: int = 2  # best k by the score metric
    eval_limit: int = 64  # validation crystals decoded end to end per epoch (StructureMatcher is slow)
    # learning rate: "cosine" (linear warm-up, cosine decay to min_lr) or "constant"
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.5
    min_lr: float = 1e-5
    # Augmentation of training batches (cell grids): a random whole-voxel periodic shift, which is
    # exact, and, with probability `substitute`, each element replaced by a dataset element sharing an
    # oxidation state, re-voxelized, so species are read from peak heights, not recalled from combinations.
    shift: bool = True
    substitute: float = 0.5
    negatives: int = 8  # random empty positions per crystal that teach the site head "no atom here"
    # Site-head targets spread over elements of nearby Z (Gaussian, this many Z units; 0 = one-hot), so
    # rare elements learn from their neighbours; plus a Z regression term of this weight.
    species_smoothing: float = 1.5
    z_weight: float = 1.0
    # Keep each worker's decoded share of the training shards in memory after the first epoch: without
    # it every epoch re-reads the Parquet files (one at a time). Turn off when a share exceeds memory.
    cache_dataset: bool = True

    def problems(self) -> list[str | None]:
        positive = {"epochs": 100_000, "batch_size": 4096, "workers": 1024, "keep_checkpoints": 1000}
        non_negative = {"weight_decay": 1.0, "beta": None, "seg_weight": None, "lattice_weight": None,
                        "count_weight": None, "background_weight": None, "threads": 1024, "seed": None,
                        "eval_limit": 100_000, "warmup_epochs": None, "min_lr": None, "negatives": 1024,
                        "species_smoothing": 100.0, "z_weight": None}
        return [
            *(in_range(self, k, 1, high) for k, high in positive.items()),
            *(in_range(self, k, 0, high) for k, high in non_negative.items()),
            in_range(self, "lr", 0, 10, low_open=True),
            in_range(self, "substitute", 0, 1),
        ]

    def resolved(self) -> TrainConfig:
        """`threads` 0 made concrete: this machine's cores shared among the workers."""
        if self.threads:
            return self
        return replace(self, threads=max(1, (os.cpu_count() or 1) // self.workers))


TRAIN_SPEC_SECTIONS = ("train", "model", "preset")


def read_train_spec(path: str | Path | None) -> dict[str, Any]:
    """A `crystalae train --config` YAML: optional sections `train` (TrainConfig fields), `model`
    (ModelConfig overrides) and `preset`; unknown sections are an error naming the file."""
    if path is None:
        return {}
    from crystalae.files import read_yaml_mapping

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


@lru_cache(maxsize=8)
def substitutes(species: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """For each element, the dataset elements sharing a common oxidation state (itself included)."""
    from pymatgen.core import Element

    states = {z: set(Element.from_Z(z).common_oxidation_states) for z in species}
    return {z: tuple(w for w in species if w == z or states[z] & states[w]) for z in species}


def augment(batch: dict[str, torch.Tensor], cfg: TrainConfig, voxel: VoxelConfig, species: tuple[int, ...],
            rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Element substitution (re-voxelized) and exact periodic shifts of a training batch (cell grids)."""
    if voxel.representation != "cell" or "sites" not in batch:
        return batch
    batch = dict(batch)
    sites = batch["sites"].clone()
    choices = substitutes(species)
    if cfg.substitute > 0 and any(len(c) > 1 for c in choices.values()):
        density, labels = batch["density"].clone(), batch["labels"].clone()
        for i in np.nonzero(rng.random(len(sites)) < cfg.substitute)[0]:
            z = sites[i, :, 3].numpy().astype(int)
            n = int((z > 0).sum())
            mapping = {e: int(rng.choice(choices.get(e, (e,)))) for e in set(z[:n].tolist())}
            new_z = np.array([mapping[e] for e in z[:n]])
            grid = voxelize_arrays(batch["lattice"][i].numpy().reshape(3, 3), sites[i, :n, :3].double().numpy(),
                                   new_z, voxel)
            density[i], labels[i] = torch.from_numpy(grid.values), torch.from_numpy(grid.labels)
            sites[i, :n, 3] = torch.from_numpy(new_z).float()
        batch["density"], batch["labels"] = density, labels
    if cfg.shift:
        n = voxel.grid
        density, labels = batch["density"].clone(), batch["labels"].clone()
        for i, s in enumerate(rng.integers(0, n, size=(len(sites), 3))):
            shift = tuple(int(v) for v in s)
            density[i] = torch.roll(density[i], shift, dims=(0, 1, 2))
            labels[i] = torch.roll(labels[i], shift, dims=(0, 1, 2))
            sites[i, :, :3] = torch.remainder(sites[i, :, :3] + torch.tensor(s, dtype=sites.dtype) / n, 1.0)
        batch["density"], batch["labels"] = density, labels
    batch["sites"] = sites
    return batch


def site_targets(sites: torch.Tensor, lattice: torch.Tensor, lut: torch.Tensor, negatives: int,
                 generator: torch.Generator | None = None, min_distance: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions (B, A + negatives, 3) and their classes: each atom's species, and random
    positions at least `min_distance` Å from every atom as class 0 (others ignored, -100)."""
    frac, z = sites[..., :3].float(), sites[..., 3].long()
    classes = torch.where(z > 0, lut.to(z.device)[z], torch.full_like(z, -100))
    if negatives == 0:
        return frac, classes
    rand = torch.rand(len(frac), negatives, 3, generator=generator).to(frac.device)
    d = rand[:, :, None, :] - frac[:, None, :, :]
    d = d - torch.round(d)
    cart = torch.einsum("bnak,bkj->bnaj", d, lattice.reshape(-1, 3, 3).float().to(frac.device))
    dist = cart.norm(dim=-1).masked_fill((z == 0)[:, None, :], float("inf")).min(dim=2).values
    empty = torch.where(dist > min_distance, 0, -100)
    return torch.cat([frac, rand], dim=1), torch.cat([classes, empty], dim=1)


def loss_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               scale: float, lut: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reconstruction MSE + beta * KL + lambda * species CE + lattice MSE. The species CE is the
    segmenter's per voxel (on the reconstruction) or the site head's per atom (teacher-forced at the
    true positions, plus empty positions); species read from peak weights add no term."""
    x = batch["density"].unsqueeze(1).float() * scale  # (B, 1, N, N, N)
    queries = None
    if model_config(model).species_from == "site":
        queries, site_classes = site_targets(batch["sites"], batch["lattice"], lut, cfg.negatives)
    out = model(x, queries)
    recon = F.mse_loss(out["recon"].float(), x)
    if cfg.recon_normalize:
        recon = recon / x.pow(2).mean().clamp(min=1e-8)
    kl = -0.5 * torch.mean(1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp())
    terms = {"recon": recon, "kl": kl}
    if "species_logits" in out:
        target = lut.to(x.device)[batch["labels"].long()]  # (B, N, N, N) class indices
        weights = torch.ones(out["species_logits"].shape[1], device=x.device)
        weights[0] = cfg.background_weight
        terms["seg"] = F.cross_entropy(out["species_logits"].float(), target, weight=weights)
    if "site_logits" in out:
        terms["seg"] = site_loss(out["site_logits"].float(), out["site_z"].float(), site_classes,
                                 model_config(model).species, cfg)
    total = recon + cfg.beta * kl + cfg.seg_weight * terms.get("seg", torch.zeros((), device=x.device))
    if "lattice" in out:
        terms["lattice"] = F.mse_loss(out["lattice"].float(), lattice_targets(batch["lattice"]).to(x.device))
        total = total + cfg.lattice_weight * terms["lattice"]
    if "count_logits" in out:
        counts = (batch["sites"][..., 3] > 0).sum(1).to(x.device)
        terms["count"] = F.cross_entropy(out["count_logits"].float(), (counts - 1).clamp(min=0))
        total = total + cfg.count_weight * terms["count"]
    terms["loss"] = total
    return terms


def model_config(model: torch.nn.Module) -> ModelConfig:
    """The ModelConfig of a model, also through a DistributedDataParallel wrapper."""
    return (model.module if hasattr(model, "module") else model).config


def site_loss(logits: torch.Tensor, z_estimate: torch.Tensor, classes: torch.Tensor, species: tuple[int, ...],
              cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy against Z-smoothed targets (empty positions stay one-hot) + z_weight * MSE(Z / 10)."""
    valid = classes != -100
    target_class = classes.clamp(min=0)
    z_of = torch.tensor((0.0,) + tuple(float(z) for z in species), device=logits.device)
    if cfg.species_smoothing > 0:
        z_true = z_of[target_class]
        soft = torch.exp(-0.5 * ((z_of - z_true[..., None]) / cfg.species_smoothing) ** 2)
        soft[..., 0] = 0.0
        soft = torch.where((target_class == 0)[..., None], F.one_hot(target_class, logits.shape[-1]).float(), soft)
        soft = soft / soft.sum(-1, keepdim=True)
    else:
        soft = F.one_hot(target_class, logits.shape[-1]).float()
    loss = -(soft * F.log_softmax(logits, dim=-1)).sum(-1)[valid].mean()
    atoms = target_class > 0
    if cfg.z_weight > 0 and atoms.any():
        loss = loss + cfg.z_weight * ((z_estimate - z_of[target_class] / 10.0) ** 2)[atoms].mean()
    return loss


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
            optimizer.step()
        n = len(batch["density"])
        count += n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
    return {k: v / max(count, 1) for k, v in sums.items()} | {"samples": count}


def prefetched(batches: Iterable[dict], prepare: Callable[[dict], dict] | None = None, background: bool = False,
               depth: int = 2) -> Iterator[dict]:
    """`batches` passed through `prepare` (augmentation). With `background` (on a GPU) a thread reads,
    augments and pins the next `depth` batches while the GPU computes, so the copies can overlap;
    on the CPU the work would only compete with the model for the same cores, so it stays in line."""
    if not background:
        for batch in batches:
            yield prepare(batch) if prepare is not None else batch
        return
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    pin = torch.cuda.is_available()

    def offer(item) -> bool:
        """Queue `item` unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                batch = prepare(batch) if prepare is not None else batch
                if not offer({k: v.pin_memory() for k, v in batch.items()} if pin else batch):
                    return
            offer(None)
        except BaseException as exc:  # raised again in the consumer, where the training loop sees it
            offer(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early (error or break): let the producer end


class WorkerShare:
    """One data-parallel worker's share of the train split, read straight from the Parquet shards.

    Row i of the split (in shard order) belongs to worker i % world, and every worker keeps the same
    number of rows, so all of them take the same number of steps (DDP all-reduces every step). Each
    epoch visits the shard files in a seeded order and shuffles rows within them; batches carry over
    file boundaries, so only the epoch's last batch is short. Only the worker's own rows are decoded,
    one file at a time (all of them kept in memory when `keep` is set).
    """

    def __init__(self, data: str | Path, rank: int, world: int, batch_size: int, keep: bool, seed: int = 0):
        self.files, self.rank, self.world = shard_paths(data), rank, world
        self.batch_size, self.keep, self.seed = batch_size, keep, seed
        splits = [pq.read_table(f, columns=["split"]).column("split").to_numpy(zero_copy_only=False) for f in self.files]
        self.train_rows = [np.flatnonzero(s == "train") for s in splits]
        self.rows = sum(len(r) for r in self.train_rows) // world
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def _file_arrays(self, k: int, start: int) -> dict[str, np.ndarray]:
        """This worker's rows of shard file k, whose first train row has split index `start`."""
        if k in self._cache:
            return self._cache[k]
        mine = self.train_rows[k][(start + np.arange(len(self.train_rows[k]))) % self.world == self.rank]
        if not len(mine):
            return {}
        table = pq.read_table(self.files[k], columns=list(BATCH_COLUMNS)).take(mine)
        arrays = {c: column_numpy(table, c) for c in BATCH_COLUMNS if c in table.column_names}
        if self.keep:
            self._cache[k] = arrays
        return arrays

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        starts = np.concatenate([[0], np.cumsum([len(r) for r in self.train_rows])])
        left, pending = self.rows, None  # pending: fewer than batch_size rows carried to the next file
        for k in rng.permutation(len(self.files)):
            arrays = self._file_arrays(int(k), int(starts[k]))
            if not arrays or not left:
                continue
            rows = len(arrays["density"])
            order = rng.permutation(rows)[:min(left, rows)]
            left -= len(order)
            arrays = {c: a[order] for c, a in arrays.items()}
            if pending is not None:
                arrays = {c: np.concatenate([pending[c], a]) for c, a in arrays.items()}
            full = len(arrays["density"]) // self.batch_size * self.batch_size
            for begin in range(0, full, self.batch_size):
                yield {c: torch.from_numpy(a[begin:begin + self.batch_size]) for c, a in arrays.items()}
            pending = {c: a[full:] for c, a in arrays.items()}
        if pending is not None and len(pending["density"]):
            yield {c: torch.from_numpy(a) for c, a in pending.items()}


def table_batches(table, batch_size: int, columns=BATCH_COLUMNS):
    """Torch batches from an Arrow table (the plain, non-Ray data path)."""
    if table.num_rows == 0:  # e.g. eval_limit 0: nothing to stack
        return
    arrays = {c: column_numpy(table, c) for c in columns if c in table.column_names}
    for start in range(0, table.num_rows, batch_size):
        yield {c: torch.from_numpy(a[start : start + batch_size]) for c, a in arrays.items()}


@torch.no_grad()
def evaluate(model: CrystalAE, table, voxel: VoxelConfig, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """End to end on the first `eval_limit` crystals (encode -> decode -> atoms -> species): match
    rate, RMS, atom-count rate, per-atom species accuracy and confusion, density MSE, and the score."""
    from pymatgen.core import Structure

    model.eval()
    scale, species = density_scale(voxel), (0,) + tuple(model.config.species)
    confusion = np.zeros((len(species), len(species)), dtype=np.int64)
    mse_sum, records = 0.0, []
    table = table.slice(0, min(table.num_rows, cfg.eval_limit))
    for batch_index, batch in enumerate(table_batches(table, cfg.batch_size)):
        part = table.slice(batch_index * cfg.batch_size, cfg.batch_size)
        x = batch["density"].unsqueeze(1).to(device) * scale
        mu, _ = model.vae.encode(x)
        outputs = decode_latents(model, voxel, mu)
        recon = torch.from_numpy(outputs["density"]).to(x.device)[:, None] * scale
        mse_sum += float(F.mse_loss(recon, x, reduction="sum")) / x[0].numel()
        lattices = None if model.vae.lattice is not None else batch["lattice"].numpy()
        origins = None if lattices is None else column_numpy(part, "origin")
        for i, p in enumerate(structures_from_outputs(model, voxel, outputs, lattices, origins)):
            true = Structure.from_str(part.column("cif")[i].as_py(), fmt="cif")
            records.append(compare(p, true))
            confusion += site_confusion(p, true, tuple(model.config.species))
    atoms = confusion.sum()
    per_element = {int(species[k]): float(confusion[k, k] / confusion[k].sum())
                   for k in range(1, len(species)) if confusion[k].sum() > 0}
    summary = summarize(records)
    species_accuracy = float(np.trace(confusion) / atoms) if atoms else None
    return {
        "density_mse": mse_sum / max(table.num_rows, 1),
        "species_accuracy": species_accuracy,
        "atom_count_rate": summary["atom_count_accuracy"],
        "match_rate": summary["match_rate"],
        "rms": summary["mean_rms"],
        "recovery": summary["mean_recovery"],
        "valid_match_rate": summary["valid_match_rate"],  # CDVAE's protocol (None without SMACT)
        "score": reconstruction_score(summary["match_rate"], species_accuracy, summary["atom_count_accuracy"]),
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
            ray.train.report({**_scalars(payload["metrics"]), "epochs_done": start_epoch})
            return
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    rank = ray.train.get_context().get_world_rank()
    val_table = read_table(loop_config["data"], split="val") if rank == 0 else None
    scale, lut = density_scale(voxel), class_lookup(model_cfg.species)
    share = WorkerShare(loop_config["data"], rank, ray.train.get_context().get_world_size(), cfg.batch_size,
                        keep=cfg.cache_dataset, seed=cfg.seed)
    steps_per_epoch = max(1, math.ceil(share.rows / cfg.batch_size))
    rng = np.random.default_rng([cfg.seed, rank, start_epoch])

    def prepare(batch: dict) -> dict:
        return augment(batch, cfg, voxel, model_cfg.species, rng)

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()

        def schedule(step: int, epoch: int = epoch) -> None:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, epoch + step / steps_per_epoch)

        train_terms = run_epoch(model, share.batches(epoch), cfg, scale, lut, device, optimizer, prepare, schedule)
        # epochs_done counts from the run's start, not the process's: a resumed trial's Tune
        # training_iteration restarts at 1, so schedulers and the console count this instead.
        metrics: dict[str, Any] = {"epoch": epoch, "epochs_done": epoch + 1, "epoch_seconds": time.perf_counter() - started,
                                   "lr": optimizer.param_groups[0]["lr"], "node_ip": ray.util.get_node_ip_address()}
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
            metrics["val_score"] = metrics["val_recovery"] = 0.0
        metrics["eval_seconds"] = time.perf_counter() - started - metrics["epoch_seconds"]
        metrics["parameters"] = sum(p.numel() for p in core.parameters())  # a size objective for sweeps
        metrics["finished_at"] = time.time()  # wall clock: orders epochs of concurrent trials (sweep budgets)
        history.append(_scalars(metrics))
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(folder, core, voxel, epoch=epoch, metrics=metrics, train_config=cfg.as_dict(),
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
          callbacks: list | None = None, score: tuple[str, str] = SCORE, lineage: dict[str, Any] | None = None,
          progress: bool = False, mlflow: str | None = None):
    """Train with Ray Train's TorchTrainer; rerunning the same storage/name resumes from the latest
    checkpoint. `score` (metric, mode) ranks the kept checkpoints; `lineage` (where this configuration
    came from, e.g. a sweep trial) is recorded in every checkpoint with the dataset hash. `progress`
    logs a line per epoch, and `mlflow` (a tracking URI) logs the run there (local storage). Returns the
    Ray `Result` (its `checkpoint` is the newest, `best_checkpoints` ranked)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from crystalae.shards import read_manifest

    manifest = read_manifest(data)
    cfg = cfg.resolved()
    voxel, model_cfg = build_configs(data, model_overrides or {}, preset)
    storage = storage if storage_is_remote(storage) else Path(storage).resolve()
    _check_resume(None if storage_is_remote(storage) else Path(storage) / name, model_cfg, voxel)
    if not ray.is_initialized():
        # Logical CPUs must cover the driver and every worker's threads.
        ray.init(num_cpus=max(4, cfg.workers * cfg.threads + 2), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    # Workers read their share of the shards themselves (WorkerShare): no Ray Data pipeline to start per run.
    loop_config = {"train": cfg.as_dict(), "voxel": voxel.as_dict(), "model": model_cfg.as_dict(),
                   "data": str(data) if storage_is_remote(data) else str(Path(data).resolve()),
                   "dataset_hash": manifest["dataset_hash"], "lineage": lineage,
                 "train_rows": manifest["counts"]["splits"].get("train", 0)}
    trainer = TorchTrainer(
        train_loop_per_worker,
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
    from crystalae.progress import EpochLines

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
        for label, saved, wanted in (("model", payload["model_config"], model_cfg.as_dict()),
                                     ("voxel", payload["voxel_config"], voxel.as_dict())):
            diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
            if diff:
                raise CheckpointError(f"run {run_dir} holds checkpoints of another {label} config "
                                      f"(saved vs requested: {diff}); use another --name")


def best_checkpoint_path(result, metric: str = SCORE[0], mode: str = SCORE[1]) -> str | None:
    ranked = [(m.get(metric), c) for c, m in (result.best_checkpoints or []) if m.get(metric) is not None
              and not (isinstance(m.get(metric), float) and math.isnan(m.get(metric)))]
    if not ranked:
        return result.checkpoint.path if result.checkpoint else None
    ranked.sort(key=lambda t: t[0], reverse=(mode == "max"))
    return ranked[0][1].path


