"""Renamed configuration fields and keywords are still read, with one deprecation line where a user wrote
them (`crystalae.config.RENAMED_FIELDS`)."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from crystalae.config import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkpoints_train_config_with_the_old_name_reads_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="crystalae"):
        assert TrainConfig.from_dict({"seg_weight": 2.5}).species_weight == 2.5
    assert not caplog.records
    with pytest.raises(ConfigError, match="one field"):
        TrainConfig.from_dict({"seg_weight": 1.0, "species_weight": 2.0})


def test_a_sweep_yaml_with_the_old_name_loads_under_the_new_one_with_one_line(tmp_path, caplog,
                                                                             shipped_config_cwd):
    from crystalae.search.config import load_sweep_config

    path = tmp_path / "old.yaml"
    old = (ROOT / "search/configs/perov_5-readers.yaml").read_text()
    old = old.replace("search_space:\n", "search_space:\n  seg_weight: {type: loguniform, low: 0.3, high: 3.0}\n")
    old = old.replace("background_weight: 0.1}", "background_weight: 0.1, seg_weight: 1.0}")
    assert old.count("seg_weight") == 3  # the search space and both first points, as configs were written
    path.write_text(old)
    with caplog.at_level(logging.WARNING, logger="crystalae"):
        sweep = load_sweep_config(path)
    assert "species_weight" in [p.name for p in sweep.search_space]
    assert all("species_weight" in p and "seg_weight" not in p for p in sweep.points)
    lines = [r.getMessage() for r in caplog.records if "seg_weight" in r.getMessage()]
    assert len(lines) == 1 and "'species_weight'" in lines[0] and str(path) in lines[0]


def test_the_committed_perov_5_sweep_record_retrains_its_trial_under_the_new_name():
    from crystalae.search.config import SweepConfig, point_problem, trial_overrides

    sweep = SweepConfig.from_dict(json.loads((ROOT / "search/sweeps/perov_5/sweep.json").read_text()))
    params = json.loads((ROOT / "search/sweeps/perov_5/trials/ce5b469f/params.json").read_text())
    assert "seg_weight" in params  # the record as it was written
    assert point_problem(sweep.search_space, params) is None
    assert trial_overrides(sweep, params)[2]["species_weight"] == params["seg_weight"]


def test_decode_still_reads_its_old_species_from_keyword(demo_set):
    from crystalae.config import VoxelConfig
    from crystalae.decode import decode
    from crystalae.voxelize import voxelize

    density = voxelize(demo_set[0][1], VoxelConfig(grid=16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = decode(density, species_from="labels")
    assert old == decode(density, species_source="labels")
    assert any("species_source" in str(w.message) for w in caught)
