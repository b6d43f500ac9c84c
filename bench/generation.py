"""Generation by CDVAE's benchmark: validity, coverage (COV-R / COV-P), d_ρ and d_elem of prior samples
against the model's own held-out test crystals, beside real crystals scored the same way.

    python bench/generation.py --model pretrained/perov_5 [--samples 1000] [--update] [--markdown]
    python bench/generation.py --model pretrained/carbon_24 --samples 200 --settings posterior:0.1 --relax

For each way of sampling (the fitted Gaussian at a few temperatures, the aggregate posterior at a few
bandwidths; `crystalae.prior`), `--samples` crystals are decoded and scored (`crystalae.coverage`)
against the test split, and against the validation split for choosing. The baseline row is the
same number of real training crystals. The default temperature is chosen on the validation split: the
highest mean of COV-R and COV-P among settings with structural validity ≥99% and SMACT validity
≥97% (else the highest). `--update` stores that choice (with the training codes the posterior kind
needs) in the model's checkpoint. Writes bench/results/generation_<model>.json and a trade-off plot
generation_<model>.png (coverage and validity against temperature). `--relax` relaxes every sample with
CHGNet first (`crystalae.relax`; ~8 s a small crystal per core, so measure few settings) and writes
generation_<model>_relaxed.json; `--settings KIND:SPREAD ...` measures only those. Samples are
scored as decoded (raw), as `crystalae generate` writes them; `--symprec X` scores them snapped to their
symmetry at X Å (`crystalae.symmetry`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from reconstruction import load_recipe, recipe_dataset, run_dataset  # noqa: E402
from report import lineage_sweep_dir, relative, report  # noqa: E402  (bench/report.py)

from crystalae.checkpoint import export_checkpoint, load_checkpoint, read_checkpoint  # noqa: E402
from crystalae.coverage import COVERAGE_CUTOFFS, Fingerprints, distribution_metrics, fingerprints  # noqa: E402
from crystalae.dataset import config_of, read_manifest, read_table  # noqa: E402
from crystalae.files import write_json  # noqa: E402
from crystalae.generate import decode_to_structures, validity  # noqa: E402
from crystalae.prior import fit_latent_prior, sample_latents  # noqa: E402
from crystalae.symmetry import set_symprec  # noqa: E402

SETTINGS = [("fitted", 1.0), ("fitted", 0.7), ("fitted", 0.5),
            ("posterior", 0.5), ("posterior", 0.3), ("posterior", 0.2), ("posterior", 0.1), ("posterior", 0.05)]


def model_dataset(model: Path, datasets: Path, work: Path) -> Path:
    """The prepared dataset `model` was trained on: found by hash (its sweep's or a run's shards), else
    prepared under `work` from its recipe (a hand recipe, or the sweep trial of its lineage)."""
    payload = read_checkpoint(model)
    try:
        return run_dataset(payload)
    except SystemExit:
        pass
    for manifest in sorted(work.glob("*/manifest.json")):  # prepared here before (by any bench)
        if read_manifest(manifest.parent)["dataset_hash"] == payload["dataset_hash"]:
            return manifest.parent
    lineage = payload.get("lineage")
    if lineage:
        from crystalae.search.layout import SWEEP_FILE
        from crystalae.search.retrain import trial_recipe
        from crystalae.search.sweep import dataset_for

        sweep_dir = Path(lineage_sweep_dir(lineage))
        if not (sweep_dir / SWEEP_FILE).exists():  # a fresh clone: the sweep's committed record
            sweep_dir = ROOT / "search/sweeps" / sweep_dir.name
        recipe = trial_recipe(sweep_dir.parent, f"{sweep_dir.name}/{lineage['trial']}")
        data = Path(dataset_for(recipe["sweep"], recipe["voxel"], work))
    else:
        data, _ = recipe_dataset(load_recipe(model / "recipe.yaml"), datasets, work)
    if config_of(data).as_dict() != payload["voxel_config"]:
        raise SystemExit(f"{data} was voxelized with other settings than {model}")
    if read_manifest(data)["dataset_hash"] != payload["dataset_hash"]:  # same crystals and split, other bytes
        print(f"note: {data} has the model's voxel settings and split but not its dataset hash (shards written "
              "by another crystalae version); its crystals are the same")
    return data


def split_crystals(data: Path, split: str, count: int | None = None, seed: int = 0) -> list:
    """The crystals of one split of a prepared dataset (a random `count` of them, if given)."""
    from pymatgen.core import Structure

    cifs = read_table(data, split=split, columns=["cif"]).column("cif").to_pylist()
    if count is not None and count < len(cifs):
        cifs = [cifs[i] for i in np.random.default_rng(seed).permutation(len(cifs))[:count]]
    return [Structure.from_str(c, fmt="cif") for c in cifs]


def score(name: str, structures: list, fps: Fingerprints, test: Fingerprints, val: Fingerprints,
          cutoffs: tuple[float, float], train_formulas: set[str]) -> dict:
    checks = [validity(s) for s in structures]
    n = max(len(checks), 1)
    formulas = [s.composition.reduced_formula for s, c in zip(structures, checks)
                if s is not None and c["structural_valid"] and c["smact_valid"] is not False]
    val_figures = distribution_metrics(fps, val, cutoffs)
    return {"setting": name, **distribution_metrics(fps, test, cutoffs),
            "structural_validity": sum(c["structural_valid"] for c in checks) / n,
            "smact_validity": None if any(c["smact_valid"] is None for c in checks)
            else sum(c["smact_valid"] for c in checks) / n,
            "pymatgen_composition_validity": sum(c["composition_valid"] for c in checks) / n,
            # the share of valid samples whose formula no training crystal has (sampling near the
            # training codes trades this for coverage)
            "novel_formula_rate": sum(f not in train_formulas for f in formulas) / max(len(formulas), 1),
            "distinct_formulas": len(set(formulas)),
            "val_cov_recall": val_figures["cov_recall"], "val_cov_precision": val_figures["cov_precision"]}


def choose(rows: list[dict]) -> dict:
    """The sampling setting with the best validation coverage among the valid enough ones."""
    def coverage(r):
        return (r["val_cov_recall"] + r["val_cov_precision"]) / 2

    valid = [r for r in rows if r["structural_validity"] >= 0.99 and (r["smact_validity"] or 0) >= 0.97]
    return max(valid or rows, key=coverage)


def plot(rows: list[dict], baseline: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, kind in zip(axes, ("fitted", "posterior")):
        part = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["temperature"])
        x = [r["temperature"] for r in part]
        for key, label, style in (("cov_recall", "COV-R", "o-"), ("cov_precision", "COV-P", "s-"),
                                  ("smact_validity", "SMACT valid", "^--"), ("novel_formula_rate", "new formulas", "x:")):
            ax.plot(x, [r[key] or 0 for r in part], style, label=label)
        for key, color in (("cov_recall", "C0"), ("cov_precision", "C1")):
            ax.axhline(baseline[key], color=color, lw=0.8, alpha=0.6)
        ax.set_xlabel("temperature (the fitted Gaussian's scale)" if kind == "fitted" else "bandwidth around a training code")
        ax.set_title(f"{kind} prior" + (" (lines: real crystals)" if kind == "fitted" else ""))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(figures: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = ["| samples from | struct. valid | SMACT valid | COV-R | COV-P | d_ρ | d_elem | new formulas |",
             "|---|---|---|---|---|---|---|---|"]
    for r in [figures["baseline"], *figures["settings"]]:
        mark = " **(default)**" if r["setting"] == figures["chosen"] else ""
        lines.append(f"| {r['setting']}{mark} | {pct(r['structural_validity'])} | {pct(r['smact_validity'])} | "
                     f"{pct(r['cov_recall'])} | {pct(r['cov_precision'])} | {r['d_rho']:.3f} | {r['d_elem']:.3f} | "
                     f"{pct(r.get('novel_formula_rate'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a shipped model folder")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared/datasets")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench", help="prepared shards")
    parser.add_argument("--dataset-name", help="for CDVAE's cutoffs (default: from the model folder's name)")
    parser.add_argument("--settings", nargs="+", metavar="KIND:SPREAD", help="sampling settings to measure "
                        "(default: " + " ".join(f"{k}:{v:g}" for k, v in SETTINGS) + ")")
    parser.add_argument("--relax", action="store_true", help="relax the samples with CHGNet before scoring")
    parser.add_argument("--update", action="store_true", help="store the chosen prior and temperature in the model")
    parser.add_argument("--markdown", action="store_true", help="print the README table of an earlier run")
    parser.add_argument("--symprec", type=float, help="snap the samples to their symmetry at this tolerance "
                        "in Å (default and 0: the raw decode; crystalae.symmetry)")
    parser.add_argument("--out", type=Path, help="default: bench/results/generation_<model>[_relaxed].json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = args.out or ROOT / "bench/results" / f"generation_{args.model.name}{'_relaxed' if args.relax else ''}.json"
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return

    started = time.perf_counter()
    data = model_dataset(args.model, args.datasets, args.work)
    name = args.dataset_name or args.model.name.split("-")[0]
    cutoffs = COVERAGE_CUTOFFS.get(name, COVERAGE_CUTOFFS["perov_5"])
    loaded = set_symprec(load_checkpoint(args.model), args.symprec)
    loaded.meta["latent_prior"] = fit_latent_prior(loaded, data)  # with the codes the posterior kind samples
    train = split_crystals(data, "train")
    train_formulas = {s.composition.reduced_formula for s in train}
    test, val = fingerprints(split_crystals(data, "test"), desc="test"), fingerprints(split_crystals(data, "val"), desc="val")
    real = [train[i] for i in np.random.default_rng(0).permutation(len(train))[: args.samples]]
    baseline = score(f"real crystals ({len(real)} from train)", real, fingerprints(real, desc="baseline"), test, val,
                     cutoffs, set())
    baseline.pop("novel_formula_rate")
    settings = SETTINGS if not args.settings else [(k, float(v)) for k, _, v in (t.partition(":") for t in args.settings)]
    rows, relaxation = [], None
    for kind, temperature in settings:
        t0 = time.perf_counter()
        structures = decode_to_structures(loaded, sample_latents(loaded, args.samples, seed=0, prior=kind,
                                                                 temperature=temperature))
        if args.relax:
            from crystalae.relax import relax

            structures, relaxation = relax(structures)
        row = score(f"{kind} prior, temperature {temperature:g}", structures,
                    fingerprints(structures, desc=f"{kind} {temperature:g}"), test, val, cutoffs, train_formulas)
        rows.append({**row, "kind": kind, "temperature": temperature, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{row['setting']}: COV-R {row['cov_recall']:.3f} COV-P {row['cov_precision']:.3f} "
              f"SMACT {row['smact_validity']} d_rho {row['d_rho']:.3f}", flush=True)
    chosen = choose(rows)
    figures = {"model": relative(args.model), "dataset_hash": read_manifest(data)["dataset_hash"],
               "samples": args.samples, "reference": f"test split ({len(test)} crystals)", "cutoffs": list(cutoffs),
               "scaler": "crystalae.coverage: random inorganic compositions (not CDVAE's constants)",
               "relaxation": relaxation, "symprec": (loaded.meta.get("decoding") or {}).get("symprec"),
               "chosen": chosen["setting"],
               "choice_rule": "best mean validation COV-R/COV-P with structural >=99% and SMACT >=97%",
               "baseline": baseline, "settings": rows,
               "seconds": round(time.perf_counter() - started, 1)}
    report(figures, out, hide=("settings", "baseline"))
    plot(rows, baseline, out.with_suffix(".png"), f"{args.model.name}: {args.samples} samples vs its test split")
    print(markdown(figures))
    if args.update and not args.relax:
        prior = {**loaded.meta["latent_prior"], "kind": chosen["kind"], "temperature": chosen["temperature"]}
        export_checkpoint(args.model, args.model, latent_prior=prior)
        results_path = args.model / "RESULTS.json"
        results = json.loads(results_path.read_text())
        results["sample_prior"] = (f"{chosen['kind']} prior at temperature {chosen['temperature']:g}, chosen by "
                                   f"`python bench/generation.py --model {relative(args.model)} --update` "
                                   f"({figures['choice_rule']})")
        results["generation"] = {k: chosen[k] for k in ("structural_validity", "smact_validity", "cov_recall",
                                                        "cov_precision", "d_rho", "d_elem", "novel_formula_rate")}
        write_json(results_path, results)
        print(f"rewrote {args.model} with the {chosen['kind']} prior at temperature {chosen['temperature']:g}")


if __name__ == "__main__":
    main()
