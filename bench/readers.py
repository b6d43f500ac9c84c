"""The atom readers side by side on one VAE: species accuracy, atom count, match, RMS and time per epoch.

    python bench/readers.py --model pretrained/perov_5 --readers pretrained/perov_5-segmenter runs/bench/runs/X/checkpoint_...

Rows, all on the test split of the model's own dataset, decoding the same VAE's reconstructions:
the model as shipped (its own reader, trained with the VAE), the fitted peak height of the density as
the species (`species_from: density`, no learning: how much the density alone says), and each
`--readers` checkpoint, a reader trained on that model's fixed VAE (`train.init_from` + `reader_only`;
bench/recipes/perov_5-segmenter-reader.yaml is the paper's segmenter). Time per epoch is the median of
each run's recorded training epochs (a reader alone skips the VAE's backward pass).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import model_dataset  # noqa: E402
from report import ROOT, add_data_options, relative, report  # noqa: E402

from crystalae.checkpoint import load_checkpoint  # noqa: E402
from crystalae.config import TrainConfig  # noqa: E402
from crystalae.dataset import read_table  # noqa: E402
from crystalae.evaluation import evaluate  # noqa: E402
from crystalae.models import CrystalAE  # noqa: E402
from crystalae.readout import CountChoice  # noqa: E402

PATHS = {"site": "site head", "segmenter": "segmenter", "density": "fitted peak height"}


def row(label: str, model, loaded, test, history: list[dict] | None) -> dict:
    """One reader's test figures (the model's own decoding settings) and its run's time per epoch."""
    started = time.perf_counter()
    figures = evaluate(model, test, loaded.voxel, TrainConfig(eval_limit=test.num_rows, batch_size=32), torch.device("cpu"),
                       count_choice=CountChoice.of(loaded.meta.get("decoding")))
    seconds = [h["epoch_seconds"] for h in history or [] if isinstance(h.get("epoch_seconds"), (int, float))]
    out = {"reader": label, "species_from": model.config.species_from, "seg_features": model.config.seg_features,
           "test_species_accuracy": figures["species_accuracy"], "test_atom_count_rate": figures["atom_count_rate"],
           "test_match_rate": figures["match_rate"], "test_rms": figures["rms"],
           "reader_parameters": sum(p.numel() for name, p in model.named_parameters() if not name.startswith("vae.")),
           "epochs": len(seconds), "seconds_per_epoch": round(float(np.median(seconds)), 1) if seconds else None,
           "decode_seconds": round(time.perf_counter() - started, 1)}
    print(f"  {label}: species {out['test_species_accuracy']:.4f}, match {out['test_match_rate']:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the model whose VAE every reader reads")
    parser.add_argument("--readers", type=Path, nargs="*", default=[], help="checkpoints of readers trained on it")
    add_data_options(parser)
    parser.add_argument("--out", type=Path, help="default: bench/results/readers_<model>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    loaded = load_checkpoint(args.model)
    test = read_table(model_dataset(args.model, args.datasets, args.work), split="test")
    own = PATHS[loaded.model_config.species_from]
    rows = [row(f"{own}, trained with the VAE ({relative(args.model)})", loaded.model, loaded, test, loaded.meta.get("history"))]
    density = CrystalAE(replace(loaded.model_config, species_from="density"))
    density.vae.load_state_dict(loaded.model.vae.state_dict())
    rows.append(row("fitted peak height of the reconstructed density (no learning)", density.eval(), loaded, test, None))
    for path in args.readers:
        reader = load_checkpoint(path)
        if not (reader.meta.get("train_config") or {}).get("reader_only"):
            raise SystemExit(f"{path}: not a reader trained on {args.model}'s VAE (train.reader_only)")
        name = PATHS[reader.model_config.species_from] + (" + decoder features" if reader.model_config.seg_features else "")
        rows.append(row(f"{name}, trained alone on the fixed VAE ({relative(path)})", reader.model, loaded, test,
                        reader.meta.get("history")))
    print("| reader | species acc | atom count | match | RMS | s / epoch (epochs) |\n|---|---|---|---|---|---|")
    for r in rows:
        rms = "–" if r["test_rms"] is None else f"{r['test_rms']:.4f}"
        epochs = "–" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:g} ({r['epochs']})"
        print(f"| {r['reader']} | {100 * r['test_species_accuracy']:.1f}% | {100 * r['test_atom_count_rate']:.1f}% | "
              f"{100 * r['test_match_rate']:.1f}% | {rms} | {epochs} |")
    report({"model": relative(args.model), "dataset_hash": loaded.meta["dataset_hash"], "test_rows": test.num_rows,
            "rows": rows}, args.out or ROOT / "bench/results" / f"readers_{args.model.name}.json", hide=("rows",))


if __name__ == "__main__":
    main()
