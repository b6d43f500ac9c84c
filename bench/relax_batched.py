"""Relaxing decoded crystals with CHGNet: the batched path (one potential call per step for the whole
batch) against the one-by-one path (CHGNet's StructOptimizer per crystal), on the same crystals.

    python bench/relax_batched.py [--model pretrained/carbon_24] [--samples 32] [--steps 100] [--workers 2]

`--samples` crystals are drawn from the model's prior (seed 0) and relaxed both ways with the same
settings (cell and positions, ASE FIRE, at most `--steps` steps, fmax 0.1 eV/Å) and the same worker
processes. Reports crystals/s for each and their ratio (wall time, and CPU-seconds of this process and
its workers, which the neighbours' load moves less), how well the two agree: the final energy
per atom (difference per crystal), the fraction converged, and whether StructureMatcher (the field's
settings) matches each batched result to its one-by-one result; and the CPU cost per crystal of one
potential call at batch sizes 1-32. The machine's load average is recorded beside the timings: both
paths share the cores with whatever else runs.
Writes bench/results/relax_batched.json.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, relative, report  # noqa: E402

import crystalae  # noqa: E402
from crystalae.metrics import structure_matcher  # noqa: E402
from crystalae.parallel import default_workers  # noqa: E402
from crystalae.relax import relax  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes (the pool is joined by then)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def timed_relax(structures: list, method: str, args: argparse.Namespace) -> tuple[list, dict, float]:
    """Relax with `method`; the record gains the CPU-seconds spent and the load average before and after
    (the cores are shared: wall time alone would measure the neighbours too)."""
    load, cpu = os.getloadavg()[0], cpu_seconds()
    started = time.perf_counter()
    relaxed, record = relax(structures, steps=args.steps, fmax=args.fmax, workers=args.workers, method=method,
                            batch=args.batch)
    seconds = time.perf_counter() - started
    record["cpu_seconds"] = cpu_seconds() - cpu
    record["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    return relaxed, record, seconds


def evaluation_cost(structures: list, sizes: tuple[int, ...] = (1, 4, 16, 32)) -> dict[int, float]:
    """CPU milliseconds per crystal of one batched potential call (graphs, forward and backward) at each
    batch size, over the starting crystals: whether a bigger batch is cheaper per crystal here."""
    from crystalae.relax import _potential

    timing = {"graphs": 0.0, "potential": 0.0, "calls": 0}
    _potential(structures[:2], timing)  # the model loaded and warm
    cost = {}
    for size in sizes:
        started = time.process_time()
        for i in range(0, len(structures), size):
            _potential(structures[i : i + size], timing)
        cost[size] = round(1000 * (time.process_time() - started) / len(structures), 1)
    return cost


def agreement(batched: tuple[list, dict], one_by_one: tuple[list, dict]) -> dict:
    """Per-crystal agreement of the two results, over the crystals both relaxed."""
    (structures_b, record_b), (structures_o, record_o) = batched, one_by_one
    energy_b = record_b["per_crystal"]["energy_per_atom"]
    energy_o = record_o["per_crystal"]["energy_per_atom"]
    both = [i for i, (b, o) in enumerate(zip(energy_b, energy_o)) if b is not None and o is not None]
    difference = np.array([energy_b[i] - energy_o[i] for i in both])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matched = [structure_matcher().fit(structures_b[i], structures_o[i]) for i in both]
    return {"crystals_compared": len(both),
            "energy_difference_median_abs_ev_per_atom": round(float(np.median(np.abs(difference))), 5),
            "energy_difference_max_abs_ev_per_atom": round(float(np.abs(difference).max()), 5),
            "energy_difference_mean_ev_per_atom": round(float(difference.mean()), 5),
            "within_0.01_ev_per_atom": round(float(np.mean(np.abs(difference) <= 0.01)), 3),
            "structure_match_rate": round(float(np.mean(matched)), 3)}


def summary(record: dict, seconds: float, n: int) -> dict:
    each = record["per_crystal"]
    drop = [i - f for i, f in zip(each["initial_energy_per_atom"], each["energy_per_atom"]) if f is not None]
    steps = [s for s in each["steps"] if s is not None]
    return {"seconds": round(seconds, 1), "crystals_per_second": round(n / seconds, 4),
            "cpu_seconds_per_crystal": round(record["cpu_seconds"] / n, 2),
            "converged_fraction": round(record["converged"] / n, 3), "failed": record["failed"],
            "mean_steps": round(float(np.mean(steps)), 1),
            "median_energy_drop_ev_per_atom": round(float(np.median(drop)), 4),
            "load_average_start_end": record["load_average"], **({"seconds_in": record["seconds_in"]}
                                                                 if "seconds_in" in record else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "pretrained/carbon_24"), help="a shipped name or checkpoint")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fmax", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--batch", type=int, default=1, help="crystals per potential call (the batched path)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/relax_batched.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    structures = [s for s in crystalae.load(args.model).sample(args.samples, seed=args.seed) if s is not None]
    n = len(structures)
    print(f"{n} decoded crystals, {min(map(len, structures))}-{max(map(len, structures))} atoms; "
          f"{args.workers} workers")
    batched = timed_relax(structures, "batched", args)
    one_by_one = timed_relax(structures, "one-by-one", args)
    rows = {"batched": summary(batched[1], batched[2], n), "one-by-one": summary(one_by_one[1], one_by_one[2], n)}
    figures = {"model": relative(args.model) if Path(args.model).exists() else args.model, "crystals": n,
               "atoms_per_crystal": [min(map(len, structures)), max(map(len, structures))],
               "steps": args.steps, "fmax": args.fmax, "workers": args.workers, "batch": args.batch,
               "potential": batched[1]["potential"], "cpu_cores": default_workers(),
               "speedup": round(one_by_one[2] / batched[2], 2),
               "cpu_speedup": round(one_by_one[1]["cpu_seconds"] / batched[1]["cpu_seconds"], 2), **rows,
               "agreement": agreement(batched[:2], one_by_one[:2]),
               "potential_cpu_ms_per_crystal_by_batch": evaluation_cost(structures)}
    report(figures, args.out)


if __name__ == "__main__":
    main()
