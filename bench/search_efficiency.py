"""The default search against random search, both run by the project's own sweep code (`run_sweep`).

    python bench/search_efficiency.py [--recipe bench/recipes/search_efficiency_demo.yaml] [--trials N]
                                      [--epochs N] [--seeds 0 1 2 3 4] [--work runs/bench/search_efficiency]
                                      [--out bench/results/search_efficiency_demo.json]

The problem is a sweep YAML (--recipe); only its `search` section is replaced. The default,
`search_efficiency_demo.yaml`, is the demo problem of bench/rank_correlation.py (800 built-in
crystals; its best trials match ≥50% of their validation crystals at 30 epochs) with the objective
val_recovery. The earlier `search_efficiency.yaml` (the first --rows perov_5 crystals at 12³, 6
epochs, val_score) is where no trial reconstructed anything. Two trials at a time (compute is
counted per trial, so it does not depend on concurrency); --trials and --epochs default to the
recipe's. Random search is RandomSampler + FIFO (every trial trains every epoch); the default is
whatever SweepConfig's defaults are (algorithm, scheduler, grace period).
Compute is counted from each trial's own per-epoch history (epochs, and training + validation seconds),
in the order the epochs finished (`SweepSummary.timeline`). Per seed it reports the compute the default
needed to first reach random search's final best, as a fraction of random search's total compute.
--out is rewritten after every seed, and the sweeps live under --work: run it again after an
interruption and the seeds already in --out (same settings) are kept, ended sweeps are read back and an
unfinished one resumes (a folder from other settings is refused by the sweep code, naming it).
It ends by printing the README's tables; `--markdown` prints them from an existing --out without running.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from crystalae.files import read_yaml_mapping, write_json
from crystalae.search.config import SweepConfig, parse_sweep_config
from crystalae.search.layout import sweep_dir
from crystalae.search.results import SweepSummary, collect_trials, ended_runs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, relative, report  # noqa: E402

RECIPE = ROOT / "bench/recipes/search_efficiency_demo.yaml"


def subset_csv(source: Path, rows: int, out: Path) -> Path:
    """The first `rows` rows of a CDVAE-style CSV (the same crystals for every seed and method)."""
    csv.field_size_limit(1 << 30)
    partial = out.with_suffix(".partial")
    with open(source, newline="") as src, open(partial, "w", newline="") as dst:
        reader = csv.reader(src)
        writer = csv.writer(dst)
        for k, row in enumerate(reader):
            if k > rows:
                break
            writer.writerow(row)
    partial.replace(out)
    return out


def sweep_config(raw: dict, source: Path | str, method: str, seed: int, trials: int, epochs: int,
                 recipe: Path = RECIPE) -> SweepConfig:
    search = {"seed": seed} if method == "default" else {"seed": seed, "algorithm": "random", "scheduler": "fifo"}
    return parse_sweep_config({**raw, "name": f"{method}-{seed}", "data": {**raw["data"], "source": str(source)},
                               "budget": {"trials": trials, "epochs": epochs}, "search": search}, str(recipe))


def best_so_far(summary: SweepSummary) -> list[tuple[int, float, float]]:
    """[(epochs spent, seconds spent, best objective so far)] after every trained epoch."""
    better = max if summary.objective.mode == "max" else min
    curve, epochs, seconds, best = [], 0, 0.0, None
    for record in summary.timeline():
        epochs, seconds = epochs + 1, seconds + record.seconds
        if record.value is not None:
            best = record.value if best is None else better(best, record.value)
        curve.append((epochs, seconds, best))
    return curve


def compute_to_reach(curve: list[tuple[int, float, float]], target: float, mode: str) -> tuple[int, float] | None:
    for epochs, seconds, best in curve:
        if best is not None and (best >= target - 1e-12 if mode == "max" else best <= target + 1e-12):
            return epochs, seconds
    return None


def compare(random: SweepSummary, default: SweepSummary) -> dict:
    """One seed's row: random search's best and compute, and what the default spent to reach that best."""
    mode = random.objective.mode
    random_curve, default_curve = best_so_far(random), best_so_far(default)
    target = random_curve[-1][2]
    values = {r.value for s in (random, default) for r in s.timeline() if r.value is not None}
    if len(values) <= 1:  # no trial learned anything the objective sees: there is nothing to compare
        return {"random_best": target, "default_best": default_curve[-1][2], "flat_objective": True,
                "epochs_fraction": None, "seconds_fraction": None, "epochs_fraction_of_random_to_best": None}
    reached = compute_to_reach(default_curve, target, mode)
    random_total = random_curve[-1][:2]
    random_to_best = compute_to_reach(random_curve, target, mode)
    return {
        "random_best": target, "default_best": default_curve[-1][2],
        "random_epochs": random_total[0], "random_seconds": round(random_total[1], 1),
        "random_epochs_to_its_best": random_to_best[0],
        "default_epochs": default_curve[-1][0], "default_seconds": round(default_curve[-1][1], 1),
        "default_epochs_to_random_best": reached[0] if reached else None,
        "default_seconds_to_random_best": round(reached[1], 1) if reached else None,
        # the headline: a fraction of the compute random search spent in all
        "epochs_fraction": reached[0] / random_total[0] if reached else None,
        "seconds_fraction": reached[1] / random_total[1] if reached else None,
        # stricter: against the compute random search needed to find its own best
        "epochs_fraction_of_random_to_best": reached[0] / random_to_best[0] if reached else None,
    }


def early_rank_correlation(summary: SweepSummary, epochs: int) -> list[float | None]:
    """Per epoch k: Spearman correlation, over the trials that trained all `epochs`, between the
    objective after epoch k and the trial's best. How well a stop at epoch k ranks trials: what
    ASHA's grace period can count on."""
    from scipy.stats import spearmanr

    metric = summary.objective.metric
    curves = [[h.get(metric) for h in t.history] for t in summary.trials if len(t.history) >= epochs]
    curves = np.array([c[:epochs] for c in curves if all(v is not None for v in c[:epochs])], dtype=float)
    if len(curves) < 3:
        return [None] * epochs
    sign = 1.0 if summary.objective.mode == "max" else -1.0
    best = (sign * curves).max(axis=1)
    rhos = [spearmanr(sign * curves[:, k], best).statistic for k in range(epochs)]
    return [None if not np.isfinite(r) else round(float(r), 3) for r in rhos]


def median(values: list) -> float | str | None:
    """Median over seeds, a seed that never reached the target counting as infinite compute
    ("not reached" when the median itself is one of those, so the JSON stays standard)."""
    if not values:
        return None
    middle = float(np.median([np.inf if v is None else v for v in values]))
    return middle if np.isfinite(middle) else "not reached"


def bench_settings(args: argparse.Namespace, source: Path | str, default: SweepConfig) -> dict:
    """What the figures are measured on: an earlier --out with other settings is not reused."""
    demo = str(source).startswith("demo")
    return {
        "problem": relative(args.recipe), "dataset": str(source) if demo else relative(source),
        "rows": None if demo else args.rows, "trials": args.trials,
        "max_epochs": args.epochs,
        "default_search": {"algorithm": default.algorithm, "scheduler": default.scheduler,
                           "grace_period": default.asha_grace_period(),
                           "reduction_factor": default.reduction_factor, "startup_trials": default.startup_trials},
    }


def summarize(args: argparse.Namespace, settings: dict, rows: list[dict]) -> dict:
    """The bench's figures over the seeds done so far."""
    return {
        "settings": settings,
        "seeds": [r["seed"] for r in rows],
        "reached": f"{sum(r['epochs_fraction'] is not None for r in rows)}/{len(rows)}",
        "flat_objective_seeds": sum(bool(r.get("flat_objective")) for r in rows),
        "median_epochs_fraction": median([r["epochs_fraction"] for r in rows]),
        "median_seconds_fraction": median([r["seconds_fraction"] for r in rows]),
        "median_epochs_fraction_of_random_to_best": median([r["epochs_fraction_of_random_to_best"] for r in rows]),
        # median over seeds, per epoch: how well the objective after that epoch ranks random search's trials
        "rank_correlation_by_epoch": [
            median([r["random_rank_correlation_by_epoch"][k] for r in rows
                    if r["random_rank_correlation_by_epoch"][k] is not None]) for k in range(args.epochs)],
        "runs": rows,
    }


def earlier_rows(out: Path | None, settings: dict) -> dict[int, dict]:
    """Seeds an earlier run of this bench finished with the same settings (read from --out)."""
    if out is None or not out.exists():
        return {}
    figures = json.loads(out.read_text())
    return {r["seed"]: r for r in figures.get("runs", [])} if figures.get("settings") == settings else {}


def readme_tables(figures: dict, evaluated: int, metric: str = "val_score") -> str:
    """The README's per-seed and rank-correlation tables, from the bench's figures (val_score ×10⁻⁴)."""
    def value(v: float) -> str:
        if metric != "val_score":
            return f"{v:.3f}"
        matched = int(v * evaluated + 1e-9)  # val_score = match rate + tie-breakers below 1/evaluated
        return f"{v * 1e4:.2f}" + (f" ({matched} of {evaluated} matched)" if matched else "")

    def fraction(f: float | None) -> str:
        return "not reached" if f is None else f"{f:.1%}"

    total = figures["settings"]["trials"] * figures["settings"]["max_epochs"]
    lines = [f"| seed | random best, at its epoch (of {total}) | default best, epochs spent "
             "| default's epochs to random's best | fraction of random's compute: epochs / trial-seconds |",
             "|---|---|---|---|---|"]
    for r in figures["runs"]:
        to_best = r["default_epochs_to_random_best"]
        lines.append(f"| {r['seed']} | {value(r['random_best'])}, epoch {r['random_epochs_to_its_best']} "
                     f"| {value(r['default_best'])}, {r['default_epochs']} epochs | {'—' if to_best is None else to_best} "
                     f"| {fraction(r['epochs_fraction'])} / {fraction(r['seconds_fraction'])} |")
    medians = [figures[k] for k in ("median_epochs_fraction", "median_seconds_fraction")]
    medians = [m if isinstance(m, str) else f"{m:.1%}" for m in medians]
    lines += ["", f"Median over {len(figures['runs'])} seeds: **{medians[0]}** of random search's epochs "
              f"({medians[1]} of its trial-seconds); reached in {figures['reached']} seeds.", ""]
    correlations = figures["rank_correlation_by_epoch"]
    lines += ["| epoch | " + " | ".join(str(k + 1) for k in range(len(correlations))) + " |",
              "|---|" + "---|" * len(correlations),
              "| rank correlation | " + " | ".join("—" if c is None else f"{c:.2f}" for c in correlations) + " |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--rows", type=int, default=400, help="a CSV source: its first N crystals")
    parser.add_argument("--trials", type=int, help="default: the recipe's budget")
    parser.add_argument("--epochs", type=int, help="default: the recipe's budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", type=Path, help="default: runs/bench/<recipe name>")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print the README tables from --out; run nothing")
    args = parser.parse_args()
    raw = read_yaml_mapping(args.recipe, "--recipe")
    args.trials = args.trials or raw["budget"]["trials"]
    args.epochs = args.epochs or raw["budget"]["epochs"]
    metric = raw.get("objective", {}).get("metric", "val_recovery")
    if args.markdown:
        if args.out is None or not args.out.exists():
            parser.error(f"--markdown reads the figures of --out, and there are none at {args.out}")
        print(readme_tables(json.loads(args.out.read_text()), raw["train"]["eval_limit"], metric))
        return
    warnings.filterwarnings("ignore")
    from crystalae.search.sweep import run_sweep

    args.work = args.work or ROOT / "runs/bench" / args.recipe.stem  # a recipe's sweeps never meet another's
    args.work.mkdir(parents=True, exist_ok=True)
    if str(raw["data"]["source"]).startswith("demo"):
        source = subset = raw["data"]["source"]  # built-in crystals: no file to cut
    else:
        source = (ROOT / raw["data"]["source"]).resolve()  # relative to the repository, as elsewhere in bench/
        subset = args.work / f"subset-{args.rows}.csv"
        if not subset.exists():  # kept: the resumed sweeps' data source
            subset_csv(source, args.rows, subset)
    default = sweep_config(raw, subset, "default", 0, args.trials, args.epochs, args.recipe)
    settings = bench_settings(args, source, default)
    done = earlier_rows(args.out, settings)
    rows = []
    for seed in args.seeds:
        if seed in done:  # --out is rewritten after every seed, so an interrupted bench picks up here
            rows.append(done[seed])
            continue
        summaries = {}
        for method in ("random", "default"):
            config = sweep_config(raw, subset, method, seed, args.trials, args.epochs, args.recipe)
            root = sweep_dir(args.work / "sweeps", config.name)
            ended = collect_trials(root) if ended_runs(root) else None
            if ended is not None and len(ended.trials) >= args.trials:
                summaries[method] = ended  # ended in an earlier run of this bench
            else:
                summaries[method] = run_sweep(config, storage=args.work / "sweeps", resume=Path(root).exists())
        rows.append({"seed": seed, **compare(summaries["random"], summaries["default"]),
                     "random_rank_correlation_by_epoch": early_rank_correlation(summaries["random"], args.epochs)})
        print(rows[-1], flush=True)
        if args.out:
            write_json(args.out, summarize(args, settings, rows))
    figures = summarize(args, settings, rows)
    report(figures, args.out, hide=("runs",))
    print(readme_tables(figures, raw["train"]["eval_limit"], metric))


if __name__ == "__main__":
    main()
