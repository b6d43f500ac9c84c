"""The shipped reference models: loadable on a fresh clone, small, and still reconstructing held-out
crystals (rows of our test split of the shared data, in tests/data) at about the rate their RESULTS.json records."""
import json
import warnings
from pathlib import Path

import pytest
from conftest import data_csv

from crystalae.pretrained import PRETRAINED, pretrained_models
from crystalae.shards import split_of

# A regression guard on 40 held-out crystals: well below the recorded full-test-split figure, so that
# sampling noise does not fail it, but far above what an untrained or broken model scores (0%).
FLOOR = {"perov_5": 0.5, "carbon_24": 0.3}


def _held_out(name: str, count: int):
    from crystalae.sources import list_entries, load_structure

    entries = [e for e in list_entries(data_csv(name)) if split_of(e.material_id, 0.1, 0.1) == "test"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(e.material_id, load_structure(e)) for e in entries[:count]]


@pytest.mark.parametrize("name", sorted(FLOOR))
def test_shipped_model_reconstructs_held_out_crystals(name, tmp_path):
    from crystalae.checkpoint import load_checkpoint
    from crystalae.reconstruct import reconstruct

    folder = PRETRAINED / name
    if not (folder / "checkpoint.pt").exists():
        pytest.skip(f"{folder} not shipped in this checkout")
    assert (folder / "checkpoint.pt").stat().st_size < 25 * 2**20
    recorded = json.loads((folder / "RESULTS.json").read_text())
    assert recorded["command"].startswith(("python bench/reconstruction.py --recipe pretrained/",
                                           "python bench/reconstruction.py --run "))
    loaded = load_checkpoint(folder)
    crystals = _held_out(name, 40)
    source = tmp_path / "held_out"
    source.mkdir()
    for mid, structure in crystals:
        structure.to(filename=str(source / f"{mid}.cif"))
    metrics = reconstruct(loaded, source, tmp_path / "rec.csv")
    assert metrics["n"] == len(crystals)
    assert metrics["match_rate"] >= FLOOR[name], metrics


def test_models_command_lists_shipped_models(capsys):
    from crystalae.cli import main

    if not pretrained_models():
        pytest.skip("no shipped models in this checkout")
    assert main(["models", "--registry", "/nonexistent-registry"]) == 0
    out = capsys.readouterr().out
    for m in pretrained_models():
        assert f"pretrained {m['name']}" in out
        if m["lineage"]:  # a model the platform found names its sweep, trial and data
            assert f"retrain of sweep {m['lineage']['sweep']} trial {m['lineage']['trial']}" in out
            assert f"dataset {m['dataset_hash'][:12]}" in out


def test_demo_ends_by_sampling_the_shipped_perov_model(tmp_path, capsys):
    from crystalae.search.demo_job import sample_pretrained

    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    sample_pretrained(tmp_path, count=4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["count"] == 4 and 0 <= summary["structural_validity"] <= 1
    assert "5/5 sampled 4 crystals from the shipped perov_5 model" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(FLOOR))
def test_shipped_models_sample_from_their_fitted_prior(name):
    """Samples use the prior fitted to the training latents (not N(0, I), whose draws mostly decode
    to overlapping atoms); 40 of them must be structurally valid well above the N(0, I) rate (35-42%)."""
    from crystalae.checkpoint import load_checkpoint
    from crystalae.generate import sample, validity

    folder = PRETRAINED / name
    if not (folder / "checkpoint.pt").exists():
        pytest.skip(f"{folder} not shipped in this checkout")
    loaded = load_checkpoint(folder)
    assert loaded.meta["latent_prior"] is not None
    valid = [validity(s)["structural_valid"] for s in sample(loaded, 40, seed=11)]
    assert sum(valid) / len(valid) >= 0.85


def test_shipped_perov_lineage_names_the_committed_sweep_record(monkeypatch):
    """The retrain command's lineage, rebuilt from the committed sweep record, names that record by a
    path inside the project (no folder of the machine that ran it), and matches the shipped model's."""
    from crystalae.search.retrain import trial_recipe

    root = Path(__file__).resolve().parents[1]
    shipped = json.loads((root / "pretrained/perov_5/RESULTS.json").read_text())["lineage"]
    monkeypatch.chdir(root)
    recipe = trial_recipe(root / "search/sweeps", f"{shipped['sweep']}/{shipped['trial']}")
    assert recipe["lineage"]["sweep_dir"] == shipped["sweep_dir"] == "search/sweeps/perov_5"
    assert recipe["params"] == shipped["params"]


def test_models_report_the_figure_of_their_default_decoding_beside_the_raw_one():
    from crystalae.pretrained import default_decoding_figures

    assert default_decoding_figures({"test_match_rate": 0.9}) is None  # decodes raw: the test_* figures say it
    snapped = {"symmetrized": {"chosen_symprec": 0.5, "test_symmetrized_match_rate": 0.7, "test_symmetrized_rms": 0.09}}
    assert default_decoding_figures(snapped) == {"match_rate": 0.7, "rms": 0.09, "decoding": "snapped at 0.5 Å"}
    both = {**snapped, "count_choice": {"test_chosen": {"match_rate": 0.69, "rms": 0.1, "symmetrized_match_rate": 0.76,
                                                         "symmetrized_rms": 0.097}}}
    assert default_decoding_figures(both) == {"match_rate": 0.76, "rms": 0.097,
                                              "decoding": "atom count by density fit, snapped at 0.5 Å"}
