"""Augmentation of training batches (cell grids): exact whole-voxel periodic shifts, lattice-vector
permutations (the same crystal, its axes in another order), and element
substitution within shared oxidation states, re-voxelized, so species are read from peak heights
rather than recalled from element combinations. `TrainConfig.shift`, `.permute_axes` and `.substitute`
switch them.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import torch

from crystalae.config import TrainConfig, VoxelConfig
from crystalae.voxelize import voxelize_arrays

__all__ = ["augment", "substitutes"]


@lru_cache(maxsize=8)
def substitutes(species: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """For each element, the dataset elements sharing a common oxidation state (itself included)."""
    from pymatgen.core import Element

    states = {z: set(Element.from_Z(z).common_oxidation_states) for z in species}
    return {z: tuple(w for w in species if w == z or states[z] & states[w]) for z in species}


def augment(batch: dict[str, torch.Tensor], cfg: TrainConfig, voxel: VoxelConfig, species: tuple[int, ...],
            rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Element substitution (re-voxelized), exact periodic shifts and lattice-vector permutations of a
    training batch (cell grids)."""
    if voxel.representation != "cell" or "sites" not in batch:
        return batch
    batch = dict(batch)
    sites = batch["sites"].clone()
    choices = substitutes(species)
    if cfg.substitute > 0 and any(len(c) > 1 for c in choices.values()):
        density, labels = batch["density"].clone(), batch["labels"].clone()
        for i in np.nonzero(rng.random(len(sites)) < cfg.substitute)[0]:
            z = sites[i, :, 3].numpy().astype(int)
            n = int((z > 0).sum())
            mapping = {e: int(rng.choice(choices.get(e, (e,)))) for e in set(z[:n].tolist())}
            new_z = np.array([mapping[e] for e in z[:n]])
            grid = voxelize_arrays(batch["lattice"][i].numpy().reshape(3, 3), sites[i, :n, :3].double().numpy(),
                                   new_z, voxel)
            density[i], labels[i] = torch.from_numpy(grid.values), torch.from_numpy(grid.labels)
            sites[i, :n, 3] = torch.from_numpy(new_z).float()
        batch["density"], batch["labels"] = density, labels
    if cfg.shift:
        n = voxel.grid
        density, labels = batch["density"].clone(), batch["labels"].clone()
        for i, s in enumerate(rng.integers(0, n, size=(len(sites), 3))):
            shift = tuple(int(v) for v in s)
            density[i] = torch.roll(density[i], shift, dims=(0, 1, 2))
            labels[i] = torch.roll(labels[i], shift, dims=(0, 1, 2))
            sites[i, :, :3] = torch.remainder(sites[i, :, :3] + torch.tensor(s, dtype=sites.dtype) / n, 1.0)
        batch["density"], batch["labels"] = density, labels
    if cfg.permute_axes:
        density, labels, lattice = batch["density"].clone(), batch["labels"].clone(), batch["lattice"].clone()
        for i, k in enumerate(rng.integers(0, len(_PERMUTATIONS), size=len(sites))):
            order = _PERMUTATIONS[k]
            density[i] = density[i].permute(order).clone()
            labels[i] = labels[i].permute(order).clone()
            lattice[i] = lattice[i].reshape(3, 3)[list(order)].reshape(-1)
            sites[i, :, :3] = sites[i, :, list(order)].clone()
        batch["density"], batch["labels"], batch["lattice"] = density, labels, lattice
    batch["sites"] = sites
    return batch


# grid axis k of a cell grid runs along lattice vector k: permuting both describes the same crystal
_PERMUTATIONS = tuple(itertools.permutations(range(3)))
