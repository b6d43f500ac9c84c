"""Choosing the atom count by how well the decoded crystal explains the decoded density: tune it on the
validation split, report the test split.

    python bench/count_choice.py --model pretrained/carbon_24 [--update]

A count head's most likely count is wrong for a fifth of carbon_24's crystals, yet the right count is
among its few likeliest for almost all. `crystalae.readout.CountChoice` reads a crystal with each of the
head's `candidates` likeliest counts and keeps the one whose voxelized atoms misfit the decoded density
least, less `prior_weight` x the count's log-probability. Here every validation crystal is decoded once
per candidate count (up to `--max-candidates`); each (candidates, prior weight) pair of the grid is then
scored from those records, by the model's own decoding (snapped at its stored tolerance where it has
one), and the best validation match rate is chosen, or the head's argmax if nothing beats it. The test
split is then scored through `evaluate` with the chosen setting, raw and snapped, beside the argmax.
`--update` stores the choice in the model (`decoding: {count_candidates, count_prior_weight}`), so
`reconstruct`, `generate` and the dashboard decode with it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import model_dataset  # noqa: E402
from report import ROOT, add_data_options, relative, report  # noqa: E402

from crystalae.checkpoint import export_checkpoint, load_checkpoint  # noqa: E402
from crystalae.config import TrainConfig  # noqa: E402
from crystalae.dataset import read_table, table_batches  # noqa: E402
from crystalae.evaluation import evaluate  # noqa: E402
from crystalae.files import write_json  # noqa: E402
from crystalae.metrics import compare  # noqa: E402
from crystalae.readout import CountChoice, decode_latents, density_misfit, outputs_to_structures  # noqa: E402
from crystalae.symmetry import symmetrize  # noqa: E402
from crystalae.units import density_scale  # noqa: E402

PRIOR_WEIGHTS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)


def candidate_records(loaded, table, max_candidates: int, symprec: float | None) -> list[list[dict]]:
    """Per crystal, one record per candidate count (likeliest first): its log-probability, the misfit of
    the crystal read with it, and whether that crystal (snapped with `symprec`, where given) matches."""
    model, voxel = loaded.model, loaded.voxel
    crystals: list[list[dict]] = []
    with torch.no_grad(), tqdm(total=table.num_rows, desc="decoding candidates", unit="crystal") as progress:
        for index, batch in enumerate(table_batches(table, 32)):
            part = table.slice(index * 32, 32)
            truths = [Structure.from_str(cif, fmt="cif") for cif in part.column("cif").to_pylist()]
            mu, _ = model.vae.encode(batch["density"].unsqueeze(1) * density_scale(voxel))
            outputs = decode_latents(model, voxel, mu)
            order = np.argsort(-outputs["count_logp"], axis=1, kind="stable")[:, :max_candidates]
            rows: list[list[dict]] = [[] for _ in truths]
            for k in range(order.shape[1]):
                decoded = outputs_to_structures(model, voxel, {**outputs, "atoms": order[:, k] + 1})
                for i, (p, t) in enumerate(zip(decoded, truths)):
                    if symprec and p is not None:
                        p_scored = symmetrize(p, symprec)
                    else:
                        p_scored = p
                    rows[i].append({"count": int(order[i, k]) + 1, "logp": float(outputs["count_logp"][i, order[i, k]]),
                                    "misfit": None if p is None else density_misfit(p, voxel, outputs["density"][i]),
                                    "match": compare(p_scored, t)["match"], "true_count": len(t)})
            crystals += rows
            progress.update(len(truths))
    return crystals


def grid_rates(crystals: list[list[dict]], max_candidates: int) -> list[dict]:
    """Validation match and count rates of every (candidates, prior weight) pair, from the records."""
    rows = []
    for candidates in range(1, max_candidates + 1):
        for weight in PRIOR_WEIGHTS if candidates > 1 else (CountChoice.prior_weight,):
            picks = []
            for records in crystals:
                usable = [r for r in records[:candidates] if r["misfit"] is not None] or records[:1]
                picks.append(min(usable, key=lambda r: (r["misfit"] or 0.0) - weight * r["logp"]))
            rows.append({"candidates": candidates, "prior_weight": weight,
                         "match_rate": float(np.mean([p["match"] for p in picks])),
                         "atom_count_rate": float(np.mean([p["count"] == p["true_count"] for p in picks]))})
    return rows


def test_figures(loaded, table, choice: CountChoice, symprec: float | None) -> dict:
    """The test split through `evaluate` (the product's path) with `choice`: raw and snapped."""
    cfg = TrainConfig.from_dict({**loaded.meta["train_config"], "eval_limit": table.num_rows})
    figures = evaluate(loaded.model, table, loaded.voxel, cfg, torch.device("cpu"), symprec=symprec, count_choice=choice)
    out = {"match_rate": figures["match_rate"], "rms": figures["rms"], "atom_count_rate": figures["atom_count_rate"]}
    if symprec:
        out |= {"symmetrized_match_rate": figures["symmetrized"]["match_rate"],
                "symmetrized_rms": figures["symmetrized"]["rms"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint folder of a count-head model")
    add_data_options(parser)
    parser.add_argument("--max-candidates", type=int, default=4)
    parser.add_argument("--update", action="store_true", help="store the chosen setting in the model")
    parser.add_argument("--out", type=Path, help="default: bench/results/count_choice_<model>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    loaded = load_checkpoint(args.model)
    if loaded.model.vae.count is None:
        raise SystemExit(f"{args.model}: no count head, so no count to choose")
    symprec = (loaded.meta.get("decoding") or {}).get("symprec")
    data = model_dataset(args.model, args.datasets, args.work)
    started = time.perf_counter()
    val, test = read_table(data, split="val"), read_table(data, split="test")
    grid = grid_rates(candidate_records(loaded, val, args.max_candidates, symprec), args.max_candidates)
    for row in grid:
        print(f"  val {row['candidates']} candidates, prior weight {row['prior_weight']:g}: match {row['match_rate']:.4f}, "
              f"count {row['atom_count_rate']:.4f}", flush=True)
    argmax = grid[0]
    best = max(grid, key=lambda r: (r["match_rate"], -r["candidates"], r["prior_weight"]))
    chosen = CountChoice(best["candidates"], best["prior_weight"]) if best["match_rate"] > argmax["match_rate"] \
        else CountChoice()
    figures = {"model": relative(args.model), "dataset_hash": loaded.meta["dataset_hash"], "symprec": symprec,
               "val_rows": val.num_rows, "test_rows": test.num_rows,
               "choice_rule": "best validation match rate (snapped where the model snaps); the head's argmax "
                              "unless a setting beats it",
               "chosen": {"candidates": chosen.candidates, "prior_weight": chosen.prior_weight},
               "validation": grid,
               "test_argmax": test_figures(loaded, test, CountChoice(), symprec),
               "test_chosen": test_figures(loaded, test, chosen, symprec),
               "seconds": round(time.perf_counter() - started, 1)}
    report(figures, args.out or ROOT / "bench/results" / f"count_choice_{args.model.name}.json", hide=("validation",))
    if args.update:
        store_choice(args.model, figures)


def store_choice(model: Path, figures: dict) -> None:
    """The chosen setting into the model's checkpoint (`decoding`, beside its other settings) and RESULTS.json."""
    decoding = dict(load_checkpoint(model).meta.get("decoding") or {})
    decoding |= {"count_candidates": figures["chosen"]["candidates"],
                 "count_prior_weight": figures["chosen"]["prior_weight"], "count_chosen_by": "bench/count_choice.py"}
    export_checkpoint(model, model, decoding=decoding)
    results_path = model / "RESULTS.json"
    results = json.loads(results_path.read_text())
    results["count_choice"] = {k: figures[k] for k in ("chosen", "test_argmax", "test_chosen", "choice_rule")}
    write_json(results_path, results)
    print(f"rewrote {model}: atom counts chosen among {figures['chosen']['candidates']} candidates")


if __name__ == "__main__":
    main()
