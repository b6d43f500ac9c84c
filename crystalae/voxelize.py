"""Crystal -> density grid (sum of Z-weighted normalised Gaussians) plus per-voxel species labels.

Two geometries share one grid convention: voxel index i sits at Cartesian `i @ step + voxel_offset`.
- `cell`: step = lattice / N, offset 0, periodic (index i is fractional coordinate i / N).
- `box`: step = (box / N) * I, offset = half a voxel (voxel centres), not periodic.
Densities are in electrons / Å^3, so `values.sum() * voxel_volume ~= sum(Z)` for a unit cell.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import numpy as np
from pymatgen.core import Element, Structure

from crystalae.config import MAX_Z, VoxelConfig

__all__ = [
    "MAX_CELL_LENGTH", "MAX_IMAGES", "Density", "VoxelizeError", "atom_sigmas", "cell_problem",
    "crystal_arrays", "dense_reference_density", "gaussian_norm", "image_counts", "rotation_matrix",
    "voxel_offset", "voxelize", "voxelize_arrays",
]

# Limits that keep the work one crystal costs bounded whatever a file or a latent says, checked (by
# `cell_problem`) before anything is allocated. No dataset cell is 100 Å long (a 16^3 grid would then
# be 6 Å per voxel), and pymatgen's Niggli reduction of a 1e6 Å cell alone takes 5 s and 1 GB. No
# perov_5 or carbon_24 cell needs more than 343 periodic images (16^3 grid, sigma 0.6, 5 sigma); a
# near-flat cell needs millions.
MAX_CELL_LENGTH = 100.0
MAX_IMAGES = 4096
# Gaussian terms the `cell` voxelizer may sum for one crystal (~5 s; a carbon_24 crystal at the largest
# grid, 128^3, needs up to ~2.4e8), and atom copies a `box` filled with the lattice may place.
MAX_TERMS = 1 << 28
MAX_COPIES = 1 << 22
_FLUSH = 1 << 22  # Gaussian terms held before they are summed into the grid (memory stays ~100 MB)


class VoxelizeError(ValueError):
    """The structure cannot be represented with this configuration (the message says why)."""


@dataclass
class Density:
    """A voxelized crystal: density, species labels and the geometry needed to read atoms back."""

    values: np.ndarray  # (N, N, N) float32, electrons / Å^3
    labels: np.ndarray  # (N, N, N) uint8, Z of the atom within label_radius, 0 = empty
    lattice: np.ndarray  # (3, 3) rows = lattice vectors as placed in the grid frame (rotated for box)
    origin: np.ndarray  # (3,) Cartesian position of fractional (0, 0, 0) in the grid frame
    config: VoxelConfig

    @property
    def step(self) -> np.ndarray:
        return _grid_step(self.config, self.lattice)

    @property
    def voxel_offset(self) -> np.ndarray:
        return voxel_offset(self.config)

    @property
    def periodic(self) -> bool:
        return self.config.representation == "cell"

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.step)))


def _grid_step(config: VoxelConfig, lattice: np.ndarray) -> np.ndarray:
    """(3, 3) matrix whose rows are the Cartesian steps between neighbouring voxels."""
    if config.representation == "cell":
        return np.asarray(lattice, dtype=float) / config.grid
    return np.eye(3) * (config.box_size / config.grid)


def voxel_offset(config: VoxelConfig) -> np.ndarray:
    if config.representation == "cell":
        return np.zeros(3)
    return np.full(3, 0.5 * config.box_size / config.grid)


@cache
def _radius_table() -> np.ndarray:
    radii = np.ones(MAX_Z + 1)
    for z in range(1, MAX_Z + 1):
        r = Element.from_Z(z).atomic_radius
        radii[z] = float(r) if r is not None else 1.5
    return radii


def atom_sigmas(numbers: np.ndarray, config: VoxelConfig) -> np.ndarray:
    """Gaussian width per atom (Å): fixed, or scaled by atomic radius relative to carbon (0.7 Å)."""
    numbers = np.asarray(numbers, dtype=int)
    if not config.element_sigma:
        return np.full(len(numbers), config.sigma)
    return config.sigma * _radius_table()[numbers] / 0.7


def gaussian_norm(sigma: np.ndarray) -> np.ndarray:
    """Peak height of a unit-weight normalised 3-D Gaussian."""
    return 1.0 / ((2 * np.pi) ** 1.5 * np.asarray(sigma) ** 3)


def crystal_arrays(structure: Structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lattice rows, fractional coords, atomic numbers) of an ordered structure."""
    numbers = np.array([site.specie.Z for site in structure], dtype=int)
    return structure.lattice.matrix.copy(), structure.frac_coords.copy(), numbers


def rotation_matrix(config: VoxelConfig, material_id: str, index: int) -> np.ndarray:
    """Deterministic random rotation for (seed, material_id, index); index 0 of rotations=0 is I."""
    if config.rotations == 0:
        return np.eye(3)
    key = hashlib.sha256(f"{config.seed}:{material_id}:{index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def image_counts(lattice: np.ndarray, config: VoxelConfig) -> np.ndarray:
    """Periodic images needed along each lattice vector of a `cell` grid for an atom of any element to
    reach any voxel's 3x3x3 neighbourhood (what decoding sums over)."""
    step = np.asarray(lattice, dtype=float) / config.grid
    reach = config.cutoff_sigmas * atom_sigmas(np.arange(1, MAX_Z + 1), config).max() + np.linalg.norm(step, axis=1).sum()
    return np.ceil(reach * np.linalg.norm(np.linalg.inv(lattice), axis=0)) + 1


def cell_problem(lattice: np.ndarray, config: VoxelConfig | None = None, numbers: np.ndarray | None = None
                 ) -> str | None:
    """Why a cell is refused, or None: the one check of a cell's size and shape, made before anything is
    sized by it (reading a file, voxelizing, decoding a predicted lattice).

    Without `config`: finite, no length over `MAX_CELL_LENGTH`, a volume. With it: the periodic images a
    `cell` grid needs (at most `MAX_IMAGES`), and with the atoms' `numbers` the work of voxelizing them
    (`MAX_TERMS` Gaussian terms; `MAX_COPIES` atom copies in a `box` filled with the lattice).
    """
    lattice = np.asarray(lattice, dtype=float)
    if lattice.shape != (3, 3) or not np.isfinite(lattice).all():
        return "NaN or infinite lattice"
    lengths = np.linalg.norm(lattice, axis=1)
    if lengths.max() > MAX_CELL_LENGTH:
        return (f"cell length {lengths.max():.4g} Å is over {MAX_CELL_LENGTH:g} Å, the longest crystalae "
                "voxelizes")
    volume = abs(float(np.linalg.det(lattice)))
    if volume < 1e-3:
        return f"degenerate lattice (volume {volume:.3g} Å^3)"
    if config is None:
        return None
    reciprocal = np.linalg.norm(np.linalg.inv(lattice), axis=0)  # 1 / interplanar spacing
    shape = f"lengths {np.round(lengths, 3).tolist()} Å, volume {volume:.3g} Å^3"
    if config.representation == "cell":
        images = float(np.prod(2.0 * image_counts(lattice, config) + 1))
        if images > MAX_IMAGES:
            return f"cell too thin for its atoms' Gaussians: {images:.4g} periodic images (over {MAX_IMAGES}); {shape}"
        if numbers is not None:
            terms = _cell_terms(reciprocal, atom_sigmas(numbers, config), config)
            if terms > MAX_TERMS:
                return (f"voxelizing this cell sums {terms:.3g} Gaussian terms (over {MAX_TERMS:.3g}): lower --grid or "
                        f"--sigma; {shape}")
    elif config.box_mode == "lattice" and numbers is not None:
        span = np.sqrt(3) * config.box_size + 2 * config.cutoff_sigmas * atom_sigmas(numbers, config).max()
        copies = float(np.prod(np.ceil(span * reciprocal) + 3)) * len(numbers)
        if copies > MAX_COPIES:
            return (f"cell too small for the {config.box_size:g} Å box: {copies:.3g} copies of its atoms "
                    f"(over {MAX_COPIES:.3g}); {shape}")
    return None


def _cell_terms(reciprocal: np.ndarray, sigmas: np.ndarray, config: VoxelConfig) -> float:
    """Gaussian terms `_general_cell_density` and `_labels` sum: each atom's window of voxels."""
    n = config.grid
    density = np.ceil(config.cutoff_sigmas * sigmas[:, None] * reciprocal[None, :] * n)
    labels = np.ceil(config.label_radius * reciprocal * n)
    return float(np.prod(2 * density + 2, axis=1).sum() + len(sigmas) * np.prod(2 * labels + 2))


def voxelize(
    structure: Structure, config: VoxelConfig = VoxelConfig(), rotation: np.ndarray | None = None
) -> Density:
    """Density and labels of `structure` (used as given: reduce it first, see `standardize`)."""
    lattice, frac, numbers = crystal_arrays(structure)
    return voxelize_arrays(lattice, frac, numbers, config, rotation)


def voxelize_arrays(
    lattice: np.ndarray,
    frac: np.ndarray,
    numbers: np.ndarray,
    config: VoxelConfig,
    rotation: np.ndarray | None = None,
) -> Density:
    """Array form of `voxelize`: lattice rows (3, 3), fractional coords (A, 3), Z (A,)."""
    if len(numbers) == 0:
        raise VoxelizeError("structure has no atoms")
    if len(numbers) > config.max_atoms:  # the stored per-atom table and the decoder are sized by it
        raise VoxelizeError(f"{len(numbers)} atoms, more than max_atoms={config.max_atoms}")
    if numbers.max() > MAX_Z or numbers.min() < 1:
        raise VoxelizeError(f"atomic numbers must be in 1..{MAX_Z}, got {sorted(set(numbers))}")
    problem = cell_problem(lattice, config, numbers)
    if problem is not None:
        raise VoxelizeError(problem)
    sigmas = atom_sigmas(numbers, config)
    frac = np.mod(frac, 1.0)
    if config.representation == "cell":
        values = _cell_density(lattice, frac, numbers, sigmas, config)
        origin = np.zeros(3)
        placed = lattice
        labels = _labels(frac * config.grid, numbers, _grid_step(config, lattice), config, periodic=True)
    else:
        placed = lattice @ (np.eye(3) if rotation is None else rotation).T
        centre = np.full(3, config.box_size / 2)
        local = (_compact(frac) if config.box_mode == "unit_cell" else frac) @ placed
        # unit cell: centre the atoms' bounding box; lattice: centre the cell (either way, `origin` records it)
        middle = 0.5 * (local.min(axis=0) + local.max(axis=0)) if config.box_mode == "unit_cell" else 0.5 * placed.sum(axis=0)
        origin = centre - middle
        cart = origin + local
        if config.box_mode == "unit_cell":
            outside = (cart < 0) | (cart > config.box_size)
            if outside.any():
                extent = cart.max(axis=0) - cart.min(axis=0)
                raise VoxelizeError(
                    f"unit cell does not fit the {config.box_size:g} Å box "
                    f"(atoms span {extent.max():.2f} Å after centring)"
                )
        else:
            cart, numbers, sigmas = _fill_box(placed, origin, cart, numbers, sigmas, config)
        values = _box_density(cart, numbers, sigmas, config)
        index = (cart - voxel_offset(config)) / (config.box_size / config.grid)
        labels = _labels(index, numbers, _grid_step(config, placed), config, periodic=False)
    return Density(values.astype(np.float32), labels, placed, origin, config)


def _compact(frac: np.ndarray) -> np.ndarray:
    """Periodic images of the atoms that span the least fractional range per axis.

    Per axis, the cut between 1 and 0 moves to the widest gap between atoms, so a cell whose atoms
    straddle a face is not drawn as two halves at opposite ends of the box.
    """
    out = frac.copy()
    for axis in range(3):
        x = np.sort(frac[:, axis])
        gaps = np.diff(np.append(x, x[0] + 1.0))
        cut = x[(np.argmax(gaps) + 1) % len(x)]  # first coordinate after the widest gap
        out[:, axis] = np.mod(frac[:, axis] - cut, 1.0) + cut
    return out


def _separable(weights: np.ndarray, g0: np.ndarray, g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """sum_a w_a g0[a,i] g1[a,j] g2[a,k] as one matrix product: (N0, A) @ (A, N1*N2)."""
    n0, n1, n2 = g0.shape[1], g1.shape[1], g2.shape[1]
    right = (g1[:, :, None] * g2[:, None, :]).reshape(len(weights), n1 * n2)
    return ((g0 * weights[:, None]).T @ right).reshape(n0, n1, n2)


def _cell_density(lattice, frac, numbers, sigmas, config: VoxelConfig) -> np.ndarray:
    metric = lattice @ lattice.T
    off_diagonal = metric - np.diag(np.diag(metric))
    weights = numbers * gaussian_norm(sigmas)
    if np.abs(off_diagonal).max() < 1e-10 * metric.max():
        return _orthogonal_cell_density(np.sqrt(np.diag(metric)), frac, weights, sigmas, config)
    return _general_cell_density(lattice, frac, weights, sigmas, config)


def _orthogonal_cell_density(lengths, frac, weights, sigmas, config: VoxelConfig) -> np.ndarray:
    """Orthogonal cells: the periodic 3-D Gaussian is a product of periodic 1-D Gaussians."""
    n = config.grid
    cutoff = config.cutoff_sigmas * sigmas.max()
    grid = np.arange(n) / n
    factors = []
    for axis in range(3):
        images = np.arange(-int(np.ceil(cutoff / lengths[axis] + 0.5)), int(np.ceil(cutoff / lengths[axis] + 0.5)) + 1)
        d = grid[None, :] - frac[:, axis : axis + 1]  # (A, N)
        d = d - np.round(d)
        x = lengths[axis] * (d[:, :, None] + images[None, None, :])  # (A, N, images)
        factors.append(np.exp(-0.5 * (x / sigmas[:, None, None]) ** 2).sum(axis=2))
    return _separable(weights, *factors)


def _quadratic_form(metric: np.ndarray, d: list[np.ndarray]) -> np.ndarray:
    """|r|^2 for broadcastable per-axis offsets d (in the basis whose Gram matrix is `metric`)."""
    r2 = metric[0, 0] * d[0] ** 2 + metric[1, 1] * d[1] ** 2 + metric[2, 2] * d[2] ** 2
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if metric[a, b] != 0.0:
            r2 = r2 + 2 * metric[a, b] * d[a] * d[b]
    return r2


def _window(centre: np.ndarray, half_width: np.ndarray) -> list[np.ndarray]:
    """Integer voxel indices per axis covering centre +- half_width (unwrapped)."""
    start = np.floor(centre).astype(int) - half_width
    return [np.arange(start[i], start[i] + 2 * half_width[i] + 2) for i in range(3)]


def _general_cell_density(lattice, frac, weights, sigmas, config: VoxelConfig) -> np.ndarray:
    """Any cell: per atom, a window of voxels within the cutoff, folded back with indices mod N.

    The window may be wider than the cell (thin cells), which sums the periodic images exactly.
    """
    n = config.grid
    metric = lattice @ lattice.T
    reciprocal_norms = np.linalg.norm(np.linalg.inv(lattice), axis=0)  # 1 / interplanar spacing
    flat_index, flat_value = [np.arange(n**3)], [np.zeros(n**3)]
    held = 0
    for f, w, s in zip(frac, weights, sigmas):
        half = np.ceil(config.cutoff_sigmas * s * reciprocal_norms * n).astype(int)
        i0, i1, i2 = _window(f * n, half)
        rows = max(1, _FLUSH // (len(i1) * len(i2)))  # a thin cell's window is cut into slabs of i0
        for start in range(0, len(i0), rows):
            j0 = i0[start : start + rows]
            d = [(j0 / n - f[0])[:, None, None], (i1 / n - f[1])[None, :, None], (i2 / n - f[2])[None, None, :]]
            r2 = _quadratic_form(metric, d)
            flat_value.append((w * np.exp(-0.5 * r2 / s**2)).ravel())
            idx = ((j0 % n)[:, None, None] * n + (i1 % n)[None, :, None]) * n + (i2 % n)[None, None, :]
            flat_index.append(idx.ravel())
            held += idx.size
            if held > _FLUSH:  # the grid so far leads the next batch, so the sums come out bit for bit the same
                flat_index, flat_value = [np.arange(n**3)], [_sum_terms(flat_index, flat_value, n)]
                held = 0
    return _sum_terms(flat_index, flat_value, n).reshape(n, n, n)


def _sum_terms(flat_index: list[np.ndarray], flat_value: list[np.ndarray], n: int) -> np.ndarray:
    """The grid (n^3,) summed from voxel indices and values, in their order."""
    return np.bincount(np.concatenate(flat_index), np.concatenate(flat_value), minlength=n**3)


def _fill_box(placed, origin, cart, numbers, sigmas, config: VoxelConfig):
    """All lattice images of the atoms whose Gaussians reach into the box."""
    reach = config.cutoff_sigmas * sigmas.max()
    inverse = np.linalg.inv(placed)
    corners = np.array([[x, y, z] for x in (-reach, config.box_size + reach)
                        for y in (-reach, config.box_size + reach)
                        for z in (-reach, config.box_size + reach)])
    corner_frac = (corners - origin) @ inverse
    lo = np.floor(corner_frac.min(axis=0)).astype(int) - 1
    hi = np.ceil(corner_frac.max(axis=0)).astype(int) + 1
    shifts = np.stack(np.meshgrid(*[np.arange(lo[i], hi[i] + 1) for i in range(3)], indexing="ij"), -1)
    shifts = shifts.reshape(-1, 3) @ placed
    all_cart = (cart[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    keep = np.all((all_cart > -reach) & (all_cart < config.box_size + reach), axis=1)
    repeat = len(shifts)
    return all_cart[keep], np.tile(numbers, repeat)[keep], np.tile(sigmas, repeat)[keep]


def _box_density(cart, numbers, sigmas, config: VoxelConfig) -> np.ndarray:
    """Cartesian box: an isotropic Gaussian is separable along x, y, z (no periodic images)."""
    h = config.box_size / config.grid
    centres = (np.arange(config.grid) + 0.5) * h
    factors = [np.exp(-0.5 * ((centres[None, :] - cart[:, axis : axis + 1]) / sigmas[:, None]) ** 2)
               for axis in range(3)]
    return _separable(numbers * gaussian_norm(sigmas), *factors)


def _labels(index_pos, numbers, step, config: VoxelConfig, periodic: bool) -> np.ndarray:
    """Z of the nearest atom for voxels within label_radius of one (0 elsewhere)."""
    n = config.grid
    radius = config.label_radius
    half = np.ceil(radius * np.linalg.norm(np.linalg.inv(step), axis=0)).astype(int)
    metric = step @ step.T
    base = np.floor(index_pos).astype(int)  # (A, 3)
    # (A, w) voxel indices per axis, all atoms at once; windows share one shape
    idx = [base[:, i : i + 1] + np.arange(-half[i], half[i] + 2)[None, :] for i in range(3)]
    d = [idx[i] - index_pos[:, i : i + 1] for i in range(3)]
    shapes = [(slice(None), slice(None), None, None), (slice(None), None, slice(None), None),
              (slice(None), None, None, slice(None))]
    d = [d[i][shapes[i]] for i in range(3)]
    r2 = _quadratic_form(metric, d)
    inside = r2 < radius**2
    if periodic:
        idx = [i % n for i in idx]
    else:
        for i in range(3):
            inside &= ((idx[i] >= 0) & (idx[i] < n))[shapes[i]]
        idx = [np.clip(i, 0, n - 1) for i in idx]
    flat = (idx[0][shapes[0]] * n + idx[1][shapes[1]]) * n + idx[2][shapes[2]]
    species = np.broadcast_to(np.asarray(numbers, dtype=np.uint8)[:, None, None, None], r2.shape)[inside]
    flat, dist = flat[inside], r2[inside]
    order = np.lexsort((dist, flat))  # by voxel, nearest atom first
    first = np.unique(flat[order], return_index=True)[1]
    labels = np.zeros(n**3, dtype=np.uint8)
    labels[flat[order][first]] = species[order][first]
    return labels.reshape(n, n, n)


def dense_reference_density(structure: Structure, config: VoxelConfig) -> np.ndarray:
    """Straightforward dense numpy voxelizer for the `cell` grid: every voxel x every atom x 27 images.

    The baseline of `bench/voxelize.py` and a cross-check in the tests (exact where +-1 images suffice).
    """
    lattice, frac, numbers = crystal_arrays(structure)
    sigmas = atom_sigmas(numbers, config)
    n = config.grid
    grid = np.stack(np.meshgrid(*[np.arange(n) / n] * 3, indexing="ij"), -1).reshape(-1, 3)
    images = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)])
    values = np.zeros(len(grid))
    for f, z, s in zip(frac, numbers, sigmas):
        for image in images:
            r = (grid - f - image) @ lattice
            values += z * gaussian_norm(s) * np.exp(-0.5 * (r**2).sum(axis=1) / s**2)
    return values.reshape(n, n, n)

