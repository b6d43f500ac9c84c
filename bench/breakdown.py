"""Where a shipped model's reconstruction fails: match rate by atoms per cell, by crystal system, and on
the test crystals with no StructureMatcher twin in the training split, raw and symmetry-snapped.

    python bench/breakdown.py --model pretrained/carbon_24        # ~2 min on 2 cores

Scores the model's own test split as `bench/reconstruction.py` does (which reports the same breakdown
for the runs it scores), with the model's stored snapping tolerance (`bench/symmetry.py`), and the
twins found by `bench/twins.py` where its result for the model's dataset exists.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import model_dataset  # noqa: E402
from reconstruction import breakdown  # noqa: E402
from report import ROOT, add_data_options, relative, report  # noqa: E402

from crystalae.checkpoint import load_checkpoint  # noqa: E402
from crystalae.config import TrainConfig  # noqa: E402
from crystalae.dataset import read_table  # noqa: E402
from crystalae.evaluation import evaluate  # noqa: E402
from crystalae.readout import CountChoice  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint folder")
    add_data_options(parser)
    parser.add_argument("--out", type=Path, help="default: bench/results/breakdown_<model>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    loaded = load_checkpoint(args.model)
    test = read_table(model_dataset(args.model, args.datasets, args.work), split="test")
    symprec = (loaded.meta.get("decoding") or {}).get("symprec")
    cfg = TrainConfig.from_dict({**loaded.meta["train_config"], "eval_limit": test.num_rows})
    metrics = evaluate(loaded.model, test, loaded.voxel, cfg, torch.device("cpu"), symprec=symprec, records=True,
                       count_choice=CountChoice.of(loaded.meta.get("decoding")))
    figures = {"model": relative(args.model), "dataset_hash": loaded.meta["dataset_hash"], "test_rows": test.num_rows,
               "test_match_rate": metrics["match_rate"], "test_rms": metrics["rms"],
               "test_symmetrized": metrics.get("symmetrized"),
               "breakdown": breakdown(metrics["records"], test, loaded.meta["dataset_hash"]),
               "seconds": round(time.perf_counter() - started, 1)}
    report(figures, args.out or ROOT / "bench/results" / f"breakdown_{args.model.name}.json")


if __name__ == "__main__":
    main()
