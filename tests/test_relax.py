"""Relaxing decoded crystals with CHGNet (crystalae.relax)."""
import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

pytest.importorskip("chgnet")


def _bond_lengths(structure: Structure) -> np.ndarray:
    return np.array([n.nn_distance for site in structure for n in structure.get_neighbors(site, 1.9)])


def test_relaxation_restores_a_distorted_diamond():
    from crystalae.relax import relax

    a = 3.567 / np.sqrt(2)  # the two-atom primitive cell of diamond
    lattice = Lattice.from_parameters(a, a, a, 60, 60, 60)
    diamond = Structure(lattice, ["C", "C"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    distorted = Structure(lattice, ["C", "C"], [[0, 0, 0], [0.29, 0.25, 0.22]])
    before = _bond_lengths(distorted)
    assert before.std() > 0.05  # four unequal bonds
    relaxed, record = relax([distorted, None], steps=60, fmax=0.05, workers=1)
    assert relaxed[1] is None and record["relaxed"] == 1 and record["failed"] == 0
    after = _bond_lengths(relaxed[0])
    assert after.std() < before.std() / 3  # back to four equal bonds
    assert abs(after.mean() - _bond_lengths(diamond).mean()) < 0.05  # near diamond's 1.54 Å
    assert record["potential"].startswith("CHGNet")


def test_relax_refuses_a_step_count_below_one():
    from crystalae.relax import relax

    with pytest.raises(ValueError, match="at least 1"):
        relax([], steps=0)
