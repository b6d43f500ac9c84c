"""Voxelizer and decoder throughput against a straightforward dense-numpy voxelizer, in one run.

    python bench/voxelize.py [--dataset ../shared/datasets/perov_5/val.csv] [--grid 32] [--limit 2000]

Prints structures/s for: the dense reference (every voxel x atom x 27 images), the voxelizer on one
core and on all cores, the decoder on one core, and voxelize + decode on all cores, with the ratios.
"""
from __future__ import annotations

import argparse
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from report import relative, report  # bench/report.py (scripts run from bench/)

from crystalae.config import VoxelConfig
from crystalae.decode import decode
from crystalae.parallel import default_workers
from crystalae.sources import list_entries, load_structure, reduce_cell
from crystalae.voxelize import crystal_arrays, dense_reference_density, voxelize_arrays

ROOT = Path(__file__).resolve().parents[1]


def _voxelize_all(task):
    crystals, config_dict = task
    config = VoxelConfig.from_dict(config_dict)
    for lattice, frac, numbers in crystals:
        voxelize_arrays(lattice, frac, numbers, config)
    return len(crystals)


def _decode_all(task):
    crystals, config_dict = task
    config = VoxelConfig.from_dict(config_dict)
    densities = [voxelize_arrays(*c, config) for c in crystals]
    start = time.perf_counter()
    for d in densities:
        decode(d)
    return time.perf_counter() - start


def _rate(fn, crystals, config, workers):
    chunks = np.array_split(np.arange(len(crystals)), workers * 4)
    tasks = [([crystals[i] for i in chunk], config.as_dict()) for chunk in chunks if len(chunk)]
    start = time.perf_counter()
    if workers == 1:
        results = [fn(t) for t in tasks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(fn, tasks))
    return len(crystals) / (time.perf_counter() - start), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared/datasets/perov_5/val.csv"))
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--reference-count", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()

    config = VoxelConfig(grid=args.grid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = [reduce_cell(load_structure(e), config.reduce) for e in list_entries(args.dataset, args.limit)]
    crystals = [crystal_arrays(s) for s in structures]
    workers = default_workers()

    start = time.perf_counter()
    for s in structures[: args.reference_count]:
        dense_reference_density(s, config)
    reference = args.reference_count / (time.perf_counter() - start)
    fast_1, _ = _rate(_voxelize_all, crystals, config, 1)
    fast_n, _ = _rate(_voxelize_all, crystals, config, workers)
    _, decode_times = _rate(_decode_all, crystals, config, 1)
    decode_1 = len(crystals) / sum(decode_times)
    roundtrip_n, _ = _rate(_decode_all, crystals, config, workers)  # wall clock: voxelize + decode

    figures = {
        "dataset": relative(args.dataset), "structures": len(crystals), "grid": args.grid, "workers": workers,
        "dense_reference_per_s": round(reference, 2),
        "voxelize_1core_per_s": round(fast_1, 1), f"voxelize_{workers}cores_per_s": round(fast_n, 1),
        "speedup_1core_vs_reference": round(fast_1 / reference, 1),
        f"speedup_{workers}cores_vs_reference": round(fast_n / reference, 1),
        "decode_1core_per_s": round(decode_1, 1),
        f"voxelize_and_decode_{workers}cores_per_s": round(roundtrip_n, 1),
    }
    report(figures, args.out)


if __name__ == "__main__":
    main()
