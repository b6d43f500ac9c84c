"""Learned reconstruction on our own split of a shared dataset: train (resumable), score on held-out
crystals, sample from the prior, optionally export the model as a shipped reference checkpoint.

    python bench/reconstruction.py --recipe pretrained/perov_5/recipe.yaml --export pretrained/perov_5
    python bench/reconstruction.py --recipe bench/recipes/perov_5-segmenter.yaml --out bench/results/x.json
    python bench/reconstruction.py --run runs/train/perov_5-TRIAL --export pretrained/perov_5
    python bench/reconstruction.py --run runs/train/carbon_24-final --select full-val --export /tmp/carbon_24

`--run` scores (and exports) a finished training run instead, e.g. a sweep winner retrained by
`crystalae train --from-trial`: its dataset is the one its checkpoints name (found among the sweep's
and the run's prepared datasets by hash), and its lineage goes into RESULTS.json.

A recipe YAML holds `dataset` (a folder of ../shared/datasets), `files` (its CSVs, read as one source),
`voxel` (VoxelConfig fields), `split` (val/test fractions: a hash of material_id, stable across runs),
`train` (TrainConfig), `model` (ModelConfig overrides), `samples` (prior samples to check) and, for a
model a sweep found (pretrained/*/recipe.yaml), `lineage` (its sweep, config and trial; a record only).
Rerunning the same recipe resumes training from its last checkpoint. Reported on the test split:
StructureMatcher match rate and RMS (stol 0.5, ltol 0.3, angle_tol 10), per-atom species accuracy,
atom-count rate, and CDVAE validity of prior samples; plus the wall time to every validation match rate.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from report import lineage_sweep_dir, relative, report  # noqa: E402  (bench/report.py)

from crystalae.checkpoint import export_checkpoint, load_checkpoint, read_checkpoint  # noqa: E402
from crystalae.config import TrainConfig, VoxelConfig  # noqa: E402
from crystalae.dataset import read_manifest, read_table  # noqa: E402
from crystalae.evaluation import evaluate  # noqa: E402
from crystalae.files import read_yaml_mapping, write_json  # noqa: E402
from crystalae.generate import sample, validity  # noqa: E402
from crystalae.loading import load_model  # noqa: E402
from crystalae.prior import fit_latent_prior  # noqa: E402
from crystalae.readout import CountChoice  # noqa: E402
from crystalae.shards import PrepareOptions, prepare_dataset  # noqa: E402
from crystalae.training import best_checkpoint_path, train  # noqa: E402

RECIPE_KEYS = {"dataset", "files", "voxel", "split", "train", "model", "samples", "lineage"}


def load_recipe(path: Path) -> dict:
    recipe = read_yaml_mapping(path, "--recipe")
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise SystemExit(f"{path}: unknown recipe keys {sorted(unknown)} (allowed: {sorted(RECIPE_KEYS)})")
    return recipe


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path)
    parser.add_argument("--run", type=Path, help="score a finished training run folder instead of a recipe")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared/datasets")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench", help="shards and training runs")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--export", type=Path, help="write the trained model here as a reference checkpoint")
    parser.add_argument("--out", type=Path, help="JSON of the figures (default: bench/results/<recipe>.json)")
    parser.add_argument("--select", choices=("history", "full-val"), default="history",
                        help="which kept checkpoint of --run to score: the best validation score its history "
                             "recorded (on eval_limit crystals), or the best match rate on the whole validation split")
    parser.add_argument("--score-only", action="store_true",
                        help="train no further: score (and export) the best checkpoint of the run as it stands")
    args = parser.parse_args()
    if (args.recipe is None) == (args.run is None):
        parser.error("give --recipe (train, then score) or --run (score a finished run)")
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    job = finished_run(args) if args.run is not None else recipe_run(args)
    job["prepare_seconds"] = time.perf_counter() - started
    if args.run is None:  # a recipe: train it (or take its run as it stands)
        job["best"], job["last"] = trained(args, job)
    figures, loaded = score(args, job)
    out = args.out or ROOT / "bench/results" / f"reconstruction_{job['name']}.json"
    report(figures, out, hide=("history", "test_per_element_accuracy"))
    if args.export:
        export(args, job["best"], figures, latent_prior=loaded.meta.get("latent_prior") if args.run else
               base_prior(job["best"]))


def finished_run(args: argparse.Namespace) -> dict:
    """What --run scores: its best kept checkpoint (by the chosen rule) and the dataset it trained on."""
    best, last = run_checkpoints(args.run)
    selection = None
    if args.select == "full-val":
        best, selection = select_on_validation(args.run)
    payload = read_checkpoint(best)
    return {"recipe": {"samples": 200, "train": payload["train_config"]}, "name": args.run.name,
            "data": run_dataset(payload), "sources": [], "voxel": VoxelConfig.from_dict(payload["voxel_config"]),
            "best": best, "last": last, "selection": selection}


def recipe_run(args: argparse.Namespace) -> dict:
    """What --recipe trains: its dataset, prepared once under --work."""
    recipe = load_recipe(args.recipe)
    data, sources = recipe_dataset(recipe, args.datasets, args.work)
    return {"recipe": recipe, "name": args.recipe.stem if args.recipe.stem != "recipe" else args.recipe.parent.name,
            "data": data, "sources": sources, "voxel": VoxelConfig.from_dict(recipe.get("voxel") or {}),
            "selection": None}


def train_config(args: argparse.Namespace, recipe: dict) -> TrainConfig:
    return TrainConfig.from_dict({**(recipe.get("train") or {}), **({"use_gpu": True} if args.gpu else {})})


def trained(args: argparse.Namespace, job: dict) -> tuple[str, int]:
    """(best checkpoint, epochs run) of the recipe's run: trained (or resumed) here, or as it stands."""
    if args.score_only:
        return run_checkpoints(args.work / "runs" / job["name"])
    cfg = train_config(args, job["recipe"])
    result = train(job["data"], cfg, job["recipe"].get("model") or {}, storage=args.work / "runs", name=job["name"])
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    return best_checkpoint_path(result), read_checkpoint(result.checkpoint.path)["epoch"] + 1


def score(args: argparse.Namespace, job: dict):
    """The figures of the job's best checkpoint on the test split, and the loaded model."""
    best, data, recipe = job["best"], job["data"], job["recipe"]
    cfg = train_config(args, recipe)
    payload = read_checkpoint(best)
    history = payload.get("history") or []
    device = torch.device("cuda" if args.gpu and torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(best, device=device)
    if args.run is not None and loaded.meta.get("latent_prior") is None:  # sample where the decoder was trained
        loaded.meta["latent_prior"] = fit_latent_prior(loaded, data)
    test = read_table(data, split="test")
    symprec = (loaded.meta.get("decoding") or {}).get("symprec")
    metrics = evaluate(loaded.model, test, loaded.voxel, TrainConfig(**{**cfg.as_dict(), "eval_limit": test.num_rows}),
                       device, symprec=symprec, records=True, count_choice=CountChoice.of(loaded.meta.get("decoding")))
    count = int(recipe.get("samples", 200))
    valid = [validity(s) for s in sample(loaded, count, seed=0)] if count else []  # samples: 0 needs no prior
    train_seconds = sum(h.get("epoch_seconds", 0) + h.get("eval_seconds", 0) for h in history)
    figures = {
        "recipe": relative(args.recipe) if args.recipe else None, "run": relative(args.run) if args.run else None,
        "lineage": {**lineage, "sweep_dir": relative(lineage["sweep_dir"])} if (lineage := payload.get("lineage")) else None,
        "dataset": [relative(s) for s in job["sources"]],
        "dataset_hash": read_manifest(data)["dataset_hash"], "species_from": loaded.model_config.species_from,
        "grid": job["voxel"].grid, "sigma": job["voxel"].sigma, "epochs_trained": payload["epoch"] + 1,
        "epochs_run": job["last"], "epochs_scheduled": cfg.epochs, "seed": cfg.seed,
        "train_rows": read_table(data, split="train", columns=["split"]).num_rows, "test_rows": test.num_rows,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "test_match_rate": metrics["match_rate"], "test_rms": metrics["rms"],
        # CDVAE's protocol: a match counts only if the reconstruction is structurally and SMACT-valid
        "test_valid_match_rate": metrics["valid_match_rate"],
        "test_species_accuracy": metrics["species_accuracy"], "test_atom_count_rate": metrics["atom_count_rate"],
        "test_score": metrics["score"], "test_density_mse": metrics["density_mse"],
        "test_per_element_accuracy": metrics["per_element_accuracy"],
        # the model's own decoding setting: crystals snapped to their symmetry, beside the raw figures
        "test_symmetrized": metrics.get("symmetrized"),
        "test_breakdown": breakdown(metrics["records"], test, read_manifest(data)["dataset_hash"]),
        "prior_samples": count,
        "sample_structural_validity": sum(v["structural_valid"] for v in valid) / count if count else None,
        "sample_composition_validity": sum(v["composition_valid"] for v in valid) / count if count else None,
        "sample_composition_validity_smact": None if not count or any(v["smact_valid"] is None for v in valid)
        else sum(v["smact_valid"] for v in valid) / count,
        # training time as recorded per epoch by the run (all resumed pieces together), and the
        # validation curve against it: when each validation match rate was first reached
        "train_seconds": round(train_seconds, 1), "prepare_seconds": round(job["prepare_seconds"], 1),
        "time_to_val_match": time_to_match(history), "device": str(device),
        "checkpoint_selection": job["selection"] or "best validation score in the run's history",
        "history": [{k: h.get(k) for k in ("epoch", "epoch_seconds", "lr", "train_loss", "val_loss", "val_match_rate",
                                          "val_species_accuracy", "val_atom_count_rate", "val_score")} for h in history],
    }
    return figures, loaded


def base_prior(best: str):
    """A new reader on another model's fixed VAE (`train.reader_only`) samples from that model's prior:
    the same VAE, so the same latent space. None for any other run."""
    train_config = read_checkpoint(best)["train_config"]
    if not train_config.get("reader_only"):
        return None
    return load_model(train_config["init_from"]).meta.get("latent_prior")


def export(args: argparse.Namespace, best: str, figures: dict, latent_prior) -> None:
    """The scored checkpoint as a reference model folder, with its recipe and RESULTS.json."""
    export_checkpoint(best, args.export, latent_prior=latent_prior)
    if args.recipe and args.recipe.resolve() != (args.export / "recipe.yaml").resolve():
        shutil.copyfile(args.recipe, args.export / "recipe.yaml")
    given = f"--recipe {relative(args.recipe)}" if args.recipe else f"--run {relative(args.run)} --select {args.select}"
    command = f"python bench/reconstruction.py {given} --export {relative(args.export)}"
    write_json(args.export / "RESULTS.json", {"command": command, **figures})  # atomic: temp file + rename
    print(f"exported {best} -> {args.export}")


def select_on_validation(folder: Path) -> tuple[str, dict]:
    """The kept checkpoint of a run with the best match rate on its whole validation split (the run's
    history scores only `eval_limit` of them, too few to tell close checkpoints apart)."""
    scored = {}
    for path in sorted(folder.glob("checkpoint_*/")):
        payload = read_checkpoint(path)
        loaded = load_checkpoint(path)
        val = read_table(run_dataset(payload), split="val")
        cfg = TrainConfig.from_dict({**payload["train_config"], "eval_limit": val.num_rows})
        figures = evaluate(loaded.model, val, loaded.voxel, cfg, torch.device("cpu"))
        scored[str(path)] = {"epoch": payload["epoch"], "val_rows": val.num_rows,
                             "val_match_rate": figures["match_rate"], "val_rms": figures["rms"]}
        print(f"  epoch {payload['epoch']}: validation match {figures['match_rate']:.4f} on {val.num_rows}", flush=True)
    best = max(scored, key=lambda p: (scored[p]["val_match_rate"], scored[p]["epoch"]))
    return best, {"rule": "best match rate on the whole validation split",
                  "checkpoints": {relative(Path(p)): v for p, v in scored.items()}}


def run_checkpoints(folder: Path) -> tuple[str, int]:
    """(best checkpoint by validation score, epochs run) of a training run folder, e.g. one stopped early."""
    scored = []
    for path in folder.glob("checkpoint_*/"):
        payload = read_checkpoint(path)
        scored.append(((payload.get("history") or [{}])[-1].get("val_score") or 0.0, payload["epoch"] + 1, str(path)))
    if not scored:
        raise SystemExit(f"{folder}: no checkpoint to score (train first: run without --score-only)")
    return max(scored)[2], max(epochs for _, epochs, _ in scored)


def run_dataset(payload: dict) -> Path:
    """The prepared dataset a run's checkpoint was trained on: its sweep's shards (lineage) or the ones
    `train --from-trial` prepared beside the run, found by the dataset hash."""
    from crystalae.search.layout import sweep_dataset

    lineage = payload.get("lineage") or {}
    for root in (lineage_sweep_dir(lineage), *(str(p.parents[2]) for p in ROOT.glob("runs/*/datasets/*/manifest.json"))):
        found = sweep_dataset(root, payload["dataset_hash"]) if root else None
        if found is not None:
            return Path(found)
    raise SystemExit(f"no prepared dataset with hash {payload['dataset_hash'][:12]} in the run's sweep or under runs/")


def recipe_dataset(recipe: dict, datasets: Path, work: Path) -> tuple[Path, list[str]]:
    """The recipe's dataset, prepared once under `work` (a folder per dataset, voxel settings and split),
    and the source files it was prepared from."""
    sources = [str(datasets / recipe["dataset"] / f) for f in recipe.get("files", ["val.csv", "extra.csv"])]
    voxel = VoxelConfig.from_dict(recipe.get("voxel") or {})
    split = recipe.get("split") or {}
    options = PrepareOptions(val_fraction=split.get("val_fraction", 0.1), test_fraction=split.get("test_fraction", 0.1))
    key = hashlib.sha256(json.dumps([recipe["dataset"], voxel.as_dict(), split], sort_keys=True).encode()).hexdigest()[:10]
    data = work / f"{recipe['dataset']}-{key}"
    prepare_dataset(sources, data, voxel, options)
    return data, sources


SIZE_BINS = ((1, 8), (9, 16), (17, 24), (25, 10_000))


def breakdown(records: list[dict], test, dataset_hash: str) -> dict:
    """Where reconstruction fails: the match rate by atoms per cell and by the true crystal's crystal
    system, and on the test crystals with no StructureMatcher twin in the training split (from
    `bench/twins.py`, when its result for this dataset exists)."""
    from pymatgen.core import Structure

    from crystalae.symmetry import crystal_system

    systems = [crystal_system(Structure.from_str(c, fmt="cif")) for c in test.column("cif").to_pylist()]
    by_size = {f"{lo}-{hi}" if hi < 10_000 else f"{lo}+": [r for r in records if lo <= r["n_atoms"] <= hi]
               for lo, hi in SIZE_BINS}
    by_system = {name: [r for r, s in zip(records, systems) if s == name] for name in sorted(set(systems))}
    result = {"by_atoms": _rates(by_size), "by_crystal_system": _rates(by_system)}
    for twins_file in sorted((ROOT / "bench/results").glob("twins_*.json")):
        found = json.loads(twins_file.read_text())
        if found.get("dataset_hash") == dataset_hash:
            result["twins"] = {"source": relative(twins_file), **_rates({
                "with a training twin": [r for r in records if r["material_id"] in found["twins"]],
                "no training twin": [r for r in records if r["material_id"] not in found["twins"]]})}
    return result


def _rates(groups: dict[str, list[dict]]) -> dict[str, dict]:
    """Per group: crystals, raw match rate and (where scored) the symmetrized one."""
    out = {}
    for name, group in groups.items():
        if not group:
            continue
        row = {"crystals": len(group), "match_rate": sum(r["match"] for r in group) / len(group)}
        if "symmetrized_match" in group[0]:
            row["symmetrized_match_rate"] = sum(r["symmetrized_match"] for r in group) / len(group)
        out[name] = row
    return out


def time_to_match(history: list[dict]) -> dict[str, float]:
    """Cumulative training seconds at which the validation match rate first reached 50/75/90/95%."""
    reached, elapsed = {}, 0.0
    for h in history:
        elapsed += h.get("epoch_seconds", 0) + h.get("eval_seconds", 0)
        for level in (0.5, 0.75, 0.9, 0.95):
            if f"{level:.0%}" not in reached and (h.get("val_match_rate") or 0) >= level:
                reached[f"{level:.0%}"] = round(elapsed, 1)
    return reached


if __name__ == "__main__":
    main()
