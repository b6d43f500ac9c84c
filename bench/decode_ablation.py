"""What limits a trained model's match rate: one checkpoint, its recipe's test split, decoded several ways.

    python bench/decode_ablation.py --model pretrained/carbon_24 [--limit 351] [--out JSON]

Every row decodes the same latents (the encoder's means) and differs only in what the decoder is
given: the model's own predictions (the shipped path; also snapped to symmetry with the model's
tolerance, where it has one), atoms read one per density peak instead of
the count head's number, or the true atom count and/or the true lattice in place of the heads'
predictions. The oracle rows are not results: they bound what a better count or lattice head would
give, so they say where the next lever is. Scored like `bench/reconstruction.py` (StructureMatcher
stol 0.5, ltol 0.3, angle_tol 10; match rate, RMS over matches, atom-count rate).
"""
from __future__ import annotations

import argparse
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
from reconstruction import load_recipe, recipe_dataset  # noqa: E402
from report import ROOT, add_data_options, relative, report  # noqa: E402

from crystalae.checkpoint import load_checkpoint  # noqa: E402
from crystalae.dataset import column_numpy, read_table, table_batches  # noqa: E402
from crystalae.metrics import compare, summarize  # noqa: E402
from crystalae.readout import CountChoice, decode_latents, outputs_to_structures  # noqa: E402
from crystalae.symmetry import symmetrize  # noqa: E402
from crystalae.units import density_scale  # noqa: E402

# row name -> (atom count: "model" | "chosen" | "peaks" | "true", lattice: "model" | "true", snapped to symmetry);
# "model" is the count head's most likely count, "chosen" the model's stored `CountChoice` (its default)
ROWS = {
    "the model's own heads": ("model", "model", False),
    "the model's own heads, symmetrized": ("model", "model", True),
    "count chosen by density fit": ("chosen", "model", False),
    "count chosen by density fit, symmetrized": ("chosen", "model", True),
    "count chosen by density fit, true lattice (oracle)": ("chosen", "true", False),
    "one atom per density peak": ("peaks", "model", False),
    "true atom count": ("true", "model", False),
    "true lattice": ("model", "true", False),
    "true atom count and lattice": ("true", "true", False),
}


def decode_rows(model, voxel, table, symprec: float | None, count_choice: CountChoice, batch_size: int = 32
                ) -> dict[str, list[dict]]:
    """Per row, one `compare` record per crystal of `table`; `symprec`: the model's snapping tolerance
    (None: no symmetrized row); `count_choice`: the model's (no "chosen" rows when it takes the argmax)."""
    has_count = model.vae.count is not None
    choosing = has_count and count_choice.candidates > 1
    # without a count head the model's own count is one atom per peak: that row would repeat
    rows = {name: spec for name, spec in ROWS.items() if (has_count or spec[0] != "peaks") and (symprec or not spec[2])
            and (choosing or spec[0] != "chosen")}
    records: dict[str, list[dict]] = {name: [] for name in rows}
    with torch.no_grad(), tqdm(total=table.num_rows, desc="decoding", unit="crystal") as progress:
        for index, batch in enumerate(table_batches(table, batch_size)):
            part = table.slice(index * batch_size, batch_size)
            truths = [Structure.from_str(cif, fmt="cif") for cif in part.column("cif").to_pylist()]
            mu, _ = model.vae.encode(batch["density"].unsqueeze(1) * density_scale(voxel))
            outputs = decode_latents(model, voxel, mu)
            lattices = column_numpy(part, "lattice")
            raw: dict[tuple[str, str], list] = {}  # a snapped row snaps the raw row's crystals, not a new decode
            for name, (count, lattice, snapped) in rows.items():
                if (count, lattice) not in raw:
                    variant = dict(outputs)
                    variant.pop("atoms", None)
                    if count == "model" and has_count:
                        variant["atoms"] = outputs["atoms"]
                    elif count == "true":
                        variant["atoms"] = np.array([len(t) for t in truths])
                    raw[count, lattice] = outputs_to_structures(
                        model, voxel, variant, lattices if lattice == "true" else None,
                        count_choice=count_choice if count == "chosen" else None)
                decoded = raw[count, lattice]
                if snapped:
                    decoded = [None if p is None else symmetrize(p, symprec) for p in decoded]
                records[name] += [compare(p, t) for p, t in zip(decoded, truths)]
            progress.update(len(truths))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint folder with its recipe.yaml")
    parser.add_argument("--recipe", type=Path, help="a bench recipe for the model's dataset (default: found by "
                        "the model's dataset hash, or prepared from its lineage)")
    add_data_options(parser)
    parser.add_argument("--limit", type=int, help="first N test crystals (default: all)")
    parser.add_argument("--out", type=Path, help="default: bench/results/decode_ablation_<model>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    if args.recipe:
        data, _ = recipe_dataset(load_recipe(args.recipe), args.datasets, args.work)
    else:
        data = model_dataset(args.model, args.datasets, args.work)
    loaded = load_checkpoint(args.model)
    loaded.model.eval()
    test = read_table(data, split="test")
    test = test.slice(0, args.limit or test.num_rows)
    started = time.perf_counter()
    decoding = loaded.meta.get("decoding") or {}
    records = decode_rows(loaded.model, loaded.voxel, test, decoding.get("symprec"), CountChoice.of(decoding))
    rows = []
    for name, recs in records.items():
        summary = summarize(recs)
        rows.append({"decoder": name, "match_rate": summary["match_rate"], "rms": summary["mean_rms"],
                     "atom_count_rate": summary["atom_count_accuracy"]})
    print("| decoder | match | RMS | atom count |\n|---|---|---|---|")
    for r in rows:
        rms = "–" if r["rms"] is None else f"{r['rms']:.4f}"
        print(f"| {r['decoder']} | {100 * r['match_rate']:.1f}% | {rms} | {100 * r['atom_count_rate']:.1f}% |")
    figures = {"model": relative(args.model), "recipe": relative(args.recipe) if args.recipe else None,
               "test_rows": test.num_rows, "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    report(figures, args.out or ROOT / "bench/results" / f"decode_ablation_{args.model.name}.json", hide=("rows",))


if __name__ == "__main__":
    main()
