"""Physical quantities in the networks' units and back: the density scale, species classes and the
normalised lattice parameters the lattice head predicts."""
from __future__ import annotations

import numpy as np
import torch
from pymatgen.core import Lattice

from crystalae.config import VoxelConfig
from crystalae.voxelize import atom_sigmas, gaussian_norm

__all__ = ["class_lookup", "density_scale", "lattice_from_params", "lattice_targets"]

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
