"""Ray Train loop vs a plain single-process torch loop: same model, same data, same threads, one run.

    python bench/train_throughput.py --source demo:600 --grid 16 --threads 2 --out bench/results/train_throughput_overhead.json

Both run `crystalae.training.run_epoch` with the same augmentation (element substitution, shifts);
the Ray side is `crystalae.training.train`: one TorchTrainer worker reading its share of the Parquet
shards (`WorkerShare`, shuffled every epoch). Samples/s are taken from epochs after the first (warm-up), and the
overhead is 1 - ray / plain. Arms, in this order: plain, Ray Train as Ray starts its workers (niceness
15), Ray Train with worker niceness 0, plain again (the spread of the two plain arms is the machine's
noise). Each Ray arm also reports the CPU its other processes (GCS, raylet, the Train controller, this
driver) use while the worker trains, in cores: on a machine with no spare core that is taken from training.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import report  # noqa: E402  (bench/report.py)

from crystalae.augment import augment
from crystalae.checkpoint import read_checkpoint  # noqa: E402
from crystalae.config import TrainConfig, VoxelConfig  # noqa: E402
from crystalae.dataset import read_table, table_batches
from crystalae.models import CrystalAE
from crystalae.shards import PrepareOptions, prepare_dataset
from crystalae.training import build_configs, run_epoch, train  # noqa: E402
from crystalae.units import class_lookup, density_scale

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


class RayCpu:
    """Samples, every `every` s, the CPU seconds used so far by this process and its descendants (a local
    Ray's GCS, raylet, workers), by process name (the Train worker is "RayTrainWorker")."""

    def __init__(self, every: float = 0.5):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (name, CPU s), kept after it exits
        self.samples: list[tuple[float, dict[str, float]]] = []  # (wall clock, name -> CPU s)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self.thread.start()

    def _run(self, every: float) -> None:
        while not self.done.wait(every):
            self._sample()

    def _sample(self) -> None:
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick)
        mine = {os.getpid()}
        for _ in range(6):  # driver -> raylet -> workers: a few levels down
            mine |= {pid for pid, (ppid, _) in parents.items() if ppid in mine}
        for pid in mine:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            name = "this driver" if pid == os.getpid() else Path(command.split()[0] if command else "?").name
            self.seen[pid] = (name.split(".")[0] if name.startswith("ray::") else name, parents[pid][1])
        totals: dict[str, float] = {}
        for name, cpu in self.seen.values():
            totals[name] = totals.get(name, 0.0) + cpu
        self.samples.append((time.time(), totals))

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Cores each process name used over the wall-clock span [start, end], most first."""
        self.done.set()
        self.thread.join()
        inside = [s for s in self.samples if start <= s[0] <= end]
        (t0, first), (t1, last) = inside[0], inside[-1]
        used = {name: (cpu - first.get(name, 0.0)) / (t1 - t0) for name, cpu in last.items()}
        return dict(sorted(((k, round(v, 3)) for k, v in used.items() if v >= 0.0005), key=lambda kv: -kv[1]))


def ray_arm(data: Path, cfg: TrainConfig, storage: Path, niceness: int | None) -> dict:
    """`crystalae.training.train` on a fresh local Ray (worker niceness as Ray sets it, or `niceness`)."""
    import ray

    from crystalae.ray_env import runtime_env

    system = {} if niceness is None else {"_system_config": {"worker_niceness": niceness}}
    ray.init(num_cpus=max(4, cfg.threads + 2), include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env=runtime_env(), **system)
    cpu = RayCpu()
    started = time.perf_counter()
    try:
        train(data, cfg, MODEL, storage=storage, name="bench")
    finally:
        wall = time.perf_counter() - started
        ray.shutdown()
    newest = sorted(p for p in (storage / "bench").glob("checkpoint_*") if p.is_dir())[-1]
    history = read_checkpoint(newest)["history"]
    rates = [h["train_samples"] / h["epoch_seconds"] for h in history]
    cores = cpu.cores(history[0]["finished_at"], history[-1]["finished_at"])
    worker = cores.pop("ray::RayTrainWorker", 0.0)
    return {"samples_per_s": sum(rates[1:]) / len(rates[1:]), "wall_seconds_incl_startup": round(wall, 1),
            "worker_cores": round(worker, 2), "other_ray_cores": round(sum(cores.values()), 3),
            "other_ray_cores_by_process": cores, "samples_per_epoch": history[-1]["train_samples"]}


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
        plain_before = plain_rates(data, cfg)
        arms = {"ray_default_niceness": ray_arm(data, cfg, Path(tmp) / "runs15", None),
                "ray_niceness_0": ray_arm(data, cfg, Path(tmp) / "runs0", 0)}
        plain_after = plain_rates(data, cfg)

    def mean_after_warmup(rates: list[float]) -> float:
        return sum(rates[1:]) / len(rates[1:])

    plain = {"before": mean_after_warmup(plain_before), "after": mean_after_warmup(plain_after)}
    plain_rate = (plain["before"] + plain["after"]) / 2
    figures = {"source": Path(args.source).name if "/" in args.source else args.source, "grid": args.grid,
               "threads": args.threads, "cpu_cores": os.cpu_count(), "epochs": args.epochs,
               "load_average_1min_at_end": round(os.getloadavg()[0], 2),
               "train_samples_per_epoch": arms["ray_niceness_0"]["samples_per_epoch"],
               "plain_samples_per_s": round(plain_rate, 2),
               "plain_spread": round(abs(plain["before"] - plain["after"]) / plain_rate, 4),
               **{f"plain_samples_per_s_{k}": round(v, 2) for k, v in plain.items()}}
    for name, arm in arms.items():
        figures[f"{name}_samples_per_s"] = round(arm["samples_per_s"], 2)
        figures[f"{name}_overhead"] = round(1 - arm["samples_per_s"] / plain_rate, 4)
        figures[f"{name}_other_ray_cores"] = arm["other_ray_cores"]
        figures[f"{name}_worker_cores"] = arm["worker_cores"]
        figures[f"{name}_other_ray_cores_by_process"] = arm["other_ray_cores_by_process"]
        figures[f"{name}_wall_seconds_incl_startup"] = arm["wall_seconds_incl_startup"]
    report(figures, args.out)


if __name__ == "__main__":
    main()
