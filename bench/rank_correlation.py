"""Does the sweep objective rank trials early? Spearman between a metric after epoch k (a pruning rung)
and each trial's final match rate on the test split, from one random-search + FIFO sweep.

    python bench/rank_correlation.py [--recipe bench/recipes/rank_correlation_demo.yaml] [--trials 16]
                                     [--work runs/bench/rank_correlation] [--out bench/results/rank_correlation_demo.json]

Every trial trains all epochs (FIFO), so its last checkpoint is its full-budget model; that checkpoint
is decoded on the test split of its own dataset (never seen in training or validation) and scored with
the matcher. For each candidate metric (the objective `val_recovery`, the older `val_score`, the plain
`val_match_rate`, and `val_loss`, lower is better) and each epoch k it reports the rank correlation
with the test match rate over all trials. The sweep lives under --work and resumes after an
interruption; test scores are cached beside it. `--markdown` prints the README table from --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from crystalae.files import read_yaml_mapping, write_json
from crystalae.search.config import parse_sweep_config
from crystalae.search.layout import sweep_dataset, sweep_dir
from crystalae.search.results import SweepSummary, collect_trials, ended_runs, spearman

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, relative  # noqa: E402

CANDIDATES = (("val_recovery", 1.0), ("val_score", 1.0), ("val_match_rate", 1.0), ("val_loss", -1.0))


def test_match_rate(root: Path, checkpoint: Path) -> dict[str, float | None]:
    """The checkpoint decoded on every test crystal of the dataset it was trained on."""
    import torch

    from crystalae.checkpoint import load_checkpoint
    from crystalae.config import TrainConfig
    from crystalae.dataset import read_table
    from crystalae.evaluation import evaluate

    loaded = load_checkpoint(checkpoint)
    data = sweep_dataset(root, loaded.meta["dataset_hash"])
    table = read_table(data, split="test")
    result = evaluate(loaded.model, table, loaded.voxel, TrainConfig(eval_limit=table.num_rows), torch.device("cpu"))
    return {"test_match_rate": result["match_rate"], "test_recovery": result["recovery"],
            "test_rms": result["rms"], "test_crystals": table.num_rows}


def correlations(summary: SweepSummary, tests: dict[str, float], epochs: int) -> dict[str, list[float | None]]:
    """Per candidate metric, per epoch k = 1..epochs: Spearman with the trials' test match rates."""
    full = [t for t in summary.trials if len(t.history) >= epochs and t.trial_id in tests]
    table = {}
    for metric, sign in CANDIDATES:
        row = []
        for k in range(epochs):
            pairs = [(sign * t.history[k][metric], tests[t.trial_id]) for t in full
                     if isinstance(t.history[k].get(metric), (int, float)) and t.history[k][metric] == t.history[k][metric]]
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) == len(full) else None
            row.append(None if rho is None else round(rho, 3))
        table[metric] = row
    return table


def markdown(figures: dict) -> str:
    epochs = figures["epochs"]
    shown = sorted({1, 2, 3, 5, epochs // 4, epochs // 3, epochs // 2, epochs} - {0})
    lines = ["| metric after epoch k | " + " | ".join(str(k) for k in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for metric, row in figures["spearman_with_test_match"].items():
        cells = ["–" if row[k - 1] is None else f"{row[k - 1]:.2f}" for k in shown]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "bench/recipes/rank_correlation_demo.yaml")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench/rank_correlation")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print the README table from --out; run nothing")
    args = parser.parse_args()
    if args.markdown:
        if args.out is None or not args.out.exists():
            parser.error(f"--markdown reads the figures of --out, and there are none at {args.out}")
        print(markdown(json.loads(args.out.read_text())))
        return
    warnings.filterwarnings("ignore")
    from crystalae.search.sweep import run_sweep

    raw = read_yaml_mapping(args.recipe, "--recipe")
    if args.trials:
        raw["budget"] = {**raw["budget"], "trials": args.trials}
    source = raw["data"]["source"]
    if not source.startswith("demo"):
        raw["data"] = {**raw["data"], "source": str((ROOT / source).resolve())}
    config = parse_sweep_config(raw, str(args.recipe))
    root = sweep_dir(args.work, config.name)
    ended = collect_trials(root) if ended_runs(root) else None
    summary = ended if ended is not None and len(ended.trials) >= config.trials else \
        run_sweep(config, storage=args.work, resume=root.exists())
    cache = root / "test_scores.json"
    scores = json.loads(cache.read_text()) if cache.exists() else {}
    for trial in summary.trials:
        if trial.trial_id not in scores and trial.checkpoints:
            last = max(trial.checkpoints, key=lambda c: c.epoch)
            scores[trial.trial_id] = {"epoch": last.epoch, **test_match_rate(root, root / last.path)}
            write_json(cache, scores)
            print(trial.trial_id, scores[trial.trial_id], flush=True)
    tests = {t: s["test_match_rate"] for t, s in scores.items() if s["epoch"] == config.epochs - 1}
    figures = {
        "recipe": relative(args.recipe), "trials": len(summary.trials), "epochs": config.epochs,
        "trials_at_full_budget": len(tests),
        "test_match_rate": {"best": max(tests.values(), default=None),
                            "median": float(np.median(list(tests.values()))) if tests else None},
        "spearman_with_test_match": correlations(summary, tests, config.epochs),
        "per_trial": {t.trial_id: {"params": t.params, **scores.get(t.trial_id, {}),
                                   "val_recovery_by_epoch": [round(h.get("val_recovery") or 0.0, 4) for h in t.history]}
                      for t in summary.trials},
    }
    if args.out:
        write_json(args.out, figures)
    print({k: v for k, v in figures.items() if k != "per_trial"})
    print(markdown(figures))


if __name__ == "__main__":
    main()
