"""What `generate` writes beside the CIFs for a user to triage: space group, symmetrized CIF, uniqueness,
relaxed energy and convergence."""
from __future__ import annotations

import csv
import json

import pytest
from pymatgen.core import Lattice, Structure

from crystalae.generate import write_generated


def test_summary_csv_gives_space_groups_symmetrized_cifs_and_uniqueness(tmp_path):
    salt = Structure(Lattice.cubic(5.6), ["Na"] * 4 + ["Cl"] * 4,
                     [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5]])
    shifted = salt.copy()
    shifted.translate_sites(list(range(len(shifted))), [0.01, 0, 0])  # the same crystal, a little off
    cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    summary = write_generated(tmp_path / "g", [("a", salt), ("b", shifted), ("c", None), ("d", cscl)])
    with open(tmp_path / "g" / "summary.csv", newline="") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    assert (rows["a"]["spacegroup"], rows["a"]["spacegroup_number"]) == ("Fm-3m", "225")
    assert rows["d"]["spacegroup"] == "Pm-3m"
    assert [rows[k]["unique"] for k in "abcd"] == ["True", "False", "", "True"]
    assert summary["uniqueness"] == 0.5  # two distinct crystals among four samples
    assert Structure.from_file(tmp_path / "g" / rows["a"]["symmetrized_cif"]).get_space_group_info()[0] == "Fm-3m"
    write_generated(tmp_path / "g", [("e", cscl)], overwrite=True)  # an earlier run's symmetrized CIFs go too
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["e.cif", "e.sym.cif", "summary.csv", "summary.json"]


def _salt(a: float = 5.6) -> Structure:
    return Structure(Lattice.cubic(a), ["Na"] * 4 + ["Cl"] * 4,
                     [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5]])


def test_novelty_is_against_the_training_crystals_and_unknown_training_sets_are_said_so(tmp_path):
    from crystalae.checkpoint import LoadedModel
    from crystalae.generate import TrainingSet
    from crystalae.search.training_set import training_set

    cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    known = TrainingSet({"NaCl": [_salt(5.5).to(fmt="cif")]}, "two training crystals")
    summary = write_generated(tmp_path / "g", [("a", _salt()), ("b", cscl), ("c", None)], training=known)
    with open(tmp_path / "g" / "summary.csv", newline="") as handle:
        assert [r["novel"] for r in csv.DictReader(handle)] == ["False", "True", ""]  # NaCl is in the training set
    assert summary["novelty"] == 1 / 3 and summary["novelty_note"] == "two training crystals"
    # a model whose dataset is nowhere here: no figure, and the summary says why rather than guess
    lost = training_set(LoadedModel(None, None, {"dataset_hash": "d4c55b4cf1138664", "lineage": None}), tmp_path)
    summary = write_generated(tmp_path / "h", [("a", _salt())], training=lost)
    assert summary["novelty"] is None
    assert summary["novelty_note"] == f"novelty not computed: the training set (dataset d4c55b4cf113) is not " \
                                      f"prepared in {tmp_path}"


def test_a_sweep_trials_training_set_is_found_by_its_dataset_hash(tiny_sweep):
    from crystalae.checkpoint import load_checkpoint
    from crystalae.loading import find_model
    from crystalae.search.training_set import training_set

    loaded = load_checkpoint(find_model("champion", tiny_sweep["registry"]))
    found = training_set(loaded, tiny_sweep["storage"])
    assert found.cifs and str(tiny_sweep["root"]) in found.note
    crystal = Structure.from_str(next(iter(found.cifs.values()))[0], fmt="cif")
    assert found.novel([crystal, None]) == [False, None]  # a training crystal is not novel


def test_relaxed_runs_fill_the_energy_and_convergence_columns_and_others_leave_them_empty(tmp_path, monkeypatch):
    pytest.importorskip("chgnet")
    import crystalae.relax
    from crystalae.cli import main
    from crystalae.generate import RELAXED_COLUMNS
    from crystalae.pretrained import PRETRAINED

    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    real = crystalae.relax.relax
    # one worker: a pool would only add start-up time for two small crystals
    monkeypatch.setattr(crystalae.relax, "relax", lambda structures, steps: real(structures, steps=steps, workers=1))
    columns = list(RELAXED_COLUMNS.values())
    for flags, out in ((["--relax", "--relax-steps", "2"], tmp_path / "relaxed"), ([], tmp_path / "plain")):
        assert main(["generate", "--checkpoint", str(PRETRAINED / "perov_5"), "--sample", "2", *flags,
                     "--out", str(out)]) == 0
    with open(tmp_path / "relaxed" / "summary.csv", newline="") as handle:
        relaxed = list(csv.DictReader(handle))
    per_crystal = json.loads((tmp_path / "relaxed" / "summary.json").read_text())["relaxation"]["per_crystal"]
    for i, row in enumerate(relaxed):
        assert float(row["relaxed_energy_per_atom"]) == pytest.approx(per_crystal["energy_per_atom"][i], abs=1e-4)
        assert float(row["initial_energy_per_atom"]) == pytest.approx(per_crystal["initial_energy_per_atom"][i],
                                                                      abs=1e-4)
        assert 1 <= int(row["relax_steps"]) <= 2 and row["relax_converged"] in ("True", "False")
    with open(tmp_path / "plain" / "summary.csv", newline="") as handle:
        assert all(row[c] == "" for row in csv.DictReader(handle) for c in columns)
