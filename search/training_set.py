"""A model's training crystals, found in the sweep storage (a sweep keeps the datasets its trials trained
on): what `generate` scores novelty against."""
from __future__ import annotations

from pathlib import Path

from pymatgen.core import Composition

from crystalae.checkpoint import LoadedModel
from crystalae.dataset import read_table
from crystalae.generate import TrainingSet
from crystalae.locations import SWEEPS
from crystalae.search.layout import find_sweeps, is_sweep, sweep_dataset

__all__ = ["training_set"]


def training_set(loaded: LoadedModel, sweeps: str | Path = SWEEPS) -> TrainingSet:
    """The model's training crystals: the train split of the prepared dataset with the checkpoint's dataset
    hash, looked for in the sweep its lineage names and in every sweep under `sweeps` (a sweep keeps the
    datasets its trials trained on). Where none is found the set is empty and says so, rather than guess
    from a source that may have been prepared otherwise."""
    wanted = loaded.meta.get("dataset_hash")
    if not wanted:
        return TrainingSet(None, "novelty not computed: the checkpoint records no dataset hash")
    lineage = loaded.meta.get("lineage") or {}
    named = [lineage["sweep_dir"]] if lineage.get("sweep_dir") else []  # a retrained trial's own sweep
    for root in [*named, *find_sweeps(sweeps)]:
        data = sweep_dataset(root, wanted) if is_sweep(root) else None
        if data is not None:
            table = read_table(data, split="train", columns=["composition", "cif"])
            cifs: dict[str, list[str]] = {}
            for formula, cif in zip(table.column("composition").to_pylist(), table.column("cif").to_pylist()):
                cifs.setdefault(Composition(formula).reduced_formula, []).append(cif)
            return TrainingSet(cifs, f"against the {table.num_rows} training crystals of dataset {data}")
    where = " or ".join(str(x) for x in [*named, sweeps])
    return TrainingSet(None, f"novelty not computed: the training set (dataset {wanted[:12]}) is not prepared "
                             f"in {where}")
