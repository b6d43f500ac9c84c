"""Train on our own split of a shared dataset, evaluate on the held-back part, write the figures.

    python bench/reconstruction.py --dataset ../shared/datasets/perov_5/val.csv --grid 16 --epochs 10

Splits come from a hash of material_id (80/10/10 train/val/test), so they are stable across runs.
Reported on the test split: StructureMatcher match rate and RMS (stol 0.5, ltol 0.3, angle_tol 10),
voxel species accuracy, atom-count rate, density MSE; and validity of samples from the prior.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from crystalae.checkpoint import load_checkpoint, read_checkpoint
from crystalae.config import VoxelConfig
from crystalae.generate import sample, validity
from crystalae.shards import PrepareOptions, prepare_dataset, read_table
from crystalae.training import TrainConfig, best_checkpoint_path, evaluate, train
from report import report  # bench/report.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared/datasets/perov_5/val.csv"))
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--model", type=json.loads, default={}, help='ModelConfig overrides as JSON')
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    name = f"{Path(args.dataset).parent.name}-g{args.grid}"
    data = args.work / name / "data"
    started = time.perf_counter()
    prepare_dataset(args.dataset, data, VoxelConfig(grid=args.grid, sigma=args.sigma),
                    PrepareOptions(val_fraction=0.1, test_fraction=0.1))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, workers=args.workers,
                      threads=args.threads, use_gpu=args.gpu, eval_limit=64)
    result = train(data, cfg, args.model, storage=args.work / name / "runs", name="bench")
    train_seconds = time.perf_counter() - started
    best = best_checkpoint_path(result)
    device = torch.device("cuda" if args.gpu and torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(best, device=device)
    test = read_table(data, split="test")
    metrics = evaluate(loaded.model, test, loaded.voxel, TrainConfig(**{**cfg.as_dict(), "eval_limit": test.num_rows}), device)
    generated = sample(loaded, args.samples, seed=0)
    valid = [validity(s) for s in generated]
    figures = {
        "dataset": args.dataset, "grid": args.grid, "sigma": args.sigma, "epochs": args.epochs,
        "train_rows": read_table(data, split="train", columns=["split"]).num_rows, "test_rows": test.num_rows,
        "model_config": loaded.model_config.as_dict(), "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "best_checkpoint_epoch": read_checkpoint(best)["epoch"],
        "test_match_rate": metrics["match_rate"], "test_rms": metrics["rms"],
        "test_species_accuracy": metrics["species_accuracy"], "test_atom_count_rate": metrics["atom_count_rate"],
        "test_density_mse": metrics["density_mse"],
        "sample_structural_validity": sum(v["structural_valid"] for v in valid) / len(valid),
        "sample_composition_validity": sum(v["composition_valid"] for v in valid) / len(valid),
        "wall_seconds": round(time.perf_counter() - started, 1), "train_seconds": round(train_seconds, 1),
        "device": str(device),
    }
    report(figures, args.out, hide=("model_config",))


if __name__ == "__main__":
    main()
