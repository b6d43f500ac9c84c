"""Symmetry snapping of decoded crystals: choose its tolerance on the validation split, report the test split.

    python bench/symmetry.py --model pretrained/carbon_24 [--update]

The model's own dataset is found by its hash (or prepared from its lineage). Every tolerance of
`--symprecs` snaps the same decoded crystals of the whole validation split (`crystalae.symmetry`); the
one with the best validation match rate is chosen, or none if none beats the raw decode. The test split is
then scored raw and snapped with the chosen tolerance, both reported. `--update` stores the choice in the
model (`decoding: {symprec: ...}`), so `reconstruct` and `generate` snap with it by default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import model_dataset  # noqa: E402
from report import ROOT, add_data_options, relative, report  # noqa: E402

from crystalae.checkpoint import export_checkpoint, load_checkpoint  # noqa: E402
from crystalae.config import TrainConfig  # noqa: E402
from crystalae.dataset import read_table  # noqa: E402
from crystalae.evaluation import evaluate  # noqa: E402
from crystalae.files import write_json  # noqa: E402
from crystalae.readout import CountChoice  # noqa: E402


def scored(loaded, table, symprec: float | None) -> dict:
    """Match rate and RMS of one split, raw and (with `symprec`) snapped."""
    cfg = TrainConfig.from_dict({**loaded.meta["train_config"], "eval_limit": table.num_rows})
    figures = evaluate(loaded.model, table, loaded.voxel, cfg, torch.device("cpu"), symprec=symprec,
                       count_choice=CountChoice.of(loaded.meta.get("decoding")))
    row = {"symprec": symprec, "raw_match_rate": figures["match_rate"], "raw_rms": figures["rms"]}
    if symprec:
        row.update({"match_rate": figures["symmetrized"]["match_rate"], "rms": figures["symmetrized"]["rms"]})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint folder")
    add_data_options(parser)
    parser.add_argument("--symprecs", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--update", action="store_true", help="store the chosen tolerance in the model")
    parser.add_argument("--out", type=Path, help="default: bench/results/symmetry_<model>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    loaded = load_checkpoint(args.model)
    data = model_dataset(args.model, args.datasets, args.work)
    started = time.perf_counter()
    val, test = read_table(data, split="val"), read_table(data, split="test")
    rows = []
    for symprec in args.symprecs:
        rows.append(scored(loaded, val, symprec))
        print(f"  val symprec {symprec:g} Å: match {rows[-1]['match_rate']:.4f} (raw {rows[-1]['raw_match_rate']:.4f})",
              flush=True)
    raw = rows[0]["raw_match_rate"]
    best = max(rows, key=lambda r: (r["match_rate"], -r["symprec"]))
    chosen = best["symprec"] if best["match_rate"] > raw else None
    test_row = scored(loaded, test, chosen)
    figures = {"model": relative(args.model), "dataset_hash": loaded.meta["dataset_hash"],
               "val_rows": val.num_rows, "test_rows": test.num_rows, "angle_tolerance_deg": 5.0,
               "choice_rule": "best validation match rate; none if no tolerance beats the raw decode",
               "chosen_symprec": chosen, "validation": rows,
               "test_raw_match_rate": test_row["raw_match_rate"], "test_raw_rms": test_row["raw_rms"],
               "test_symmetrized_match_rate": test_row.get("match_rate"), "test_symmetrized_rms": test_row.get("rms"),
               "seconds": round(time.perf_counter() - started, 1)}
    report(figures, args.out or ROOT / "bench/results" / f"symmetry_{args.model.name}.json", hide=("validation",))
    if args.update:
        store_choice(args.model, figures)


def store_choice(model: Path, figures: dict) -> None:
    """The chosen tolerance into the model's checkpoint (`decoding`) and its RESULTS.json."""
    chosen = figures["chosen_symprec"]
    val_match = max([r["match_rate"] for r in figures["validation"] if r["symprec"] == chosen] or [None],
                    key=lambda v: v or 0)
    decoding = dict(load_checkpoint(model).meta.get("decoding") or {})  # other settings (count choice) stay
    export_checkpoint(model, model, decoding=decoding | {"symprec": chosen, "chosen_by": "bench/symmetry.py",
                                                         "validation_match_rate": val_match})
    results_path = model / "RESULTS.json"
    results = json.loads(results_path.read_text())
    results["symmetrized"] = {k: figures[k] for k in ("chosen_symprec", "test_symmetrized_match_rate",
                                                      "test_symmetrized_rms", "choice_rule")}
    write_json(results_path, results)
    print(f"rewrote {model}: decoded crystals snapped at symprec {chosen}")


if __name__ == "__main__":
    main()
