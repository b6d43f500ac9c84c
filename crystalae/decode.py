"""Density (+ species labels or a known composition) -> atoms -> pymatgen Structure. No learning.

Peaks are periodic local maxima. Each is refined to sub-voxel precision by fitting a quadratic to the
log-density of its 3x3x3 neighbourhood (exact for one Gaussian) after subtracting the modelled
Gaussians of every other atom and periodic image; a few such rounds converge to the exact positions
when the density follows the model, which is what lets thin, supercell-like carbon cells match.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Composition, Element, Structure
from scipy.optimize import linear_sum_assignment

from crystalae.voxelize import (
    MAX_CELL_LENGTH,
    MAX_IMAGES,
    MAX_Z,
    Density,
    atom_sigmas,
    cell_problem,
    gaussian_norm,
    image_counts,
    voxelize_arrays,
)

__all__ = ["MAX_CELL_LENGTH", "MAX_IMAGES", "SPECIES_SOURCES", "DecodeError", "decode"]

_OFFSETS = np.array(list(itertools.product((-1, 0, 1), repeat=3)))  # (27, 3)
_x, _y, _z = _OFFSETS.T
_DESIGN = np.column_stack([np.ones(27), _x, _y, _z, _x * _x, _y * _y, _z * _z, _x * _y, _x * _z, _y * _z])
_FIT = np.linalg.pinv(_DESIGN)  # (10, 27): log-values -> quadratic coefficients
_ALL_NUMBERS = np.arange(1, MAX_Z + 1)
# Å^3 per atom below which no solid exists (diamond, among the densest: 5.7). A learned lattice head
# fed a latent far from the data can predict such a cell; reading atoms from it is slow and useless.
MIN_VOLUME_PER_ATOM = 1.0
# MAX_CELL_LENGTH and MAX_IMAGES (crystalae.voxelize, re-exported) keep decoding a hostile or far-off
# prediction cheap: the lattice a latent predicts gets the same `cell_problem` check as a file's.
# What `decode(species_source=...)` accepts: where each atom's atomic number comes from.
SPECIES_SOURCES = ("labels", "composition", "density")


class DecodeError(ValueError):
    """No crystal could be read from the density (the message says why)."""


def decode(
    density: Density,
    species_source: str = "labels",
    composition: Composition | str | None = None,
    *,
    iterations: int = 8,
    min_height: float | None = None,
    elements: tuple[int, ...] | None = None,
    max_peaks: int | None = None,
    atoms: int | None = None,
    species_from: str | None = None,
) -> Structure:
    """Read a crystal back from a density grid.

    Steps: refuse inputs no crystal can be read from; find the distinct density peaks (optionally
    exactly `atoms` of them); refine their positions together; give each an atomic number.

    species_source: where atomic numbers come from (one of `SPECIES_SOURCES`). "labels" takes each atom's
        number from `density.labels` at its peak voxel (peaks on label 0 are dropped); "composition"
        hands the known `composition` out to the peaks by fitted peak height (peaks left over are
        dropped); "density" rounds each fitted peak height to the nearest atomic number among `elements`.
    composition: the known composition, for species_source="composition" (ignored otherwise).
    iterations: at most this many refinement rounds (fewer once no peak moves 1e-6 voxel).
    min_height: electrons / Å^3 a peak must exceed (default: half the peak of a hydrogen atom).
    elements: atomic numbers the fitted peak heights are rounded to (default: all).
    max_peaks: keep only this many highest peaks (bounds time and memory on a noisy learned density).
    atoms: read exactly this many atoms (periodic grids): the heaviest peaks, or, when peaks are
        missing (merged in a blurred density), more atoms placed where the density most exceeds the
        model of those found, one at a time; all are then refined together.

    Returns the structure on `density.lattice`, fractional coordinates wrapped into [0, 1), with each
    site's fitted peak height (e/Å^3) as the "peak_height" site property.
    Raises DecodeError when no crystal can be read (the message says why) and ValueError for an
    unknown `species_source`. (`species_from` is its old name, read until crystalae 1.0; a model's
    `species_from` names its species reader: site head, segmenter or density.)
    """
    if species_from is not None:
        warnings.warn("decode(species_from=...) is now decode(species_source=...)", DeprecationWarning, stacklevel=2)
        species_source = species_from
    species, min_height = _validate(density, species_source, composition, min_height, atoms)
    pos, weight, numbers = _find_peaks(density, min_height, max_peaks, species.labels)
    candidates = _ALL_NUMBERS if elements is None else np.array(sorted(elements), dtype=int)
    if atoms is not None:
        pos, weight, numbers = _match_count(density, pos, weight, numbers, atoms, candidates)
    pos, weight, numbers = _refine(density, pos, weight, numbers, candidates, iterations, climb=atoms is not None)
    frac, weight, numbers = _fractional(density, pos, weight, numbers)
    frac, weight, numbers = _assign_species(species, frac, weight, numbers, density.config, candidates)
    if len(numbers) == 0:
        raise DecodeError("no atom left after removing copies cut by the box faces")
    # the fitted peak height (e/Å^3) rides along, so a species reader can weigh it against its own guess
    return Structure(density.lattice, [Element.from_Z(int(n)) for n in numbers], np.mod(frac, 1.0),
                     site_properties={"peak_height": [float(w) for w in weight]})


@dataclass(frozen=True)
class _Species:
    """`decode`'s `species_source`, read once (by `_species`): what the other steps need of it.

    labels: the grid peaks take their atomic numbers from ("labels"); None: numbers follow the
    fitted peak heights while refining. composition: the known composition handed out at the end
    ("composition"); None with no labels: fitted heights are rounded to atomic numbers ("density").
    """

    labels: np.ndarray | None = None
    composition: Composition | str | None = None


def _species(species_source: str, density: Density, composition: Composition | str | None) -> _Species:
    """The one place `species_source` is read; refuses a mode whose input is missing."""
    if species_source == "labels":
        if density.labels is None:
            raise DecodeError("species_source='labels' needs a labels grid")
        return _Species(labels=density.labels)
    if species_source == "composition":
        if composition is None:
            raise DecodeError("species_source='composition' needs a composition")
        return _Species(composition=composition)
    if species_source == "density":
        return _Species()
    raise ValueError(f"species_source must be one of {SPECIES_SOURCES}, got {species_source!r}")


def _validate(density: Density, species_source: str, composition, min_height: float | None,
              atoms: int | None) -> tuple[_Species, float]:
    """Refuse, cheaply and before any peak is searched, what no crystal can be read from.
    Returns the species source and the peak height threshold (its default filled in)."""
    if atoms is not None and (atoms < 1 or not density.periodic):
        raise DecodeError(f"atoms={atoms}: needs a positive count and a periodic (cell) grid")
    species = _species(species_source, density, composition)
    if min_height is None:
        min_height = 0.5 * float(gaussian_norm(atom_sigmas(np.array([1]), density.config))[0])
    if not np.isfinite(np.asarray(density.values)).all():
        raise DecodeError("density contains NaN or inf")
    volume = abs(np.linalg.det(density.lattice)) if np.isfinite(density.lattice).all() else 0.0
    if volume < 1e-3:  # e.g. a predicted lattice whose angles cannot close a cell
        raise DecodeError(f"degenerate lattice (volume {volume:.3g} Å^3)")
    if atoms is not None and volume < MIN_VOLUME_PER_ATOM * atoms:
        raise DecodeError(f"{atoms} atoms cannot fit a {volume:.3g} Å^3 cell "
                          f"(under {MIN_VOLUME_PER_ATOM:g} Å^3 per atom)")
    problem = cell_problem(density.lattice, density.config if density.periodic else None)
    if problem is not None:
        raise DecodeError(problem + (" (a latent far from the training data?)" if density.periodic else ""))
    return species, min_height


def _find_peaks(density: Density, min_height: float, max_peaks: int | None, labels: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Distinct density peaks: sub-voxel positions (index units), fitted heights, and, given a labels
    grid, atomic numbers (peaks on label 0 dropped; None without labels)."""
    values, periodic = np.asarray(density.values), density.periodic
    centres = _local_maxima(values, periodic, min_height)
    if max_peaks is not None and len(centres) > max_peaks:
        heights = values[tuple(centres.T)]
        centres = centres[np.sort(np.argsort(-heights, kind="stable")[:max_peaks])]
    numbers = None
    if labels is not None:
        numbers = labels[tuple(centres.T)].astype(int)
        centres, numbers = centres[numbers > 0], numbers[numbers > 0]
    if len(centres) == 0:
        raise DecodeError(f"no density peak above {min_height:.3g} e/Å^3")
    pos, weight = _fit_peaks(values, centres, np.zeros((len(centres), 27)), periodic)
    keep = _distinct(pos, weight, density.step, density.lattice if periodic else None)
    return pos[keep], weight[keep], None if numbers is None else numbers[keep]


def _refine(density: Density, pos: np.ndarray, weight: np.ndarray, numbers: np.ndarray | None,
            candidates: np.ndarray, iterations: int, climb: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refit every peak with the modelled Gaussians of all other atoms and periodic images subtracted,
    for up to `iterations` rounds (until no peak moves 1e-6 voxel).

    numbers: fixed atomic numbers (from labels), or None: each round reads them (among `candidates`)
    from the heights fitted by the round before. Returns positions, heights and the numbers the last
    round modelled. climb: see `_fit_peaks`.
    """
    config, periodic, step, values = density.config, density.periodic, density.step, np.asarray(density.values)
    images = _image_translations(density.lattice, config) if periodic else np.zeros((1, 3))
    from_heights = numbers is None
    for _ in range(iterations):
        if from_heights:
            numbers = _weight_to_z(weight, config, candidates)
        sigmas = atom_sigmas(numbers, config)
        centres = np.rint(pos).astype(int)
        others = _neighbour_density(pos, numbers, sigmas, centres, step, images, config.cutoff_sigmas)
        new_pos, weight = _fit_peaks(values, centres, others, periodic, climb=climb)
        shift = np.abs(new_pos - pos).max()
        pos = new_pos
        if shift < 1e-6:
            break
    if numbers is None:  # iterations=0: no round has read them
        numbers = _weight_to_z(weight, config, candidates)
    return pos, weight, numbers


def _fractional(density: Density, pos: np.ndarray, weight: np.ndarray, numbers: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional coordinates of the peaks (index units); a box filled with the lattice keeps one copy
    of each atom (weights and numbers follow)."""
    cart = pos @ density.step + density.voxel_offset
    frac = (cart - density.origin) @ np.linalg.inv(density.lattice)
    if not density.periodic and density.config.box_mode == "lattice":
        unique = _unique_lattice_atoms(cart, frac, numbers, density.lattice, density.config)
        frac, weight, numbers = frac[unique], weight[unique], numbers[unique]
    return frac, weight, numbers


def _assign_species(species: _Species, frac: np.ndarray, weight: np.ndarray, numbers: np.ndarray, config,
                    candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final atomic numbers, as `species` says: the refined (label) ones, the known composition handed
    out by fitted height (peaks it leaves unused are dropped), or the fitted heights rounded among
    `candidates`. Returns frac, weight and numbers of the atoms kept."""
    if species.labels is not None:
        return frac, weight, numbers
    if species.composition is not None:
        numbers = _assign_composition(Composition(species.composition), weight, config)
        used = numbers > 0
        return frac[used], weight[used], numbers[used]
    return frac, weight, _weight_to_z(weight, config, candidates)


def _match_count(density: Density, pos: np.ndarray, weight: np.ndarray, numbers: np.ndarray | None, atoms: int,
                 candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`atoms` peaks (index units): the heaviest, or extra ones at the voxel where the density most
    exceeds the modelled density of the atoms so far. Atomic numbers from labels (if any) follow the
    new voxels."""
    order = np.argsort(-weight, kind="stable")[:atoms]
    pos, weight = pos[order], weight[order]
    numbers = None if numbers is None else numbers[order]
    grid, values = density.config.grid, np.asarray(density.values)
    while len(pos) < atoms:
        modelled = _weight_to_z(weight, density.config, candidates) if numbers is None else numbers
        model = voxelize_arrays(density.lattice, pos / grid, modelled, density.config).values
        residual = values - model
        centre = np.array(np.unravel_index(np.argmax(residual), residual.shape))
        pos = np.vstack([pos, centre[None].astype(float)])
        weight = np.append(weight, residual[tuple(centre)])
        if numbers is not None:
            label = int(density.labels[tuple(centre)])
            numbers = np.append(numbers, label if label > 0 else np.bincount(numbers).argmax())
    return pos, weight, numbers


def _unique_lattice_atoms(cart, frac, numbers, lattice, config) -> np.ndarray:
    """One copy per atom of a box filled with the lattice: the copy deepest inside the box.

    Peaks near the faces sit on Gaussians cut off by the box, so copies within 3 sigma are not used.
    """
    depth = np.minimum(cart, config.box_size - cart).min(axis=1)
    order = np.argsort(-depth)
    order = order[depth[order] >= 3 * atom_sigmas(numbers[order], config)]
    wrapped = np.mod(frac[order], 1.0) @ lattice
    rank = np.arange(len(order))[::-1].astype(float)  # deeper first
    return order[_distinct(wrapped, rank, np.eye(3), lattice)]


def _local_maxima(values: np.ndarray, periodic: bool, min_height: float) -> np.ndarray:
    """Voxels not lower than any of their 26 neighbours (separable 3x3x3 max, ~3x scipy's here)."""
    padded = np.pad(values, 1, mode="wrap") if periodic else np.pad(values, 1, constant_values=-np.inf)
    m = np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:])
    m = np.maximum(np.maximum(m[:, :-2], m[:, 1:-1]), m[:, 2:])
    m = np.maximum(np.maximum(m[:, :, :-2], m[:, :, 1:-1]), m[:, :, 2:])
    return np.argwhere((values >= m) & (values > min_height))


def _gather(values: np.ndarray, centres: np.ndarray, periodic: bool) -> np.ndarray:
    """(P, 27) values around each centre voxel (wrapped, or clamped at box edges)."""
    n = values.shape[0]
    idx = centres[:, None, :] + _OFFSETS[None, :, :]
    idx = idx % n if periodic else np.clip(idx, 0, n - 1)
    return values[idx[..., 0], idx[..., 1], idx[..., 2]]


def _fit_peaks(values, centres, others, periodic, climb: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sub-voxel peak positions (index units) and peak heights from a log-quadratic fit.
    climb: where the fit fails (the window is no peak once the other atoms are subtracted), step to
    the window's highest voxel instead of staying, so atoms placed into a merged blob walk apart."""
    local = _gather(values, centres, periodic).astype(np.float64) - others
    floor = 1e-9 * max(float(local.max()), 1e-30)
    coef = np.log(np.maximum(local, floor)) @ _FIT.T  # (P, 10)
    g = coef[:, 1:4]
    hess = np.empty((len(coef), 3, 3))
    hess[:, [0, 1, 2], [0, 1, 2]] = 2 * coef[:, 4:7]
    hess[:, 0, 1] = hess[:, 1, 0] = coef[:, 7]
    hess[:, 0, 2] = hess[:, 2, 0] = coef[:, 8]
    hess[:, 1, 2] = hess[:, 2, 1] = coef[:, 9]
    ok = np.linalg.eigvalsh(hess).max(axis=1) < 0
    delta = np.zeros_like(g)
    if ok.any():
        delta[ok] = -np.linalg.solve(hess[ok], g[ok][:, :, None])[:, :, 0]
    ok &= np.abs(delta).max(axis=1) < 1.0
    delta[~ok] = _OFFSETS[np.argmax(local[~ok], axis=1)] if climb else 0.0
    height = np.where(ok, np.exp(coef[:, 0] + 0.5 * (g * delta).sum(axis=1)), local[:, 13])
    return centres + delta, height


def _image_translations(lattice, config) -> np.ndarray:
    """Cartesian lattice translations that can bring an atom within reach of a peak window."""
    counts = image_counts(lattice, config).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-c, c + 1) for c in counts], indexing="ij"), -1)
    return grid.reshape(-1, 3) @ lattice


def _neighbour_density(pos, numbers, sigmas, centres, step, images, cutoff_sigmas, block_elements: int = 1 << 20
                       ) -> np.ndarray:
    """(P, 27) modelled density at each peak's window from all *other* atoms and periodic images.

    Peaks are taken in blocks so the (block, P, images) distance array stays near `block_elements`:
    memory grows linearly, not quadratically, with the number of atoms.
    """
    window = _OFFSETS @ step  # (27, 3)
    atoms = pos @ step
    self_image = np.argmin(np.linalg.norm(images, axis=1))
    reach = cutoff_sigmas * sigmas[None, :, None] + np.linalg.norm(window, axis=1).max()
    result = np.zeros((len(pos), 27))
    block = max(1, block_elements // max(len(pos) * len(images), 1))
    for start in range(0, len(pos), block):
        rows = np.arange(start, min(start + block, len(pos)))
        q = (centres[rows] @ step)[:, None, None, :] - atoms[None, :, None, :] - images[None, None, :, :]
        near = np.linalg.norm(q, axis=-1) < reach  # (B, P, I)
        near[np.arange(len(rows)), rows, self_image] = False
        a, b, n = np.nonzero(near)
        r2 = ((q[a, b, n][:, None, :] + window[None, :, :]) ** 2).sum(-1)  # (S, 27)
        contrib = (numbers[b] * gaussian_norm(sigmas[b]))[:, None] * np.exp(-0.5 * r2 / sigmas[b, None] ** 2)
        flat = (a[:, None] * 27 + np.arange(27)[None, :]).ravel()
        result[rows] = np.bincount(flat, contrib.ravel(), minlength=len(rows) * 27).reshape(len(rows), 27)
    return result


def _distinct(pos, weight, step, lattice) -> np.ndarray:
    """Indices of peaks kept after merging those closer than 0.5 Å (the heavier one wins)."""
    cart = pos @ step
    keep: list[int] = []
    inverse = None if lattice is None else np.linalg.inv(lattice)
    for i in np.argsort(-weight):
        if keep:
            d = cart[keep] - cart[i]
            if inverse is not None:
                f = d @ inverse
                d = (f - np.round(f)) @ lattice
            if (np.linalg.norm(d, axis=1) < 0.5).any():
                continue
        keep.append(int(i))
    return np.array(sorted(keep), dtype=int)


def _weight_to_z(height: np.ndarray, config, candidates: np.ndarray = _ALL_NUMBERS) -> np.ndarray:
    """Atomic number (of `candidates`) whose modelled peak height is closest (log scale) to each fitted height."""
    model = candidates * gaussian_norm(atom_sigmas(candidates, config))
    err = np.abs(np.log(np.maximum(height, 1e-12))[:, None] - np.log(model)[None, :])
    return candidates[np.argmin(err, axis=1)]


def _assign_composition(composition: Composition, height: np.ndarray, config) -> np.ndarray:
    """Give each element of `composition` to the peaks whose heights fit it best (0 = unused peak)."""
    wanted = [Element(str(el)).Z for el, amount in composition.items() for _ in range(int(round(amount)))]
    if len(height) < len(wanted):
        raise DecodeError(f"found {len(height)} peaks, composition {composition.formula} needs {len(wanted)}")
    wanted = np.array(wanted)
    model = wanted * gaussian_norm(atom_sigmas(wanted, config))
    cost = np.abs(np.log(np.maximum(height, 1e-12))[:, None] - np.log(model)[None, :])
    rows, cols = linear_sum_assignment(cost)
    numbers = np.zeros(len(height), dtype=int)
    numbers[rows] = wanted[cols]
    return numbers
