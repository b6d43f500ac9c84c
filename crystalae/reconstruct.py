"""Between the physical grids and the networks: input scaling, species classes, lattice parameters,
model outputs -> crystals, and `evaluate`, which scores those crystals against the originals. Shared
by training-time validation, `reconstruct` and `generate`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from pymatgen.core import Lattice, Structure

from crystalae.config import VoxelConfig
from crystalae.dataset import column_numpy, table_batches
from crystalae.decode import DecodeError, decode
from crystalae.metrics import compare, reconstruction_score, site_confusion, summarize
from crystalae.models import CrystalAE, ModelConfig
from crystalae.symmetry import symmetrize
from crystalae.voxelize import Density, atom_sigmas, gaussian_norm

if TYPE_CHECKING:
    from crystalae.training import TrainConfig

__all__ = [
    "ANGLE_SCALE", "LENGTH_SCALE", "assign_sites", "class_lookup", "decode_latents", "density_scale", "evaluate",
    "lattice_from_params", "lattice_targets", "model_config_for", "site_classes", "structures_from_outputs",
    "to_structure",
]

LENGTH_SCALE = 10.0  # Å: lattice lengths are predicted as a / 10
ANGLE_SCALE = 90.0  # degrees


def density_scale(voxel: VoxelConfig) -> float:
    """Multiply e/Å^3 by this to get network units, where a Z = 10 atom peaks at 1."""
    return float(1.0 / (10.0 * gaussian_norm(atom_sigmas(np.array([10]), voxel))[0]))


def class_lookup(species: tuple[int, ...]) -> torch.Tensor:
    """(256,) tensor mapping atomic number -> class index (0 = background)."""
    lut = torch.zeros(256, dtype=torch.long)
    for k, z in enumerate(species):
        lut[z] = k + 1
    return lut


def lattice_targets(lattice_rows: torch.Tensor) -> torch.Tensor:
    """(B, 9) lattice matrices -> (B, 6) normalised (a, b, c, alpha, beta, gamma)."""
    m = lattice_rows.reshape(-1, 3, 3).double()
    lengths = m.norm(dim=2)
    cos = torch.stack([(m[:, 1] * m[:, 2]).sum(1) / (lengths[:, 1] * lengths[:, 2]),
                       (m[:, 0] * m[:, 2]).sum(1) / (lengths[:, 0] * lengths[:, 2]),
                       (m[:, 0] * m[:, 1]).sum(1) / (lengths[:, 0] * lengths[:, 1])], dim=1)
    angles = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    return torch.cat([lengths / LENGTH_SCALE, angles / ANGLE_SCALE], dim=1).float()


def lattice_from_params(params: np.ndarray) -> np.ndarray:
    """Normalised (a, b, c, alpha, beta, gamma) -> lattice rows; angles that cannot close a cell give
    a degenerate (NaN or flat) matrix, which `decode` rejects with a DecodeError."""
    a, b, c = np.clip(np.nan_to_num(params[:3]) * LENGTH_SCALE, 1.0, None)
    alpha, beta, gamma = np.clip(np.nan_to_num(params[3:]) * ANGLE_SCALE, 30.0, 150.0)
    with np.errstate(invalid="ignore"):
        return Lattice.from_parameters(a, b, c, alpha, beta, gamma).matrix


@torch.no_grad()
def decode_latents(model: CrystalAE, voxel: VoxelConfig, z: torch.Tensor) -> dict[str, np.ndarray]:
    """Latents -> physical densities (B, N, N, N), lattice parameters, the latents themselves and,
    for segmenter models, atomic-number label grids."""
    recon = model.vae.decode(z)
    out = {"density": recon[:, 0].float().cpu().numpy() / density_scale(voxel), "latent": z.float().cpu().numpy()}
    if model.segmenter is not None:
        species = np.array((0,) + tuple(model.config.species))
        out["labels"] = species[model.segmenter(recon).argmax(1).cpu().numpy()].astype(np.uint8)
    if model.vae.lattice is not None:
        out["lattice_params"] = model.vae.lattice_params(z).float().cpu().numpy()
    if model.vae.count is not None:
        out["atoms"] = model.vae.atom_counts(z).cpu().numpy()
    return out


def to_structure(model: CrystalAE, voxel: VoxelConfig, density: np.ndarray, labels: np.ndarray | None,
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
        return decode(grid, species_from="labels", **limits)
    structure = decode(grid, species_from="density", elements=model.config.species, **limits)
    if mode == "density":
        return structure
    return assign_sites(model, latent, structure, keep_all=atoms is not None)


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


def assign_sites(model: CrystalAE, latent: np.ndarray, structure: Structure, keep_all: bool = False) -> Structure:
    """Species of the decoded atoms from the site head; atoms it calls empty are dropped, unless
    `keep_all` (the atom count is already decided): then each gets its most likely species."""
    classes = site_classes(model, latent, structure.frac_coords, empty=not keep_all)
    keep = classes > 0
    if not keep.any():
        raise DecodeError("the site head assigned no species to any density peak")
    species = [int(model.config.species[c - 1]) for c in classes[keep]]
    return Structure(structure.lattice, species, structure.frac_coords[keep])


def structures_from_outputs(model: CrystalAE, voxel: VoxelConfig, outputs: dict[str, np.ndarray],
                            lattices: np.ndarray | None = None, origins: np.ndarray | None = None,
                            symprec: float | None = None) -> list[Structure | None]:
    """One crystal per decoded grid; lattice from the head (cell) or given (box). None = failed.
    symprec: snap each crystal to the space group it has within this many Å (`crystalae.symmetry`)."""
    if symprec:
        return [None if s is None else symmetrize(s, symprec)
                for s in structures_from_outputs(model, voxel, outputs, lattices, origins)]
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
            atoms = int(outputs["atoms"][i]) if "atoms" in outputs else None
            result.append(to_structure(model, voxel, outputs["density"][i], labels, outputs["latent"][i], lattice,
                                       None if origins is None else origins[i], atoms))
        except DecodeError:
            result.append(None)
    return result


def model_config_for(voxel: VoxelConfig, species: tuple[int, ...], **overrides) -> ModelConfig:
    """ModelConfig matching a dataset: grid, periodicity, classes and lattice head follow the data."""
    if voxel.representation != "cell":
        overrides.setdefault("species_from", "segmenter")  # the site head reads fractional positions
    return ModelConfig(**{**overrides, "grid": voxel.grid, "periodic": voxel.representation == "cell",
                          "species": tuple(species), "n_classes": len(species) + 1, "max_atoms": voxel.max_atoms,
                          "lattice_head": voxel.representation == "cell"})


@torch.no_grad()
def evaluate(model: CrystalAE, table, voxel: VoxelConfig, cfg: TrainConfig, device: torch.device,
             symprec: float | None = None, records: bool = False) -> dict[str, Any]:
    """End to end on the first `eval_limit` crystals (encode -> decode -> atoms -> species): match
    rate, RMS, atom-count rate, per-atom species accuracy and confusion, density MSE, and the score.

    symprec: also score the decoded crystals snapped to their symmetry within this many Å (the
    "symmetrized" entry: match rate, RMS, CDVAE's valid match rate); the other figures stay raw.
    records: also return one `compare` record per crystal ("records"), with its material id and atom
    count (and "symmetrized_match" where snapped), for breakdowns by size or crystal system.
    """
    model.eval()
    scale, species = density_scale(voxel), (0,) + tuple(model.config.species)
    confusion = np.zeros((len(species), len(species)), dtype=np.int64)
    mse_sum, per_crystal, snapped = 0.0, [], []
    table = table.slice(0, min(table.num_rows, cfg.eval_limit))
    for batch_index, batch in enumerate(table_batches(table, cfg.batch_size)):
        part = table.slice(batch_index * cfg.batch_size, cfg.batch_size)
        x = batch["density"].unsqueeze(1).to(device) * scale
        mu, _ = model.vae.encode(x)
        outputs = decode_latents(model, voxel, mu)
        recon = torch.from_numpy(outputs["density"]).to(x.device)[:, None] * scale
        mse_sum += float(F.mse_loss(recon, x, reduction="sum")) / x[0].numel()
        lattices = None if model.vae.lattice is not None else batch["lattice"].numpy()
        origins = None if lattices is None else column_numpy(part, "origin")
        for i, p in enumerate(structures_from_outputs(model, voxel, outputs, lattices, origins)):
            true = Structure.from_str(part.column("cif")[i].as_py(), fmt="cif")
            per_crystal.append({**compare(p, true), "material_id": part.column("material_id")[i].as_py(),
                                "n_atoms": len(true)})
            confusion += site_confusion(p, true, tuple(model.config.species))
            if symprec:
                snapped.append(compare(None if p is None else symmetrize(p, symprec), true))
    atoms = confusion.sum()
    per_element = {int(species[k]): float(confusion[k, k] / confusion[k].sum())
                   for k in range(1, len(species)) if confusion[k].sum() > 0}
    summary = summarize(per_crystal)
    species_accuracy = float(np.trace(confusion) / atoms) if atoms else None
    extra: dict[str, Any] = {}
    if symprec:
        snapped_summary = summarize(snapped)
        extra["symmetrized"] = {"symprec": symprec, "match_rate": snapped_summary["match_rate"],
                                "rms": snapped_summary["mean_rms"],
                                "valid_match_rate": snapped_summary["valid_match_rate"]}
        for record, snap in zip(per_crystal, snapped):
            record["symmetrized_match"] = snap["match"]
    if records:
        extra["records"] = per_crystal
    return extra | {
        "density_mse": mse_sum / max(table.num_rows, 1),
        "species_accuracy": species_accuracy,
        "atom_count_rate": summary["atom_count_accuracy"],
        "match_rate": summary["match_rate"],
        "rms": summary["mean_rms"],
        "recovery": summary["mean_recovery"],
        "valid_match_rate": summary["valid_match_rate"],  # CDVAE's protocol (None without SMACT)
        "score": reconstruction_score(summary["match_rate"], species_accuracy, summary["atom_count_accuracy"]),
        "per_element_accuracy": per_element,
        "confusion": confusion.tolist(),
        "confusion_species": list(species),
    }
