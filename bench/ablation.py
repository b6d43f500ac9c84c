"""Species-path ablation: each recipe of bench/recipes/ trained and scored by bench/reconstruction.py
(same data, split, model and budget; only `species_from` differs), then one Markdown table.

    python bench/ablation.py                 # run what has no result yet, then write the table
    python bench/ablation.py --table-only    # rebuild bench/results/ablation.md from the results

Rows come from bench/results/reconstruction_<recipe>.json: held-out test split figures.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PATHS = {"site": "site head (latent + decoder features)", "segmenter": "segmenter on reconstruction (paper)",
         "density": "fitted peak weight, dataset elements"}


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(results: list[dict]) -> str:
    lines = ["| dataset | species path | epochs | species acc | atom count | match | RMS | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rms = "–" if r["test_rms"] is None else f"{r['test_rms']:.4f}"
        lines.append(f"| {Path(r['dataset'][0]).parent.name} | {PATHS.get(r['species_from'], r['species_from'])} | "
                     f"{r['epochs_trained']} | {pct(r['test_species_accuracy'])} | {pct(r['test_atom_count_rate'])} | "
                     f"{pct(r['test_match_rate'])} | {rms} | {r['train_seconds'] / 60:.0f} min |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("recipes", nargs="*", type=Path, help="default: bench/recipes/*.yaml")
    args = parser.parse_args()
    recipes = args.recipes or sorted((BENCH / "recipes").glob("*.yaml"))
    results = []
    for recipe in recipes:
        out = BENCH / "results" / f"reconstruction_{recipe.stem}.json"
        if not out.exists() and not args.table_only:
            subprocess.run([sys.executable, str(BENCH / "reconstruction.py"), "--recipe", str(recipe), "--out", str(out)],
                           check=True)
        if out.exists():
            results.append(json.loads(out.read_text()))
    text = table(results)
    (BENCH / "results" / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
