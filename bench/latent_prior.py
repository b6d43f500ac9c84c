"""Prior samples from a shipped model: N(0, I) against a Gaussian fitted to its training latents.

    python bench/latent_prior.py --model pretrained/perov_5 [--samples 200] [--update]

Prepares the model's dataset from its recipe (the same split as training), fits the latent prior on
the train split, and checks CDVAE validity (structural: all distances > 0.5 Å; composition: charge
neutral) of the same number of samples from each prior (and the fitted one at lower spreads, with the
number of distinct formulas as a diversity check), seeds and decoder identical. With `--update`
the shipped checkpoint is rewritten with the fitted prior (weights unchanged) and its RESULTS.json
gets the new sample figures. Writes bench/results/latent_prior_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from reconstruction import load_recipe, recipe_dataset  # noqa: E402
from report import report  # noqa: E402  (bench/report.py)

from crystalae.checkpoint import export_checkpoint, load_checkpoint  # noqa: E402
from crystalae.dataset import read_manifest  # noqa: E402
from crystalae.files import write_json  # noqa: E402
from crystalae.generate import sample, validity  # noqa: E402
from crystalae.prior import fit_latent_prior  # noqa: E402


def rates(structures) -> dict[str, float]:
    checks = [validity(s) for s in structures]
    n = max(len(checks), 1)
    return {"structural_validity": sum(c["structural_valid"] for c in checks) / n,
            "composition_validity": sum(c["composition_valid"] for c in checks) / n,
            "decoded": sum(s is not None for s in structures) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a shipped model folder with recipe.yaml")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared/datasets")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--update", action="store_true", help="rewrite the model with the fitted prior")
    parser.add_argument("--temperature", type=float, default=1.0, choices=(1.0, 0.8, 0.6),
                        help="with --update: the default sampling spread stored with the prior (one of those measured)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    data, _ = recipe_dataset(load_recipe(args.model / "recipe.yaml"), args.datasets, args.work)
    loaded = load_checkpoint(args.model)
    if read_manifest(data)["dataset_hash"] != loaded.meta["dataset_hash"]:
        raise SystemExit(f"{data} is not the dataset {args.model} was trained on (dataset hash differs)")

    started = time.perf_counter()
    loaded.meta["latent_prior"] = fit_latent_prior(loaded, data)
    fit_seconds = time.perf_counter() - started
    figures = {"model": str(args.model), "samples": args.samples, "fit_seconds": round(fit_seconds, 1),
               "fit_crystals": loaded.meta["latent_prior"]["count"]}
    # the baseline (N(0, I), what sampling did before) and the fitted prior at a few spreads, same seeds
    for prior, temperature in (("normal", 1.0), ("fitted", 1.0), ("fitted", 0.8), ("fitted", 0.6)):
        started = time.perf_counter()
        structures = sample(loaded, args.samples, seed=0, prior=prior, temperature=temperature)
        formulas = {s.composition.reduced_formula for s in structures if s is not None}
        figures[prior if temperature == 1.0 else f"{prior}_t{temperature}"] = {
            **rates(structures), "distinct_formulas": len(formulas), "seconds": round(time.perf_counter() - started, 1)}
    figures["structural_ratio"] = figures["fitted"]["structural_validity"] / max(figures["normal"]["structural_validity"], 1e-9)
    report(figures, ROOT / "bench/results" / f"latent_prior_{args.model.name}.json")
    if args.update:
        chosen = figures["fitted" if args.temperature == 1.0 else f"fitted_t{args.temperature}"]
        export_checkpoint(args.model, args.model,
                          latent_prior={**loaded.meta["latent_prior"], "temperature": args.temperature})
        results_path = args.model / "RESULTS.json"
        results = json.loads(results_path.read_text())
        results.update({
            "sample_prior": f"fitted (full-covariance Gaussian on the train split's latent means), "
                            f"temperature {args.temperature}: `python bench/latent_prior.py --model "
                            f"{args.model} --update --temperature {args.temperature}`",
            "sample_prior_figures": {k: v for k, v in figures.items() if isinstance(v, dict)},
            "sample_structural_validity": chosen["structural_validity"],
            "sample_composition_validity": chosen["composition_validity"],
            "sample_structural_validity_normal_prior": figures["normal"]["structural_validity"],
            "sample_composition_validity_normal_prior": figures["normal"]["composition_validity"],
        })
        write_json(results_path, results)
        print(f"rewrote {args.model} with the fitted prior")


if __name__ == "__main__":
    main()
