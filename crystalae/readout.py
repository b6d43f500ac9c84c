"""Decoder outputs -> crystals: latents decoded to densities, lattices and counts (`decode_latents`),
read out as atoms with their species (`outputs_to_structures`), by density peaks and the site head or
the segmenter, as the model's `species_from` says."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pymatgen.core import Structure

from crystalae.config import VoxelConfig
from crystalae.decode import DecodeError, decode
from crystalae.models import CrystalAE
from crystalae.symmetry import decoding_symprec, symmetrize
from crystalae.units import density_scale, lattice_from_params
from crystalae.voxelize import Density, VoxelizeError, atom_sigmas, gaussian_norm, voxelize

if TYPE_CHECKING:
    from crystalae.checkpoint import LoadedModel

__all__ = ["CountChoice", "check_decodable", "decode_latents", "decoding_options", "density_misfit",
           "outputs_to_structures", "site_classes"]


@dataclass(frozen=True)
class CountChoice:
    """How a count-head model picks each crystal's number of atoms when decoding: each of the head's
    `candidates` most likely counts is read out, and the crystal kept is the one whose own density
    (voxelized on the decoded lattice) misfits the decoded density least (`density_misfit`), less
    `prior_weight` times the count's log-probability. `candidates=1` is the head's most likely count.

    A model stores its choice under `decoding` (`count_candidates`, `count_prior_weight`), chosen on
    its validation split by `bench/count_choice.py`; a blurred density whose peaks merged can look like
    fewer atoms to the head, but a crystal with too few atoms leaves density unexplained."""

    candidates: int = 1
    prior_weight: float = 0.003

    @classmethod
    def of(cls, decoding: dict[str, Any] | None) -> CountChoice:
        """The choice a model's `decoding` settings store (the head's argmax where they store none)."""
        decoding = decoding or {}
        return cls(int(decoding.get("count_candidates") or 1),
                   float(decoding.get("count_prior_weight", cls.prior_weight)))


@torch.no_grad()
def decode_latents(model: CrystalAE, voxel: VoxelConfig, z: torch.Tensor) -> dict[str, np.ndarray]:
    """Latents -> physical densities (B, N, N, N), lattice parameters, the latents themselves and,
    for segmenter models, atomic-number label grids."""
    recon, features = model.vae.decode_features(z)
    out = {"density": recon[:, 0].float().cpu().numpy() / density_scale(voxel), "latent": z.float().cpu().numpy()}
    if model.segmenter is not None:
        species = np.array((0,) + tuple(model.config.species))
        logits = model.segmenter(model.segmenter_input(recon, features))
        out["labels"] = species[logits.argmax(1).cpu().numpy()].astype(np.uint8)
    if model.vae.lattice is not None:
        out["lattice_params"] = model.vae.lattice_params(z).float().cpu().numpy()
    if model.vae.count is not None:
        logits = model.vae.count(z)
        out["atoms"] = (logits.argmax(1) + 1).cpu().numpy()
        out["count_logp"] = torch.log_softmax(logits.float(), 1).cpu().numpy()  # column k: k + 1 atoms
    return out


def density_misfit(structure: Structure, voxel: VoxelConfig, density: np.ndarray) -> float:
    """Relative squared error between `structure` voxelized (on its own lattice) and a decoded density
    grid: 0 when the atoms explain the density exactly."""
    target = np.maximum(density, 0)
    return float(((voxelize(structure, voxel).values - target) ** 2).sum() / max(float((target**2).sum()), 1e-30))


def _chosen_count(model: CrystalAE, voxel: VoxelConfig, outputs: dict[str, np.ndarray], i: int, lattice: np.ndarray,
                  labels: np.ndarray | None, choice: CountChoice) -> Structure:
    """Crystal `i` read with each candidate count, the best by `choice` (DecodeError if none decodes)."""
    logp = outputs["count_logp"][i]
    best, best_cost = None, np.inf
    for column in np.argsort(-logp, kind="stable")[:choice.candidates]:
        try:
            structure = _to_structure(model, voxel, outputs["density"][i], labels, outputs["latent"][i], lattice,
                                      atoms=int(column) + 1)
            misfit = density_misfit(structure, voxel, outputs["density"][i])
        except (DecodeError, VoxelizeError):
            continue
        cost = misfit - choice.prior_weight * float(logp[column])
        if cost < best_cost:
            best, best_cost = structure, cost
    if best is None:
        raise DecodeError(f"no crystal could be read with any of the {choice.candidates} likeliest atom counts")
    return best


def _to_structure(model: CrystalAE, voxel: VoxelConfig, density: np.ndarray, labels: np.ndarray | None,
                 latent: np.ndarray, lattice: np.ndarray, origin: np.ndarray | None = None,
                 atoms: int | None = None) -> Structure:
    """One decoded grid -> crystal, species as the model's `species_from` says (DecodeError if no atom).
    atoms: how many atoms to read (a count head's prediction); None = one per density peak."""
    grid = Density(np.maximum(density, 0).astype(np.float32), labels, lattice,
                   np.zeros(3) if origin is None else origin, voxel)
    mode = model.config.species_from
    # A learned density has small ripples: a peak must reach half that of the lightest element the
    # model knows, and a noisy grid cannot flood the decoder with peaks.
    lightest = min(model.config.species)
    limits = {"min_height": 0.5 * lightest * float(gaussian_norm(atom_sigmas(np.array([lightest]), voxel))[0]),
              "max_peaks": 2 * voxel.max_atoms, "atoms": atoms,
              **({"iterations": 30} if atoms else {})}  # atoms walking out of a merged blob take more rounds
    if mode == "segmenter":
        return decode(grid, species_source="labels", **limits)
    structure = decode(grid, species_source="density", elements=model.config.species, **limits)
    if mode == "density":
        return structure
    return _assign_sites(model, latent, structure, keep_all=atoms is not None)


@torch.no_grad()
def site_classes(model: CrystalAE, latent: np.ndarray, frac: np.ndarray, empty: bool = True) -> np.ndarray:
    """Site-head class (0 = no atom, k = species[k - 1]) of each fractional position; with
    `empty=False` the most likely species, never 0."""
    device = next(model.parameters()).device
    z = torch.as_tensor(latent, dtype=torch.float32, device=device)[None]
    f = torch.as_tensor(np.mod(frac, 1.0), dtype=torch.float32, device=device)[None]
    features = model.vae.decode_features(z)[1] if model.config.site_features else None
    first = 0 if empty else 1  # class 0 is "no atom here"
    return (model.site_head(z, f, features)[..., first:-1].argmax(-1)[0] + first).cpu().numpy()


def _assign_sites(model: CrystalAE, latent: np.ndarray, structure: Structure, keep_all: bool = False) -> Structure:
    """Species of the decoded atoms from the site head; atoms it calls empty are dropped, unless
    `keep_all` (the atom count is already decided): then each gets its most likely species."""
    classes = site_classes(model, latent, structure.frac_coords, empty=not keep_all)
    keep = classes > 0
    if not keep.any():
        raise DecodeError("the site head assigned no species to any density peak")
    species = [int(model.config.species[c - 1]) for c in classes[keep]]
    return Structure(structure.lattice, species, structure.frac_coords[keep])


def outputs_to_structures(model: CrystalAE, voxel: VoxelConfig, outputs: dict[str, np.ndarray],
                            lattices: np.ndarray | None = None, origins: np.ndarray | None = None,
                            symprec: float | None = None, count_choice: CountChoice | None = None
                            ) -> list[Structure | None]:
    """One crystal per decoded grid; lattice from the head (cell) or given (box). None = failed.
    symprec: snap each crystal to the space group it has within this many Å (`crystalae.symmetry`).
    count_choice: how a count-head model picks the atom count (default: the head's most likely)."""
    if symprec:
        return [None if s is None else symmetrize(s, symprec)
                for s in outputs_to_structures(model, voxel, outputs, lattices, origins, count_choice=count_choice)]
    choosing = count_choice is not None and count_choice.candidates > 1 and "count_logp" in outputs
    result = []
    for i in range(len(outputs["density"])):
        if lattices is not None:
            lattice = lattices[i].reshape(3, 3)
        elif "lattice_params" in outputs:
            lattice = lattice_from_params(outputs["lattice_params"][i])
        else:
            raise DecodeError("box models need the input lattice to place atoms")
        labels = outputs["labels"][i] if "labels" in outputs else None
        try:
            if choosing:
                result.append(_chosen_count(model, voxel, outputs, i, lattice, labels, count_choice))
                continue
            atoms = int(outputs["atoms"][i]) if "atoms" in outputs else None
            result.append(_to_structure(model, voxel, outputs["density"][i], labels, outputs["latent"][i], lattice,
                                       None if origins is None else origins[i], atoms))
        except DecodeError:
            result.append(None)
    return result


def check_decodable(loaded: LoadedModel, densities: list | None) -> None:
    """Refuse a box model without the input densities: it carries no lattice, so it can reconstruct
    crystals but not generate them (ValueError)."""
    if loaded.model.vae.lattice is None and densities is None:
        raise ValueError("this model uses the box representation, which carries no lattice: "
                         "it can reconstruct but not generate crystals; train on the cell representation")


def decoding_options(loaded: LoadedModel, densities: list | None = None, reconstructing: bool = False
                     ) -> dict[str, Any]:
    """`outputs_to_structures`'s keyword arguments for a loaded model: box models take lattice and
    origin from the input `densities`; crystals are snapped to their symmetry as
    `crystalae.symmetry.decoding_symprec` says (a reconstruction, `reconstructing`, at the model's
    tolerance chosen on validation, a sample raw, either at the user's tolerance where one was set)."""
    check_decodable(loaded, densities)
    options: dict[str, Any] = {"symprec": decoding_symprec(loaded, reconstructing),
                               "count_choice": CountChoice.of(loaded.meta.get("decoding"))}
    if loaded.model.vae.lattice is None:
        options |= {"lattices": np.stack([d.lattice for d in densities]),
                    "origins": np.stack([d.origin for d in densities])}
    return options
