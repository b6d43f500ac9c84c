"""The Python API: load a model once, then encode, decode, reconstruct, sample and interpolate crystals.

    import crystalae
    model = crystalae.load("perov_5")            # a shipped name, a checkpoint folder, NAME@3 or an alias
    rebuilt = model.reconstruct(structures)      # pymatgen Structures, ASE Atoms or file paths
    new = model.sample(10, seed=0)

Structures in, structures out: every method takes pymatgen `Structure`s (or ASE `Atoms`, or paths of
files crystalae reads: CIF, POSCAR, JSON, a CDVAE CSV, a folder) and returns `Structure`s, with None
where a latent decodes to no crystal.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from pymatgen.core import Structure

from crystalae.checkpoint import LoadedModel
from crystalae.config import GENERATE_DEFAULTS as DEFAULTS
from crystalae.config import check_finite, check_whole
from crystalae.generate import (
    alter,
    decode_to_structures,
    encode,
    interpolate,
    sample,
)
from crystalae.loading import load_model
from crystalae.reconstruct import reconstruct_densities, unknown_elements
from crystalae.sources import StructureError, check_structure, list_entries, load_structure, reduce_cell
from crystalae.voxelize import Density, VoxelizeError, voxelize

if TYPE_CHECKING:  # ASE is optional: named for type checkers, not imported
    from ase import Atoms

__all__ = ["CrystalModel", "StructureLike", "load", "as_structures"]

log = logging.getLogger(__name__)

# what every method takes as a crystal: a pymatgen Structure, ASE Atoms, or the path of a file or folder of them
StructureLike = Union[Structure, "Atoms", str, Path]  # noqa: UP007 (a string member cannot take part in X | Y)


def load(ref: str | Path, registry: str | Path | None = None, device: str | None = None,
         symprec: float | None = None) -> CrystalModel:
    """A model ready to use, from `ref`: a checkpoint folder or `checkpoint.pt` file, a shipped model's
    name (`"perov_5"`, `"carbon_24"`; see `crystalae models`), or a registry reference (`NAME`, `NAME@3`,
    an alias such as `champion`) in `registry` (default `runs/registry`, or an `s3://` URI): the same
    references as `crystalae generate --model` (`crystalae.loading`).

    `device` defaults to CUDA when available. `symprec` (Å) snaps decoded crystals to their symmetry
    (`crystalae.symmetry`; 0: the raw decode; default: the model's own setting). Raises `LookupError`
    when `ref` names nothing, `crystalae.checkpoint.CheckpointError` when the file is not a usable
    checkpoint.
    """
    return CrystalModel(load_model(ref, registry, device=device, symprec=symprec), str(ref))


def as_structures(items: StructureLike | Iterable[StructureLike]) -> list[Structure]:
    """pymatgen Structures from Structures, ASE Atoms (through pymatgen's adaptor) or paths; a path
    that holds several crystals (a CSV, a folder) gives them all, in order. A single item may be
    passed bare. Raises `crystalae.sources.StructureError` naming an item that cannot be read."""
    if isinstance(items, (Structure, str, Path)) or _is_atoms(items):
        items = [items]
    elif not isinstance(items, Iterable):
        raise TypeError(f"expected a pymatgen Structure, ASE Atoms, a path or a list of them, got {type(items).__name__}")
    structures = []
    for k, item in enumerate(items):
        if isinstance(item, Structure):
            structures.append(item)
        elif _is_atoms(item):
            from pymatgen.io.ase import AseAtomsAdaptor

            structures.append(AseAtomsAdaptor.get_structure(item))
        elif isinstance(item, (str, Path)):
            for entry in list_entries(item):
                try:
                    structures.append(load_structure(entry))
                except StructureError as exc:  # named by the path given and the entry in it
                    raise StructureError(f"{item}: {entry.material_id}: {exc}") from None
        else:
            raise TypeError(f"item {k}: expected a pymatgen Structure, ASE Atoms or a path, got {type(item).__name__}")
    return structures


def _is_atoms(item: Any) -> bool:
    # ASE is optional: recognise its Atoms by type name rather than importing it
    return any(cls.__name__ == "Atoms" and cls.__module__.startswith("ase") for cls in type(item).__mro__)


class CrystalModel:
    """A trained crystalae model with the operations a user wants, in crystals.

    `loaded` (a `crystalae.checkpoint.LoadedModel`) gives the network, its voxel settings and the
    checkpoint's metadata, for anything below this surface.
    """

    def __init__(self, loaded: LoadedModel, ref: str = ""):
        self.loaded = loaded
        self.ref = ref
        loaded.model.eval()

    def __repr__(self) -> str:
        config = self.loaded.model_config
        return (f"CrystalModel({self.ref!r}, latent_dim={config.latent_dim}, grid={self.loaded.voxel.grid}, "
                f"sigma={self.loaded.voxel.sigma})")

    @property
    def latent_dim(self) -> int:
        """Length of one latent vector."""
        return self.loaded.model_config.latent_dim

    @property
    def can_generate(self) -> bool:
        """Whether latents alone decode to crystals (cell models; box models need the input's lattice)."""
        return self.loaded.model.vae.lattice is not None

    def densities(self, structures: StructureLike | Iterable[StructureLike]) -> list[Density]:
        """The model's own voxel densities of `structures` (its grid, sigma and cell reduction).

        Raises `crystalae.sources.StructureError` naming the first structure that cannot be used
        (too many atoms, atoms closer than 0.5 Å, elements outside the model's range).
        """
        voxel = self.loaded.voxel
        out = []
        for k, structure in enumerate(as_structures(structures)):
            try:
                check_structure(structure)
                unknown = unknown_elements(self.loaded, structure)
                if unknown:
                    raise StructureError(f"elements {', '.join(unknown)} were never in this model's training data")
                reduced = reduce_cell(structure, voxel.reduce)
                out.append(voxelize(reduced, voxel, np.eye(3)))  # as given: no augmentation rotation
            except (StructureError, VoxelizeError) as exc:
                raise StructureError(f"structure {k} ({structure.composition.reduced_formula}): {exc}") from None
        return out

    @torch.no_grad()
    def encode(self, structures: StructureLike | Iterable[StructureLike]) -> np.ndarray:
        """Posterior means, an array (n, latent_dim), of `structures`."""
        densities = self.densities(structures)
        return np.concatenate([encode(self.loaded, densities[i : i + 64]).float().cpu().numpy()
                               for i in range(0, len(densities), 64)]) if densities else np.zeros((0, self.latent_dim))

    def decode(self, latents: np.ndarray | torch.Tensor | Sequence[Sequence[float]]) -> list[Structure | None]:
        """Crystals from latents (n, latent_dim); None where a latent decodes to no atoms or an
        impossible cell. Raises ValueError for a box model, which needs the input's lattice."""
        return decode_to_structures(self.loaded, self._latents(latents))

    def reconstruct(self, structures: StructureLike | Iterable[StructureLike]) -> list[Structure | None]:
        """Each structure encoded and decoded again (what `crystalae reconstruct` scores)."""
        return reconstruct_densities(self.loaded, self.densities(structures))

    def sample(self, n: int, seed: int = DEFAULTS.seed, temperature: float | None = None,
               prior: str = "auto") -> list[Structure | None]:
        """`n` new crystals from the latent prior stored with the model (see `crystalae.prior.PRIORS`);
        `temperature` scales its noise (None: the one stored with it). The same `seed` gives the same
        crystals (as `crystalae generate --seed`). Raises ValueError for a negative or fractional `n`,
        and for a model without a fitted prior unless `prior="normal"` (the message names
        `crystalae fit-prior`)."""
        return sample(self.loaded, n, seed, prior, temperature)

    def interpolate(self, a: StructureLike, b: StructureLike,
                    steps: int = DEFAULTS.interpolate_steps) -> list[Structure | None]:
        """`steps` crystals decoded along the straight line between the latents of `a` and `b`."""
        steps = check_whole(steps, "steps", 2, 1000)  # as `generate --steps`
        first, second = self.densities([*as_structures(a)[:1], *as_structures(b)[:1]])
        return interpolate(self.loaded, first, second, steps)

    def alter(self, structure: StructureLike, scale: float = DEFAULTS.alter_scale, count: int = DEFAULTS.alter_count,
              seed: int = DEFAULTS.seed, *, n: int | None = None) -> list[Structure | None]:
        """`count` variants of `structure`: its latent moved by `scale` times unit Gaussian noise (`n` is
        the old name of `count`, read until 1.0)."""
        if n is not None:
            warnings.warn("CrystalModel.alter(n=...) is now alter(count=...)", DeprecationWarning, stacklevel=2)
            count = n
        count = check_whole(count, "count", 0, 10_000)  # as `generate --count` (0: none)
        scale = check_finite(scale, "scale", 0, 100)  # as `generate --scale`
        seed = check_whole(seed, "seed", 0, 2**63 - 1)
        if count == 0:
            return []
        return alter(self.loaded, self.densities(as_structures(structure)[:1])[0], scale, count, seed)

    def _latents(self, latents: Any) -> torch.Tensor:
        z = torch.as_tensor(np.asarray(latents, dtype=np.float32))
        if z.numel() == 0 and z.ndim <= 2:  # no latents ([], an (0, d) array): no crystals
            z = z.reshape(0, self.latent_dim)
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"latents must have shape (n, {self.latent_dim}), got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("latents must be finite numbers")
        return z.to(next(self.loaded.model.parameters()).device)
