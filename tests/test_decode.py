import numpy as np
import pytest

from crystalae.config import VoxelConfig
from crystalae.decode import DecodeError, decode
from crystalae.demo import PROTOTYPES, build_prototype
from crystalae.metrics import compare
from crystalae.sources import reduce_cell
from crystalae.voxelize import VoxelizeError, rotation_matrix, voxelize


def _roundtrip(structure, config, species="labels", material_id="x"):
    density = voxelize(structure, config, rotation_matrix(config, material_id, 0))
    return decode(density, species_source=species, composition=structure.composition)


def _score(structure, config, material_id):
    try:
        return compare(_roundtrip(structure, config, material_id=material_id), structure)
    except VoxelizeError:  # does not fit the box: a miss, as in the roundtrip command
        return compare(None, structure)


@pytest.mark.parametrize("proto", PROTOTYPES, ids=lambda p: p.name)
@pytest.mark.parametrize("species", ["labels", "composition", "density"])
def test_prototypes_come_back_exactly(proto, species):
    elements = [pool[0] for pool, _ in proto.sites]
    structure = build_prototype(proto, elements)
    result = compare(_roundtrip(structure, VoxelConfig(), species), structure)
    assert result["match"] and result["composition_ok"], result
    assert result["rms"] < 1e-3


@pytest.mark.parametrize("config", [VoxelConfig(representation="box"),
                                    VoxelConfig(representation="box", rotations=1),
                                    VoxelConfig(representation="box", box_mode="lattice", rotations=1)],
                         ids=["box", "box-rotated", "box-lattice-rotated"])
def test_box_representation_round_trip(demo_set, config):
    results = [_score(s, config, mid) for mid, s in demo_set]
    assert np.mean([r["match"] for r in results]) >= 0.95


def test_shared_datasets_sample_round_trip(perov_sample, carbon_sample):
    config = VoxelConfig()
    for sample in (perov_sample, carbon_sample):
        results = [compare(_roundtrip(reduce_cell(s, "niggli"), config), s) for _, s in sample]
        assert all(r["match"] and r["composition_ok"] for r in results), [
            (mid, r) for (mid, _), r in zip(sample, results) if not r["match"]]


def test_decode_refines_below_a_hundredth_of_an_angstrom(carbon_sample):
    """Thin carbon supercells only match when positions are good to ~0.01 Å."""
    for _, s in carbon_sample[:10]:
        s = reduce_cell(s, "niggli")
        out = _roundtrip(s, VoxelConfig())
        d = np.array([min(out.lattice.get_distance_and_image(site.frac_coords, o.frac_coords)[0] for o in out)
                      for site in s])
        assert d.max() < 0.01


def test_empty_density_is_a_clear_error(demo_set):
    density = voxelize(demo_set[0][1], VoxelConfig(grid=16))
    density.values[:] = 0
    with pytest.raises(DecodeError, match="no density peak"):
        decode(density)
    density.values[0, 0, 0] = np.nan
    with pytest.raises(DecodeError, match="NaN"):
        decode(density)


def test_degenerate_predicted_lattice_is_a_decode_error(demo_set):
    from crystalae.units import lattice_from_params

    flat = lattice_from_params(np.array([0.4, 0.4, 0.4, 1 / 3, 1 / 3, 150 / 90]))  # angles cannot close a cell
    density = voxelize(demo_set[0][1], VoxelConfig(grid=16))
    density.lattice = flat
    with pytest.raises(DecodeError, match="degenerate lattice"):
        decode(density)


def test_known_atom_count_separates_merged_peaks():
    """Two carbons 1.2 Å apart at sigma 0.7 Å make one blob: told there are two, decode finds both."""
    from pymatgen.core import Lattice, Structure

    truth = Structure(Lattice.from_parameters(6, 5, 5.5, 80, 95, 100), ["C", "C"], [[0.4, 0.5, 0.5], [0.6, 0.5, 0.5]])
    config = VoxelConfig(grid=16, sigma=0.7)
    density = voxelize(truth, config)
    assert len(decode(density, species_source="density", elements=(6,))) == 1
    two = decode(density, species_source="density", elements=(6,), atoms=2)
    assert compare(two, truth)["match"]
    assert all(min(truth.lattice.get_distance_and_image(s.frac_coords, t.frac_coords)[0] for t in truth) < 0.05
               for s in two)
    assert len(decode(density, species_source="density", elements=(6,), atoms=1)) == 1  # more peaks than atoms: heaviest kept
    with pytest.raises(DecodeError, match="atoms=0"):
        decode(density, species_source="density", atoms=0)
    with pytest.raises(DecodeError, match="cannot fit"):  # e.g. a latent far from the data: rejected at once
        decode(density, species_source="density", atoms=200)


def test_species_source_is_checked_and_zero_iterations_read_numbers_from_heights(demo_set):
    density = voxelize(demo_set[0][1], VoxelConfig(grid=16))
    with pytest.raises(ValueError, match="species_source must be one of"):
        decode(density, species_source="segmenter")
    box = VoxelConfig(representation="box", box_mode="lattice", grid=16)
    assert len(decode(voxelize(demo_set[0][1], box), species_source="density", iterations=0)) > 0
