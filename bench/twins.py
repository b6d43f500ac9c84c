"""Which test crystals have a twin in the training split: the same crystal under the matcher that scores
reconstruction (StructureMatcher stol 0.5, ltol 0.3, angle_tol 10), so a match on them may be recall.

    python bench/twins.py --recipe bench/recipes/carbon_24-hand.yaml    # ~20-40 min on one core

carbon_24 is known to hold many duplicate structures (arXiv:2509.12178). `bench/reconstruction.py`
reads the result (`bench/results/twins_<dataset>.json`, keyed by the dataset hash) and reports the match
rate on the test crystals that have no twin. Pairs are compared only where the reduced formula and the
number of atoms of the primitive cell agree (the matcher reduces both to primitive cells and compares
them site for site, so other pairs cannot match); each test crystal stops at its first twin. Resumable:
finished test crystals are kept in `--work` and skipped when rerun.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

from pymatgen.core import Structure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reconstruction import load_recipe, recipe_dataset  # noqa: E402
from report import ROOT, add_data_options, relative, report  # noqa: E402

from crystalae.dataset import read_manifest, read_table  # noqa: E402
from crystalae.files import write_json  # noqa: E402
from crystalae.metrics import structure_matcher  # noqa: E402


def primitive_key(structure: Structure) -> tuple[str, int]:
    """What two crystals must share to match: reduced formula and primitive-cell size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        primitive = structure.get_primitive_structure()
    return structure.composition.reduced_formula, len(primitive)


def find_twins(test: dict[str, Structure], train: dict[str, Structure], done: dict[str, str | None],
               save) -> dict[str, str | None]:
    """For each test id, the id of one training crystal the matcher calls the same (None: no twin).
    `done` holds results already found; `save(done)` is called as results come."""
    by_key: dict[tuple[str, int], list[str]] = defaultdict(list)
    for name, structure in tqdm(train.items(), desc="train primitive cells", unit="crystal"):
        by_key[primitive_key(structure)].append(name)
    matcher = structure_matcher()
    for index, (name, structure) in enumerate(tqdm(test.items(), desc="test crystals", unit="crystal")):
        if name in done:
            continue
        twin = None
        for candidate in by_key.get(primitive_key(structure), []):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if matcher.fit(structure, train[candidate]):
                    twin = candidate
                    break
        done[name] = twin
        if index % 10 == 0:
            save(done)
    save(done)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, required=True, help="a bench recipe naming the dataset and split")
    add_data_options(parser)
    parser.add_argument("--out", type=Path, help="default: bench/results/twins_<dataset>.json")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    data, _ = recipe_dataset(recipe, args.datasets, args.work)
    digest = read_manifest(data)["dataset_hash"]
    partial = args.work / f"twins_{recipe['dataset']}_{digest[:12]}.json"
    done = json.loads(partial.read_text()) if partial.exists() else {}

    def crystals(split: str) -> dict[str, Structure]:
        table = read_table(data, split=split, columns=["material_id", "cif"])
        return {m: Structure.from_str(c, fmt="cif") for m, c in
                zip(table.column("material_id").to_pylist(), table.column("cif").to_pylist())}

    started = time.perf_counter()
    twins = find_twins(crystals("test"), crystals("train"), done, lambda d: write_json(partial, d))
    with_twin = sorted(m for m, t in twins.items() if t is not None)
    figures = {"recipe": relative(args.recipe), "dataset_hash": digest, "test_rows": len(twins),
               "with_twin": len(with_twin), "twin_fraction": len(with_twin) / max(len(twins), 1),
               "seconds_this_run": round(time.perf_counter() - started, 1),
               "matcher": "StructureMatcher(stol=0.5, ltol=0.3, angle_tol=10)", "twins": {m: twins[m] for m in with_twin}}
    report(figures, args.out or ROOT / "bench/results" / f"twins_{recipe['dataset']}.json", hide=("twins",))


if __name__ == "__main__":
    main()
