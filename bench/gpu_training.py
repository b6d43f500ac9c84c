"""GPU training against the CPU on the same data and model, in one run, with the GPU's utilisation.

    python bench/gpu_training.py --source ../shared/datasets/perov_5/val.csv --grid 16 --epochs 3 \
        --out bench/results/gpu_training.json

Trains the perov_5 reference model with `crystalae.training.train` (Ray Train, one worker) on the CPU
for a baseline, then with `use_gpu` (bf16 autocast, pinned batches prefetched by a background thread)
while `nvidia-smi` is sampled every half second. Reports train samples/s from epochs after the first
(warm-up) for both, their ratio, the card, and the mean and peak GPU utilisation during GPU epochs.
Without a CUDA device it says so and measures nothing.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from report import relative, report  # bench/report.py (scripts run from bench/)

from crystalae.checkpoint import read_checkpoint
from crystalae.config import TrainConfig, VoxelConfig
from crystalae.shards import PrepareOptions, prepare_dataset
from crystalae.training import train

MODEL = {"depth": 3, "base_width": 16, "latent_dim": 128, "residual": False}  # the perov_5 reference model


def gpu_sampler(samples: list[float], stop: threading.Event) -> threading.Thread:
    def run():
        while not stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                samples.append(float(out.stdout.split()[0]))
            time.sleep(0.5)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def samples_per_s(result) -> float:
    """Median train samples/s over the epochs after the first (the first includes warm-up)."""
    with result.checkpoint.as_directory() as folder:
        history = read_checkpoint(folder)["history"]
    rates = [h["train_samples"] / h["epoch_seconds"] for h in history]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="demo:2000")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="CPU baseline threads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (run this on a GPU machine)")
        return
    card = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_dataset(args.source, data, VoxelConfig(grid=args.grid, sigma=0.5), PrepareOptions())
        common = {"epochs": args.epochs, "batch_size": args.batch_size, "eval_limit": 64, "seed": 0}
        cpu = train(data, TrainConfig.from_dict({**common, "threads": args.threads}), MODEL,
                    storage=Path(tmp) / "runs", name="cpu")
        utilisation, stop = [], threading.Event()
        sampler = gpu_sampler(utilisation, stop)
        gpu = train(data, TrainConfig.from_dict({**common, "use_gpu": True, "threads": 4}), MODEL,
                    storage=Path(tmp) / "runs", name="gpu")
        stop.set()
        sampler.join()
        cpu_rate, gpu_rate = samples_per_s(cpu), samples_per_s(gpu)
    report({"card": card, "source": relative(args.source) if Path(args.source).exists() else args.source,
            "grid": args.grid, "batch_size": args.batch_size, "epochs": args.epochs, "bf16_autocast": True,
            "cpu_threads": args.threads, "cpu_samples_per_s": round(cpu_rate, 1),
            "gpu_samples_per_s": round(gpu_rate, 1), "gpu_vs_cpu": round(gpu_rate / cpu_rate, 2),
            "gpu_utilisation_mean_pct": round(statistics.mean(utilisation), 1) if utilisation else None,
            "gpu_utilisation_peak_pct": max(utilisation) if utilisation else None}, args.out)


if __name__ == "__main__":
    main()
