"""ASHA replayed on random search's full learning curves: which grace period and reduction factor
would have reached random search's best soonest, with no new training.

    python bench/asha_replay.py [--work runs/bench/search_efficiency_demo/sweeps] [--out FILE]

bench/search_efficiency.py's random sweeps (RandomSampler + FIFO) train every trial to the full
budget, so each trial's whole curve is known. This replays Ray's asynchronous successive halving
(`AsyncHyperBandScheduler`: at rung r = grace * rf^k a trial is stopped when its objective is below
the (1 - 1/rf) quantile of the values recorded at r so far) over those curves, in the sweep's own
trial order and concurrency, and counts the epochs until random search's best value first appears,
as a fraction of random search's epochs. It isolates the scheduler: the configurations are random
search's, not TPE's. A replay, not a measurement: a trial's value at an epoch is what it had under
FIFO, and compute is counted in epochs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from crystalae.search.results import SweepSummary, collect_trials, ended_runs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, relative, report  # noqa: E402

GRACES = (1, 2, 3, 5, 7, 10, 15)
FACTORS = (2, 3, 4)


def curves_in_start_order(summary: SweepSummary) -> list[list[float]]:
    """Each trial's per-epoch objective (higher is better), in the order the trials started."""
    sign = 1.0 if summary.objective.mode == "max" else -1.0
    started: dict[str, int] = {}
    for k, record in enumerate(summary.timeline()):
        started.setdefault(record.trial_id, k)
    trials = sorted(summary.trials, key=lambda t: started.get(t.trial_id, len(started)))
    metric = summary.objective.metric
    return [[sign * float(h.get(metric) or 0.0) for h in t.history] for t in trials]


def replay(curves: list[list[float]], grace: int, factor: int, concurrent: int, max_epochs: int) -> tuple[int, int, float]:
    """(epochs until the best value of all `curves` first appears or None, epochs in all, best reached)."""
    rungs = []
    r = grace
    while r < max_epochs:
        rungs.append(r)
        r *= factor
    recorded: dict[int, dict[int, float]] = {r: {} for r in rungs}
    target = max(max(c) for c in curves)
    queue, slots = list(range(len(curves))), [None] * concurrent  # slot: [trial, epochs done]
    spent, reached, best = 0, None, -np.inf
    while queue or any(s is not None for s in slots):
        for k in range(concurrent):
            if slots[k] is None and queue:
                slots[k] = [queue.pop(0), 0]
            if slots[k] is None:
                continue
            trial, done = slots[k]
            value = curves[trial][done]
            done, spent, best = done + 1, spent + 1, max(best, value)
            if reached is None and value >= target - 1e-12:
                reached = spent
            stop = done >= len(curves[trial])
            for rung in reversed(rungs):  # Ray's rule: the highest milestone passed and not yet recorded
                if done >= rung and trial not in recorded[rung]:
                    values = list(recorded[rung].values())
                    if values and value < np.nanpercentile(values, (1 - 1 / factor) * 100):
                        stop = True
                    recorded[rung][trial] = value
                    break
            slots[k] = None if stop else [trial, done]
    return reached, spent, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench/search_efficiency_demo/sweeps")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at a time, as the sweeps ran")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/asha_replay_demo.json")
    args = parser.parse_args()
    sweeps = sorted(p for p in args.work.glob("random-*") if ended_runs(p))
    if not sweeps:
        raise SystemExit(f"no ended random sweep under {args.work}: run bench/search_efficiency.py first")
    seeds = {p.name: curves_in_start_order(collect_trials(p)) for p in sweeps}
    rows = []
    for grace in GRACES:
        for factor in FACTORS:
            per_seed = {}
            for name, curves in seeds.items():
                total = sum(len(c) for c in curves)
                reached, spent, best = replay(curves, grace, factor, args.concurrent, max(len(c) for c in curves))
                per_seed[name] = {"fraction_to_best": None if reached is None else round(reached / total, 4),
                                  "fraction_spent": round(spent / total, 4)}
            fractions = [np.inf if v["fraction_to_best"] is None else v["fraction_to_best"] for v in per_seed.values()]
            middle = float(np.median(fractions))
            rows.append({"grace": grace, "factor": factor, "seeds": per_seed,
                         "median_fraction_to_best": middle if np.isfinite(middle) else "not reached",
                         "reached": f"{sum(np.isfinite(fractions))}/{len(fractions)}"})
            print(f"grace {grace:2d}, rf {factor}: median {rows[-1]['median_fraction_to_best']}, "
                  f"reached {rows[-1]['reached']}", flush=True)
    report({"work": relative(args.work), "concurrent": args.concurrent, "sweeps": list(seeds), "replays": rows},
           args.out, hide=("replays",))


if __name__ == "__main__":
    main()
