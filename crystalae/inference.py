"""Between the physical grids and the networks: input scaling, species classes, lattice parameters,
and model outputs -> crystals. Shared by training-time evaluation, `reconstruct` and `generate`."""
from __future__ import annotations

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from crystalae.config import VoxelConfig
from crystalae.decode import DecodeError, decode
from crystalae.models import CrystalAE, ModelConfig
from crystalae.voxelize import Density, atom_sigmas, gaussian_norm

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
    """Latents -> physical densities (B, N, N, N), atomic-number labels and lattice parameters."""
    recon = model.vae.decode(z)
    logits = model.segmenter(recon)
    species = np.array((0,) + tuple(model.config.species))
    out = {"density": recon[:, 0].float().cpu().numpy() / density_scale(voxel),
           "labels": species[logits.argmax(1).cpu().numpy()].astype(np.uint8)}
    if model.vae.lattice is not None:
        out["lattice_params"] = model.vae.lattice_params(z).float().cpu().numpy()
    return out


def to_structure(voxel: VoxelConfig, density: np.ndarray, labels: np.ndarray,
                 lattice: np.ndarray, origin: np.ndarray | None = None) -> Structure:
    """A decoded grid -> crystal (raises DecodeError when no atom can be read)."""
    grid = Density(np.maximum(density, 0).astype(np.float32), labels, lattice,
                   np.zeros(3) if origin is None else origin, voxel)
    return decode(grid, species="labels")


def structures_from_outputs(voxel: VoxelConfig, outputs: dict[str, np.ndarray],
                            lattices: np.ndarray | None = None, origins: np.ndarray | None = None
                            ) -> list[Structure | None]:
    """One crystal per decoded grid; lattice from the head (cell) or given (box). None = failed."""
    result = []
    for i in range(len(outputs["density"])):
        if lattices is not None:
            lattice = lattices[i].reshape(3, 3)
        elif "lattice_params" in outputs:
            lattice = lattice_from_params(outputs["lattice_params"][i])
        else:
            raise DecodeError("box models need the input lattice to place atoms")
        try:
            result.append(to_structure(voxel, outputs["density"][i], outputs["labels"][i], lattice,
                                       None if origins is None else origins[i]))
        except DecodeError:
            result.append(None)
    return result


def model_config_for(voxel: VoxelConfig, species: tuple[int, ...], **overrides) -> ModelConfig:
    """ModelConfig matching a dataset: grid, periodicity, classes and lattice head follow the data."""
    return ModelConfig(**{**overrides, "grid": voxel.grid, "periodic": voxel.representation == "cell",
                          "species": tuple(species), "n_classes": len(species) + 1,
                          "lattice_head": voxel.representation == "cell"})
