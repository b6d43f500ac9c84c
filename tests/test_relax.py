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


def test_batched_relaxation_lowers_energy_and_agrees_with_one_by_one():
    from crystalae.relax import relax

    a = 3.567 / np.sqrt(2)
    shifted = Structure(Lattice.from_parameters(a, a, a, 60, 60, 60), ["C", "C"], [[0, 0, 0], [0.29, 0.25, 0.22]])
    squeezed = Structure(Lattice.from_parameters(0.93 * a, a, 1.04 * a, 58, 61, 60), ["C", "C"],
                         [[0, 0, 0], [0.26, 0.24, 0.25]])  # the cell has to relax too
    crystals = [shifted, None, squeezed]
    batched, record = relax(crystals, steps=12, workers=1, batch=2)
    one_by_one, reference = relax(crystals, steps=12, workers=1, method="one-by-one")
    assert record["method"] == "batched" and reference["method"] == "one-by-one"
    assert batched[1] is None and record["relaxed"] == 2 and record["failed"] == 0
    each, ref = record["per_crystal"], reference["per_crystal"]
    for i in (0, 2):
        assert each["energy_per_atom"][i] < each["initial_energy_per_atom"][i] - 0.01
        assert abs(each["energy_per_atom"][i] - ref["energy_per_atom"][i]) < 1e-3  # the same FIRE path
        assert each["steps"][i] == ref["steps"][i] and each["converged"][i] == ref["converged"][i]
        assert np.allclose(batched[i].lattice.matrix, one_by_one[i].lattice.matrix, atol=1e-3)
        assert "magmom" in batched[i].site_properties
    assert each["energy_per_atom"][1] is None and record["converged"] == sum(bool(c) for c in each["converged"])


def test_relax_refuses_an_unknown_method():
    from crystalae.relax import relax

    with pytest.raises(ValueError, match="method"):
        relax([], method="parallel")
