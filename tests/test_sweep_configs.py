"""The sweep configs prepared for the geometry and atom-reader sweeps search their new levers."""
from pathlib import Path

import pytest

from crystalae.search.config import load_sweep_config


@pytest.mark.parametrize("name", ["carbon_24-geometry", "perov_5-readers"])
def test_the_prepared_sweeps_search_axis_permutations_and_the_atom_reader(name, shipped_config_cwd):
    from crystalae.search.config import trial_overrides

    repo = Path(__file__).resolve().parents[1]
    # their data paths are relative to the repository root: shipped_config_cwd maps them to tests/data
    config = load_sweep_config(repo / "search" / "configs" / f"{name}.yaml")
    lever = {"carbon_24-geometry": "permute_axes", "perov_5-readers": "species_from"}[name]
    values = {p.name: p.values for p in config.search_space}[lever]
    assert len(values) == 2
    for value in values:
        point = next(p for p in config.points if p[lever] == value)
        voxel, model, train = trial_overrides(config, point)
        assert (train if lever == "permute_axes" else model)[lever] == value
        assert config.voxel_config(voxel).sigma == 0.5


def test_a_sweep_from_a_base_model_that_does_not_exist_is_refused_before_any_trial(tmp_path, shipped_config_cwd):
    from crystalae.search.config import SweepConfigError

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "search" / "configs" / "perov_5-readers.yaml").read_text()
    assert "init_from: perov_5," in text  # the readers' sweep starts from the shipped model
    path = tmp_path / "readers.yaml"
    path.write_text(text.replace("init_from: perov_5,", "init_from: no-such-model,"))
    with pytest.raises(SweepConfigError, match="train.init_from: .*no-such-model"):
        load_sweep_config(path)
