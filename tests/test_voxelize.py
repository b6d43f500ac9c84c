import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystalae.config import VoxelConfig
from crystalae.voxelize import VoxelizeError, dense_reference_density, rotation_matrix, voxelize

PEROVSKITE = Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                       [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
TRICLINIC = Structure(Lattice.from_parameters(3.1, 4.2, 5.3, 70, 80, 100), ["C", "C", "N"],
                      [[0.1, 0.2, 0.3], [0.6, 0.5, 0.4], [0.3, 0.8, 0.9]])


@pytest.mark.parametrize("structure", [PEROVSKITE, TRICLINIC], ids=["orthogonal", "triclinic"])
def test_translation_by_lattice_vector_and_permutation_leave_grid_unchanged(structure):
    config = VoxelConfig(grid=20)
    base = voxelize(structure, config)
    shifted = Structure(structure.lattice, structure.species,
                        structure.frac_coords + np.array([[1, 0, -1]] + [[0, 2, 0]] * (len(structure) - 1)))
    order = np.random.default_rng(0).permutation(len(structure))
    permuted = Structure(structure.lattice, [structure.species[i] for i in order], structure.frac_coords[order])
    for other in (shifted, permuted):
        d = voxelize(other, config)
        np.testing.assert_allclose(d.values, base.values, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(d.labels, base.labels)


@pytest.mark.parametrize("structure", [PEROVSKITE, TRICLINIC], ids=["orthogonal", "triclinic"])
@pytest.mark.parametrize("config", [VoxelConfig(grid=24), VoxelConfig(grid=24, element_sigma=True),
                                    VoxelConfig(representation="box", grid=40, sigma=0.6)])
def test_integral_equals_total_atomic_number(structure, config):
    d = voxelize(structure, config)
    total = sum(structure.atomic_numbers)
    assert d.values.sum() * d.voxel_volume == pytest.approx(total, rel=1e-3)


@pytest.mark.parametrize("structure", [PEROVSKITE, TRICLINIC], ids=["orthogonal", "triclinic"])
def test_fast_paths_agree_with_dense_reference(structure):
    config = VoxelConfig(grid=16, sigma=0.4)  # +-1 images suffice at this width, so the reference is exact
    fast = voxelize(structure, config).values
    reference = dense_reference_density(structure, config)
    np.testing.assert_allclose(fast, reference, atol=2e-5 * reference.max())


def test_thin_cell_sums_images_beyond_neighbours():
    """Interplanar spacing below the cutoff: far images matter, and the integral still equals Z."""
    thin = Structure(Lattice.from_parameters(2.5, 2.5, 6.0, 90, 90, 150), ["C"], [[0, 0, 0]])
    d = voxelize(thin, VoxelConfig(grid=24, sigma=0.8))
    assert d.values.sum() * d.voxel_volume == pytest.approx(6.0, rel=1e-3)


def test_labels_mark_each_atom_within_radius():
    config = VoxelConfig(grid=32)
    d = voxelize(PEROVSKITE, config)
    for site in PEROVSKITE:
        index = tuple(np.rint(site.frac_coords * config.grid).astype(int) % config.grid)
        assert d.labels[index] == site.specie.Z
    voxel = PEROVSKITE.volume / config.grid**3
    sphere = 4 / 3 * np.pi * config.label_radius**3
    assert (d.labels > 0).sum() * voxel == pytest.approx(len(PEROVSKITE) * sphere, rel=0.15)


def test_box_rejects_cell_too_large_with_reason():
    big = Structure(Lattice.cubic(16.0), ["C"] * 3, [[0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [2 / 3, 2 / 3, 2 / 3]])
    with pytest.raises(VoxelizeError, match="does not fit the 10 Å box"):
        voxelize(big, VoxelConfig(representation="box"))


def test_rotations_are_deterministic_and_proper():
    config = VoxelConfig(representation="box", rotations=3, seed=7)
    r = rotation_matrix(config, "mp-1", 2)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_array_equal(r, rotation_matrix(config, "mp-1", 2))
    assert not np.allclose(r, rotation_matrix(config, "mp-1", 1))
    rotated = voxelize(PEROVSKITE, config, r)
    assert rotated.values.sum() * rotated.voxel_volume == pytest.approx(84, rel=1e-3)


def test_invalid_config_is_named():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        VoxelConfig(sigma=-1)
    with pytest.raises(ValueError, match="representation must be one of"):
        VoxelConfig(representation="sphere")
    with pytest.raises(ValueError, match="unknown VoxelConfig keys"):
        VoxelConfig.from_dict({"sigmaa": 1.0})
