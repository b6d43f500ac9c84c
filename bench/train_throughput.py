"""Ray Train loop vs a plain single-process torch loop: same model, same data, same threads, one run.

    python bench/train_throughput.py --source ../shared/datasets/perov_5/val.csv --grid 16 --threads 2

Both run `crystalae.training.run_epoch` with the same augmentation (element substitution, shifts);
the Ray side is `crystalae.training.train`: one TorchTrainer worker reading its share of the Parquet
shards (`WorkerShare`, shuffled every epoch). Samples/s are taken from epochs after the first (warm-up), and the
overhead is 1 - ray / plain.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import report  # noqa: E402  (bench/report.py)

from crystalae.augment import augment
from crystalae.checkpoint import read_checkpoint  # noqa: E402
from crystalae.config import VoxelConfig  # noqa: E402
from crystalae.dataset import read_table, table_batches
from crystalae.models import CrystalAE
from crystalae.reconstruct import class_lookup, density_scale
from crystalae.shards import PrepareOptions, prepare_dataset
from crystalae.training import TrainConfig, build_configs, run_epoch, train  # noqa: E402

MODEL = {"depth": 3, "base_width": 16, "latent_dim": 128, "residual": False}  # the perov_5 reference model


def plain_rates(data: Path, cfg: TrainConfig) -> list[float]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    voxel, model_cfg = build_configs(data, MODEL)
    model = CrystalAE(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    table = read_table(data, split="train", columns=["density", "labels", "lattice", "sites"])
    rng = np.random.default_rng(cfg.seed)
    rates = []
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        terms = run_epoch(model, table_batches(table, cfg.batch_size), cfg, density_scale(voxel),
                          class_lookup(model_cfg.species), torch.device("cpu"), optimizer,
                          lambda batch: augment(batch, cfg, voxel, model_cfg.species, rng))
        rates.append(terms["samples"] / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/perov_5/val.csv"))
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_dataset(args.source, data, VoxelConfig(grid=args.grid), PrepareOptions(val_fraction=0.05, test_fraction=0.0))
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, workers=1, threads=args.threads,
                          eval_limit=0)
        plain = plain_rates(data, cfg)
        started = time.perf_counter()
        train(data, cfg, MODEL, storage=Path(tmp) / "runs", name="bench")
        ray_wall = time.perf_counter() - started
        newest = sorted(p for p in (Path(tmp) / "runs" / "bench").glob("checkpoint_*") if p.is_dir())[-1]
        history = read_checkpoint(newest)["history"]
        ray_rates = [h["train_samples"] / h["epoch_seconds"] for h in history]

    plain_rate = sum(plain[1:]) / len(plain[1:])
    ray_rate = sum(ray_rates[1:]) / len(ray_rates[1:])
    figures = {"source": Path(args.source).name if "/" in args.source else args.source, "grid": args.grid,
               "threads": args.threads, "epochs": args.epochs,
               "train_samples_per_epoch": history[-1]["train_samples"],
               "plain_samples_per_s": round(plain_rate, 2), "ray_train_samples_per_s": round(ray_rate, 2),
               "ray_overhead": round(1 - ray_rate / plain_rate, 4),
               "ray_wall_seconds_incl_startup": round(ray_wall, 1)}
    report(figures, args.out)


if __name__ == "__main__":
    main()
