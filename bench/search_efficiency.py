"""Optuna TPE + ASHA vs random search (no early stopping), same trial budget, several seeds.

    python bench/search_efficiency.py [--trials 16] [--epochs 8] [--seeds 0 1 2]

The fixed small problem: the real crystalae VAE + segmenter on 96 demo crystals at 8^3, trained
in-process per trial (plain torch, one thread) and scored by validation loss after every epoch, run
through the real Ray Tune + OptunaSearch + ASHAScheduler stack (one trial at a time, so the order is
reproducible). Compute = epochs trained, summed over trials in the order they ran. For each seed we
report the epochs each method needed to first reach random search's best value, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from crystalae.config import VoxelConfig
from crystalae.inference import class_lookup, density_scale, model_config_for
from crystalae.models import CrystalAE
from crystalae.shards import PrepareOptions, config_of, prepare_dataset, read_table
from crystalae.training import TrainConfig, dataset_species, run_epoch, table_batches


def search_space() -> dict:
    from ray import tune

    return {"lr": tune.loguniform(1e-4, 3e-2), "latent_dim": tune.choice([2, 4, 8, 16]),
            "base_width": tune.choice([2, 4, 8]), "beta": tune.loguniform(1e-5, 1e-1),
            "seg_weight": tune.uniform(0.1, 3.0)}


def objective(config: dict, data: str, epochs: int) -> None:
    from ray import tune

    torch.set_num_threads(1)
    torch.manual_seed(0)
    voxel = config_of(data)
    model = CrystalAE(model_config_for(voxel, dataset_species(data), depth=1, latent_dim=config["latent_dim"],
                                       base_width=config["base_width"], max_width=16, seg_depth=1, seg_width=4,
                                       residual=False))
    cfg = TrainConfig(batch_size=16, lr=config["lr"], beta=config["beta"], seg_weight=config["seg_weight"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    train, val = read_table(data, split="train"), read_table(data, split="val")
    scale, lut = density_scale(voxel), class_lookup(model.config.species)
    for epoch in range(epochs):
        run_epoch(model, table_batches(train, cfg.batch_size), cfg, scale, lut, torch.device("cpu"), optimizer)
        val_terms = run_epoch(model, table_batches(val, cfg.batch_size), cfg, scale, lut, torch.device("cpu"))
        # a comparable objective across loss weights: reconstruction + segmentation at fixed weight 1
        tune.report({"score": val_terms["recon"] + val_terms["seg"], "epoch": epoch + 1})


def run(data: str, algorithm: str, seed: int, trials: int, epochs: int, storage: Path) -> list[tuple[int, float]]:
    """[(cumulative epochs, best score so far)] after every reported epoch, in run order."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4) if algorithm == "tpe" \
        else optuna.samplers.RandomSampler(seed=seed)
    scheduler = ASHAScheduler(max_t=epochs, grace_period=2, reduction_factor=2) if algorithm == "tpe" else FIFOScheduler()
    tuner = tune.Tuner(
        tune.with_parameters(objective, data=data, epochs=epochs),
        param_space=search_space(),
        tune_config=tune.TuneConfig(metric="score", mode="min", search_alg=OptunaSearch(sampler=sampler),
                                    scheduler=scheduler, num_samples=trials, max_concurrent_trials=1),
        run_config=tune.RunConfig(name=f"{algorithm}-{seed}", storage_path=str(storage), verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is not None:
            rows += [(float(t), float(s)) for t, s in zip(frame["timestamp"], frame["score"])]
    rows.sort()
    curve, best = [], float("inf")
    for k, (_, score) in enumerate(rows):
        best = min(best, score)
        curve.append((k + 1, best))
    return curve


def epochs_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((e for e, best in curve if best <= target + 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "data")
        prepare_dataset("demo:96", data, VoxelConfig(grid=8), PrepareOptions(val_fraction=0.25, test_fraction=0.0), workers=1)
        for seed in args.seeds:
            random_curve = run(data, "random", seed, args.trials, args.epochs, Path(tmp) / "runs")
            tpe_curve = run(data, "tpe", seed, args.trials, args.epochs, Path(tmp) / "runs")
            target = random_curve[-1][1]
            random_epochs = epochs_to_reach(random_curve, target)
            tpe_epochs = epochs_to_reach(tpe_curve, target)
            rows.append({"seed": seed, "random_best": target, "random_epochs_to_best": random_epochs,
                         "random_total_epochs": random_curve[-1][0], "tpe_asha_best": tpe_curve[-1][1],
                         "tpe_asha_total_epochs": tpe_curve[-1][0], "tpe_asha_epochs_to_random_best": tpe_epochs,
                         "ratio": None if tpe_epochs is None else tpe_epochs / random_epochs})
            print(json.dumps(rows[-1]))
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    summary = {"trials": args.trials, "max_epochs": args.epochs, "seeds": args.seeds, "runs": rows,
               "reached": f"{len(ratios)}/{len(rows)}",
               "median_ratio": float(np.median(ratios)) if ratios else None,
               "mean_total_epochs_ratio": float(np.mean([r["tpe_asha_total_epochs"] / r["random_total_epochs"] for r in rows]))}
    print(f"TPE+ASHA reached random search's best in {summary['reached']} seeds; median compute ratio "
          f"{summary['median_ratio']}; total epochs ratio {summary['mean_total_epochs_ratio']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
