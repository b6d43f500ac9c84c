"""Symmetry snapping of decoded crystals."""
import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystalae.metrics import structure_matcher
from crystalae.symmetry import crystal_system, spacegroup, symmetrize

DIAMOND = Structure(Lattice.cubic(3.567), ["C"] * 8,
                    [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                     [0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75]])


def _noisy(structure: Structure, position: float, angle: float, seed: int = 0) -> Structure:
    """`structure` with Gaussian position noise (Å) and its angles bent by `angle` degrees."""
    rng = np.random.default_rng(seed)
    a, b, c = structure.lattice.abc
    lattice = Lattice.from_parameters(a * 1.01, b, c * 0.99, 90 + angle, 90 - angle, 90 + 0.5 * angle)
    cart = structure.frac_coords @ lattice.matrix + rng.normal(0, position, (len(structure), 3))
    return Structure(lattice, structure.species, cart, coords_are_cartesian=True)


def test_snapping_restores_the_ideal_crystal_within_its_tolerance():
    noisy = _noisy(DIAMOND, 0.05, 2.0)
    assert spacegroup(noisy, 0.01)[1] < 10  # the noise broke the symmetry
    snapped = symmetrize(noisy, 0.3)
    assert spacegroup(snapped, 0.01) == ("Fd-3m", 227)
    rms_noisy = structure_matcher().get_rms_dist(noisy, DIAMOND)[0]
    rms_snapped = structure_matcher().get_rms_dist(snapped, DIAMOND)[0]
    assert rms_snapped < 0.1 * rms_noisy
    assert crystal_system(snapped) == "cubic"


def test_a_tolerance_below_the_noise_keeps_the_crystal_as_decoded():
    noisy = _noisy(DIAMOND, 0.05, 2.0)
    kept = symmetrize(noisy, 1e-4)
    assert spacegroup(kept, 0.01)[1] < 10
    assert kept.matches(noisy)


def test_snapping_refuses_a_tolerance_that_is_not_a_positive_length():
    with pytest.raises(ValueError, match="symprec"):
        symmetrize(DIAMOND, 0.0)
