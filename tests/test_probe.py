"""Issue 37: one-line messages for the raw cases the third probe found, no false success, and hostile
cases for the surfaces added since the second probe (the Python API, `search.points`, the `tracking:`
section, `.cif.gz` / `.extxyz` / `.xsf` sources, `generate --relax`). Each test says what must happen:
a clear error, nothing lost, nothing half-written that looks complete."""
from __future__ import annotations

import gzip
import json
import re
import socket
import time
from pathlib import Path

import pytest
from test_reliability import GOOD_CIF, fails

from crystalae.cli import main

# --- item 3: raw messages ---------------------------------------------------------------------------


def test_prepare_into_a_missing_bucket_is_the_registry_s_one_line(s3_bucket, tmp_path, capsys):
    missing = s3_bucket.replace("s3://", "s3://no-such-")
    fails(capsys, ["data", "prepare", "demo:2", "--out", f"{missing}/ds", "--grid", "8", "--workers", "1"],
          f"--out {missing}/ds: the bucket {missing} does not exist")
    from crystalae.registry import Registry, RegistryError

    with pytest.raises(RegistryError, match=f"registry {missing}/reg: the bucket {missing} does not exist"):
        Registry(f"{missing}/reg").entries()


@pytest.fixture
def dropping_address():
    """HOST:PORT on 127.0.0.x whose listen queue is full, so the kernel drops every new SYN (a host that
    drops packets: a connect hangs until its timeout)."""
    server = socket.socket()
    server.bind(("127.0.0.5", 0))
    server.listen(0)
    port = server.getsockname()[1]
    held = []
    for _ in range(4):  # fill the accept queue; nothing ever accepts
        client = socket.socket()
        client.setblocking(False)
        try:
            client.connect(("127.0.0.5", port))
        except BlockingIOError:
            pass
        held.append(client)
    time.sleep(0.1)
    yield f"127.0.0.5:{port}"
    for client in held:
        client.close()
    server.close()


def test_a_ray_address_that_drops_packets_is_one_line_within_the_timeout(dropping_address, tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\ndata: {source: 'demo:8', grid: 8}\nmodel: {depth: 1}\n"
                     "search_space: {lr: {type: loguniform, low: 0.001, high: 0.01}}\n")
    started = time.monotonic()
    fails(capsys, ["sweep", str(sweep), "--storage", str(tmp_path / "sweeps"), "--address", dropping_address],
          f"no Ray cluster answers at {dropping_address}", "TimeoutError")
    assert time.monotonic() - started < 20  # the connect timeout, not Ray's minutes of retries
    assert not (tmp_path / "sweeps").exists()


def test_a_port_that_accepts_but_is_not_ray_is_one_line_within_the_timeout(tmp_path, capsys):
    """Ray's own client retries such a port for minutes (the probe's 'unexpected ConnectionError')."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.6", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    address = f"127.0.0.6:{server.getsockname()[1]}"
    started = time.monotonic()
    fails(capsys, ["data", "prepare", "demo:2", "--out", str(tmp_path / "ds"), "--ray", "--address", address],
          f"no Ray cluster answers at {address}")
    assert time.monotonic() - started < 20 and not (tmp_path / "ds").exists()
    server.close()


def test_load_names_a_missing_path_and_sample_refuses_a_negative_count(tmp_path):
    import crystalae
    from crystalae.pretrained import PRETRAINED

    for ref in ("/nope/ckpt", str(tmp_path / "gone"), "./ckpt", "model.pt"):
        with pytest.raises(LookupError, match="the path does not exist") as info:
            crystalae.load(ref)
        assert "invalid model name" not in str(info.value)
    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    model = crystalae.load(PRETRAINED / "perov_5", device="cpu")
    for n in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="number of samples"):
            model.sample(n)
    assert model.sample(0) == []


# --- item 1: no false success -----------------------------------------------------------------------


def test_generate_refuses_a_model_without_a_prior_and_says_which_prior_it_used(tmp_path, capsys, tiny_checkpoint):
    from crystalae.pretrained import PRETRAINED

    line = fails(capsys, ["generate", "--checkpoint", str(tiny_checkpoint), "--sample", "2", "--out",
                          str(tmp_path / "g")], "no fitted latent prior", "crystalae fit-prior --checkpoint",
                 str(tiny_checkpoint))
    assert "--prior normal" in line and not (tmp_path / "g").exists()  # refused before anything is written
    # asked for N(0, I) explicitly: it runs; the untrained model decodes nothing, so it does not exit 0
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--sample", "2", "--prior", "normal",
                 "--out", str(tmp_path / "n")]) == 1
    captured = capsys.readouterr()
    assert "wrote 0 of 2" in captured.out and "none of the 2 latents decoded" in captured.err
    assert json.loads((tmp_path / "n" / "summary.json").read_text())["prior"] == {"kind": "normal", "temperature": 1.0}
    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    assert main(["generate", "--checkpoint", str(PRETRAINED / "perov_5"), "--sample", "2", "--out",
                 str(tmp_path / "p")]) == 0
    assert "from the posterior prior at temperature 0.05 (the kind stored with the model)" in capsys.readouterr().out


def test_promoting_a_checkpoint_folder_without_a_prior_warns_and_fit_prior_there_is_refused(tmp_path, capsys,
                                                                                           tiny_checkpoint):
    registry = str(tmp_path / "reg")
    assert main(["promote", str(tiny_checkpoint), "--registry", registry]) == 0
    assert "no latent prior" in capsys.readouterr().err
    fails(capsys, ["promote", str(tiny_checkpoint), "--registry", registry, "--fit-prior"],
          "--fit-prior", "crystalae fit-prior --checkpoint")


# --- item 4: hostile cases for the newer surfaces ---------------------------------------------------


@pytest.mark.parametrize("name, data, needle", [
    ("bomb.cif.gz", gzip.compress(b"#" * (2 << 20)), "decompresses to over"),  # a gzip bomb stops at 1 MB
    ("cut.cif.gz", gzip.compress(GOOD_CIF.encode())[:40], "cannot be read"),  # a truncated download
    ("plain.cif.gz", GOOD_CIF.encode(), "cannot be read"),  # not gzip at all
    ("nan.extxyz", b"1\nLattice=\"nan 0 0 0 4 0 0 0 4\" Properties=species:S:1:pos:R:3 pbc=\"T T T\"\nNa 0 0 0\n",
     "NaN or infinite"),
    ("flat.xsf", b"CRYSTAL\nPRIMVEC\n4 0 0\n0 4 0\n4 4 1e-9\nPRIMCOORD\n1 1\n11 0 0 0\n", "degenerate lattice"),
    ("molecule.extxyz", b"1\nProperties=species:S:1:pos:R:3\nNa 0 0 0\n", "not a periodic crystal"),
    ("huge.xsf", b"CRYSTAL\nPRIMVEC\n1e9 0 0\n0 1e9 0\n0 0 1e9\nPRIMCOORD\n1 1\n11 0 0 0\n", "over 100 Å"),
])
def test_hostile_structure_files_are_rejected_as_their_row_and_the_rest_is_written(tmp_path, capsys, name, data,
                                                                                   needle):
    if name.endswith((".extxyz", ".xsf")):
        pytest.importorskip("ase")
    source = tmp_path / "src"
    source.mkdir()
    (source / name).write_bytes(data)
    (source / "good.cif").write_text(GOOD_CIF)
    assert main(["data", "prepare", str(source), "--out", str(tmp_path / "ds"), "--grid", "8", "--workers", "1"]) == 0
    rejects = (tmp_path / "ds" / "rejects.csv").read_text()
    assert needle in rejects and len(rejects.splitlines()) == 2, rejects
    assert "1 rejected" in capsys.readouterr().out


@pytest.mark.parametrize("section, needle", [
    ("search: {points: [{lr: .nan}]}", "lr"),  # NaN is no point of a log-uniform range
    ("search: {points: [{lr: .inf}]}", "lr"),
    ("search: {points: [{lr: 0.005, depth: 3}]}", "depth"),  # a key the search space does not have
    ("search: {points: [{}]}", "point"),
    ("search: {points: {lr: 0.005}}", "points"),  # a mapping, not a list
    ("search: {points: [{lr: 1.0e+300}]}", "lr"),
    ("tracking: {mlflow: 42}", "mlflow"),
    ("tracking: {mlflow: ''}", "tracking.mlflow is empty"),  # would run the sweep untracked, without a word
    ("tracking: {mlflow: '   '}", "tracking.mlflow is empty"),
    ("tracking: {wandb_project: ''}", "tracking.wandb_project is empty"),
    ("tracking: {mlflow: 'sqlite:///m.db', mlflow_experiment: ''}", "tracking.mlflow_experiment is empty"),
    ("tracking: {nope: x}", "nope"),
    ("tracking: [sqlite:///m.db]", "tracking"),
])
def test_hostile_search_points_and_tracking_sections_are_refused_before_ray_starts(tmp_path, capsys, section, needle):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\ndata: {source: 'demo:8', grid: 8}\nmodel: {depth: 1}\n"
                     f"search_space: {{lr: {{type: loguniform, low: 0.001, high: 0.01}}}}\n{section}\n")
    fails(capsys, ["sweep", str(sweep), "--storage", str(tmp_path / "sweeps")], needle)
    assert not (tmp_path / "sweeps").exists()


def test_hostile_api_inputs_are_clear_errors(tmp_path, tiny_checkpoint):
    import numpy as np

    import crystalae
    from crystalae.sources import SourceError, StructureError

    model = crystalae.load(tiny_checkpoint, device="cpu")
    for latents in (np.full((1, 4), np.nan), np.full((1, 4), np.inf), np.zeros((2, 5)), np.zeros((2, 2, 4))):
        with pytest.raises(ValueError, match="latents must"):
            model.decode(latents)
    assert model.decode(np.full((1, 4), 1e30)) == [None]  # far from any crystal: nothing, quickly
    with pytest.raises(TypeError, match="item 0"):
        model.encode([42])
    with pytest.raises(SourceError, match="does not exist"):
        model.encode(str(tmp_path / "missing.cif"))
    (tmp_path / "bad.cif").write_text("data_x\n_cell_length_a oops\n")
    with pytest.raises(StructureError, match="bad.cif"):
        model.reconstruct(tmp_path / "bad.cif")
    with pytest.raises(ValueError, match="steps"):
        model.interpolate(tmp_path / "bad.cif", tmp_path / "bad.cif", steps=1)
    assert model.encode([]).shape == (0, 4)


# --- item 4: `train --from-trial` -------------------------------------------------------------------


@pytest.fixture
def sweep_storage(tmp_path):
    """A sweeps folder holding `tiny` (its sweep.json as a real sweep writes it) with one good trial and
    trials whose params.json is missing, damaged, not a mapping, NaN, negative or has a key the space lacks;
    `hollow`, whose sweep.json is valid JSON but no configuration. No Ray, no training."""
    from conftest import TINY_SWEEP

    from crystalae.files import load_yaml
    from crystalae.search.config import parse_sweep_config

    root = tmp_path / "sweeps" / "tiny"
    trials = {"a1": {"latent_dim": 4, "sigma": 0.5, "lr": 0.005}, "np": None, "bad": "{not json",
              "list": [1, 2], "nan": '{"latent_dim": 4, "sigma": NaN, "lr": 0.005}',
              "neg": {"latent_dim": -4, "sigma": 0.5, "lr": 0.005},
              "extra": {"latent_dim": 4, "sigma": 0.5, "lr": 0.005, "evil": 1}}
    for trial, params in trials.items():
        (root / "trials" / trial).mkdir(parents=True)
        if params is not None:
            (root / "trials" / trial / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    (root / "sweep.json").write_text(json.dumps(parse_sweep_config(load_yaml(TINY_SWEEP)).as_dict()))
    (tmp_path / "sweeps" / "hollow" / "trials" / "a1").mkdir(parents=True)
    (tmp_path / "sweeps" / "hollow" / "sweep.json").write_text("{}")
    (tmp_path / "sweeps" / "hollow" / "trials" / "a1" / "params.json").write_text("{}")
    return tmp_path / "sweeps"


@pytest.mark.parametrize("ref, options, needle", [
    ("tiny", [], "give SWEEP/TRIAL"),
    ("", [], "give SWEEP/TRIAL"),
    ("../x/y", [], "invalid sweep or trial name '..'"),  # traversal out of --sweeps
    ("tiny/../tiny/a1", [], "invalid sweep or trial name '..'"),
    ("tiny/..", [], "invalid sweep or trial name '..'"),
    ("nope/a1", [], "no sweep at"),  # a missing sweep
    ("tiny/zz", [], "sweep tiny has no trial 'zz'"),
    ("tiny/np", [], "sweep tiny has no trial 'np' with params.json"),  # a trial that never wrote its params
    ("tiny/bad", [], "params.json is damaged"),
    ("tiny/list", [], "must be a mapping"),
    ("tiny/nan", [], "sigma=nan"),
    ("tiny/neg", [], "latent_dim=-4"),
    ("tiny/extra", [], "not searched ['evil']"),
    ("hollow/a1", [], "holds no sweep configuration"),
    ("tiny/a1", ["--epochs", "0"], "epochs must be >= 1"),
    ("tiny/a1", ["--epochs", "-5"], "epochs must be >= 1"),
    ("tiny/a1", ["--name", "../evil"], "invalid run name '../evil'"),  # the run folder stays under --storage
    ("tiny/a1", ["--name", "/tmp/evil"], "invalid run name '/tmp/evil'"),
    ("tiny/a1", ["--mlflow", ""], "--mlflow is empty"),  # would train without tracking, without a word
    ("tiny/a1", ["--lr", "0.1"], "drop --config"),
])
def test_hostile_from_trial_refs_and_options_are_one_line_before_anything_is_written(sweep_storage, tmp_path, capsys,
                                                                                    ref, options, needle):
    before = sorted(p.relative_to(sweep_storage) for p in sweep_storage.rglob("*"))
    fails(capsys, ["train", "--from-trial", ref, "--sweeps", str(sweep_storage), "--storage", str(tmp_path / "train"),
                   *options], needle)
    assert not (tmp_path / "train").exists() and not (tmp_path / "evil").exists()  # no run, no shards prepared
    assert sorted(p.relative_to(sweep_storage) for p in sweep_storage.rglob("*")) == before  # the sweep untouched


def test_from_trial_epochs_that_are_no_whole_number_are_refused_by_the_parser(sweep_storage, tmp_path, capsys):
    from test_reliability import fails_to_parse

    for value in ("nan", "1e9", "", "inf"):
        fails_to_parse(capsys, ["train", "--from-trial", "tiny/a1", "--sweeps", str(sweep_storage), "--epochs", value],
                       "--epochs")


def test_a_damaged_sibling_trial_does_not_block_retraining_the_good_one(sweep_storage):
    """tiny/bad's params.json is damaged: the recipe of tiny/a1 still reads, and with no warning about
    another trial's files."""
    import warnings

    from crystalae.search.retrain import trial_recipe

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recipe = trial_recipe(sweep_storage, "tiny/a1")
    assert recipe["params"] == {"latent_dim": 4, "sigma": 0.5, "lr": 0.005} and recipe["trial"] == "a1"
    assert recipe["lineage"]["sweep"] == "tiny" and recipe["train"]["epochs"] == 2


def test_plain_train_refuses_a_run_name_that_leaves_storage(tmp_path, capsys):
    for name in ("../evil", "a/b", "/abs", ".hidden", "x" * 65):
        fails(capsys, ["train", "--data", str(tmp_path / "ds"), "--storage", str(tmp_path / "runs"), "--name", name],
              "invalid run name")
    assert not (tmp_path / "runs").exists()


# --- item 4: `generate --relax` ---------------------------------------------------------------------


def test_generate_relax_without_chgnet_or_with_zero_steps_is_refused_before_anything(tmp_path, capsys, monkeypatch,
                                                                                    tiny_checkpoint):
    from test_reliability import fails_to_parse

    base = ["generate", "--checkpoint", str(tiny_checkpoint), "--sample", "2", "--prior", "normal",
            "--out", str(tmp_path / "g"), "--relax"]
    fails_to_parse(capsys, [*base, "--relax-steps", "0"], "--relax-steps")
    fails_to_parse(capsys, [*base, "--relax-steps", "-3"], "--relax-steps")
    monkeypatch.setattr("crystalae.relax.relax_available", lambda: False)
    fails(capsys, base, "--relax needs CHGNet", "pip install 'crystalae[relax]'")
    assert not (tmp_path / "g").exists()


def test_relax_keeps_a_crystal_the_potential_cannot_handle_as_it_was():
    pytest.importorskip("chgnet")
    from pymatgen.core import Lattice, Structure

    from crystalae.relax import relax

    with pytest.raises(ValueError, match="steps"):
        relax([None], steps=0)
    salt = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    oganesson = Structure(Lattice.cubic(4.0), ["Og"], [[0, 0, 0]])  # no element CHGNet knows
    out, record = relax([salt, oganesson, None], steps=2, workers=1)
    assert out[1] is oganesson and out[2] is None and out[0] is not salt
    assert record["relaxed"] == 1 and record["failed"] == 1


def test_generate_relax_writes_a_crystal_that_failed_to_relax_as_decoded_and_reports_it(tmp_path, capsys,
                                                                                       monkeypatch):
    pytest.importorskip("chgnet")
    from pymatgen.core import Lattice, Structure

    import crystalae.relax
    from crystalae.pretrained import PRETRAINED

    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    real = crystalae.relax.relax
    oganesson = Structure(Lattice.cubic(4.0), ["Og"], [[0, 0, 0]])

    def second_one_unrelaxable(structures, steps):  # the real relaxation, the second crystal swapped for Og
        return real([structures[0], oganesson], steps=steps, workers=1)

    monkeypatch.setattr(crystalae.relax, "relax", second_one_unrelaxable)
    out = tmp_path / "g"
    assert main(["generate", "--checkpoint", str(PRETRAINED / "perov_5"), "--sample", "2", "--relax",
                 "--relax-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "relaxed 1 of 2 decoded crystals with CHGNet" in printed
    assert "1 could not be relaxed and are written as decoded" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["relaxation"]["failed"] == 1 and summary["relaxation"]["relaxed"] == 1
    assert summary["decoded"] == 2 and "Og" in (out / "sample-0001.cif").read_text()


# --- item 4: the dashboard's batch metrics (Generate page) ------------------------------------------


HUGE_CELL_CIF = GOOD_CIF.replace(" 4.0\n", " 1e8\n")  # a, b and c of 1e8 Å


@pytest.mark.parametrize("reference, needle", [
    ("demo:0", "use demo or demo:N"),
    ("demo:99999999", "use demo or demo:N"),  # no unbounded built-in set
    ("missing.csv", "does not exist"),
    ("../" * 16 + "etc/passwd", "unknown structure format"),  # traversal to a file that is no crystal
    ("huge.cif", "over 100 Å"),  # the reason, not only "no readable crystal"
    ("bomb.cif.gz", "decompresses to over"),
    ("empty.csv", "not a readable CSV"),
    ("header.csv", "a header and no rows"),
])
def test_batch_metrics_refuse_a_hostile_reference_and_drop_the_earlier_result(tmp_path, monkeypatch, reference, needle):
    pytest.importorskip("streamlit")
    pytest.importorskip("matminer")
    from streamlit.testing.v1 import AppTest

    from crystalae.pretrained import PRETRAINED

    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    (tmp_path / "huge.cif").write_text(HUGE_CELL_CIF)
    (tmp_path / "bomb.cif.gz").write_bytes(gzip.compress(b"#" * (2 << 20)))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("material_id,cif\n")
    (tmp_path / "sweeps").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRYSTALAE_STORAGE", str(tmp_path / "sweeps"))
    monkeypatch.setenv("CRYSTALAE_REGISTRY", str(tmp_path / "no-registry"))
    page = Path(__file__).resolve().parents[1] / "dashboard" / "pages" / "3_Generate.py"
    at = AppTest.from_file(str(page), default_timeout=120).run()
    at.selectbox(key="generate_model").set_value("perov_5 (shipped)").run()
    at.session_state["batch_metrics"] = {"title": "an earlier batch"}  # must not stay on show under a failure
    at.number_input(key="batch_count").set_value(2)
    at.text_input(key="batch_reference").input(reference)
    at.button(key="batch_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 1 and warnings[0].startswith("Batch metrics failed") and needle in warnings[0], warnings
    assert not at.metric and not at.subheader


def test_batch_metrics_with_no_reference_ask_for_one_instead_of_reading_the_current_folder(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    (tmp_path / "sweeps").mkdir()
    (tmp_path / "good.cif").write_text(GOOD_CIF)  # what an empty field would have read
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRYSTALAE_STORAGE", str(tmp_path / "sweeps"))
    monkeypatch.setenv("CRYSTALAE_REGISTRY", str(tmp_path / "no-registry"))
    monkeypatch.setattr("crystalae.coverage.matminer_available", lambda: True)
    page = Path(__file__).resolve().parents[1] / "dashboard" / "pages" / "3_Generate.py"
    at = AppTest.from_file(str(page), default_timeout=120).run()
    for empty in ("", "   "):
        at.text_input(key="batch_reference").input(empty).run()
        assert not at.exception and "Give the reference crystals" in " ".join(i.value for i in at.info)
        assert "batch_go" not in [b.key for b in at.button]


# --- the independent probe's kind of cases: more hostile inputs and odd combinations ---------------


@pytest.mark.parametrize("old, new, needle", [
    ("Na1 Na 0 0 0", "Na1 Na 0 0 0 -1", "_atom_site_occupancy -1 is not in (0, 1]"),  # pymatgen dropped the site
    ("Na1 Na 0 0 0", "Na1 Na 0 0 0 0", "_atom_site_occupancy 0 is not in (0, 1]"),
    ("Na1 Na 0 0 0", "Na1 Na 0 0 0 1.5", "_atom_site_occupancy 1.5 is not in (0, 1]"),
    ("Na1 Na 0 0 0", "Na1 Na 1e300 0 0 1", "_atom_site_fract_x 1e+300 is not within ±1000"),  # wrapped to 0
    ("Na1 Na 0 0 0", "Na1 Na 0 nan 0 1", "_atom_site_fract_y nan"),
])
def test_cif_sites_pymatgen_would_silently_change_are_rejected_as_their_row(tmp_path, capsys, old, new, needle):
    source = tmp_path / "src"
    source.mkdir()
    text = GOOD_CIF.replace("_atom_site_fract_z\n", "_atom_site_fract_z\n_atom_site_occupancy\n")
    (source / "bad.cif").write_text(text.replace("Cl1 Cl 0.5 0.5 0.5", "Cl1 Cl 0.5 0.5 0.5 1").replace(old, new))
    (source / "good.cif").write_text(GOOD_CIF)
    assert main(["data", "prepare", str(source), "--out", str(tmp_path / "ds"), "--grid", "8", "--workers", "1"]) == 0
    rejects = (tmp_path / "ds" / "rejects.csv").read_text()
    assert needle in rejects and "bad" in rejects and len(rejects.splitlines()) == 2, rejects
    # fractions and uncertainties as CIFs write them are read as before
    (source / "bad.cif").write_text(text.replace("Cl1 Cl 0.5 0.5 0.5", "Cl1 Cl 0.5(1) 0.5 0.5 1.0(0)")
                                    .replace("Na1 Na 0 0 0", "Na1 Na -1.0 0 0 ?"))
    assert main(["data", "prepare", str(source), "--out", str(tmp_path / "ds2"), "--grid", "8", "--workers", "1"]) == 0
    assert "0 rejected" in capsys.readouterr().out


def test_a_csv_with_a_header_and_no_rows_is_no_success(tmp_path, capsys, tiny_checkpoint):
    empty = tmp_path / "empty.csv"
    empty.write_text("material_id,cif\n")
    for argv in (["data", "prepare", str(empty), "--out", str(tmp_path / "ds"), "--grid", "8"],
                 ["reconstruct", str(empty), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "r.csv")],
                 ["roundtrip", str(empty), "--out", str(tmp_path / "t.csv"), "--grid", "8"]):
        fails(capsys, argv, str(empty), "a header and no rows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.csv"]  # nothing written that looks like a result


def test_prepare_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    fails(capsys, ["data", "prepare", "demo:2", "--out", str(tmp_path / "taken"), "--grid", "8"],
          f"--out {tmp_path / 'taken'} is a file")
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("options, needle", [
    (["--sample", "1", "--relax-steps", "5"], "--relax-steps does something only with --relax"),
    (["--sample", "1", "--steps", "7"], "--steps does something only with --interpolate"),
    (["--sample", "1", "--scale", "2"], "--scale does something only with --alter"),
    (["--sample", "1", "--count", "3"], "--count does something only with --alter"),
    (["--sample", "1", "--cutoffs", "0.1", "1"], "--cutoffs does something only with --reference"),
    (["--sample", "1", "--reference-limit", "3"], "--reference-limit does something only with --reference"),
    (["--sample", "1", "--source", "demo:3"], "--source does something only with --interpolate or --alter"),
    (["--alter", "x", "--source", "demo:3", "--temperature", "2"], "--temperature does something only with --sample"),
])
def test_generate_refuses_an_option_that_would_be_ignored(tmp_path, capsys, tiny_checkpoint, options, needle):
    fails(capsys, ["generate", "--checkpoint", str(tiny_checkpoint), "--prior", "normal", "--out", str(tmp_path / "g"),
                   *options], needle)
    assert not (tmp_path / "g").exists()


def test_registry_names_cannot_hide_one_another(tmp_path, capsys, tiny_checkpoint):
    from crystalae.pretrained import pretrained_models

    registry = str(tmp_path / "reg")
    promote = ["promote", str(tiny_checkpoint), "--registry", registry]
    assert main([*promote, "--name", "mine", "--alias", "best"]) == 0
    capsys.readouterr()
    fails(capsys, [*promote, "--name", "best"], "model name 'best' is an alias", "mine@1")  # NAME would mean the alias
    fails(capsys, [*promote, "--name", "other", "--alias", "mine"], "alias 'mine' is the name of a model")
    fails(capsys, [*promote, "--name", "twin", "--alias", "twin"], "alias 'twin' is the name of a model")
    fails(capsys, ["alias", "mine", "mine@1", "--registry", registry], "alias 'mine' is the name of a model")
    shipped = [m["name"] for m in pretrained_models()]
    if shipped:  # --model NAME takes the shipped model first: a registry model of that name is never reached
        fails(capsys, [*promote, "--name", shipped[0]], f"model name {shipped[0]!r} is a shipped model's name")
        fails(capsys, ["alias", shipped[0], "mine@1", "--registry", registry], f"alias {shipped[0]!r} is a shipped")
    from crystalae.registry import Registry

    assert [e["ref"] for e in Registry(registry).entries()] == ["mine@1"] and Registry(registry).aliases() == {
        "best": "mine@1"}


def test_api_counts_spreads_seeds_and_devices_are_checked_before_any_work(tiny_checkpoint):
    """Each was a torch allocation of hundreds of GB, a raw TypeError/RuntimeError/AssertionError, or NaN
    latents decoded without a word."""
    import crystalae

    with pytest.raises(ValueError, match="device 'bogus' is not a torch device"):
        crystalae.load(tiny_checkpoint, device="bogus")
    with pytest.raises(ValueError, match="device 'cuda:99': this machine has"):
        crystalae.load(tiny_checkpoint, device="cuda:99")
    with pytest.raises(LookupError, match="give a model"):
        crystalae.load("")
    import numpy as np

    model = crystalae.load(tiny_checkpoint, device="cpu")
    salt = "never-read.cif"  # every case is refused before a structure is read
    cases = [
        (lambda: model.sample(10**9, prior="normal"), "number of samples must be a whole number in 0..100,000"),
        (lambda: model.sample(2, prior="normal", temperature=float("nan")), r"temperature must be"),
        (lambda: model.sample(2, prior="normal", temperature=-1.0), r"temperature must be"),
        (lambda: model.sample(2, prior="normal", temperature=float("inf")), r"temperature must be"),
        (lambda: model.sample(2, prior="normal", seed=-1), "the seed must be"),
        (lambda: model.sample(2, prior="normal", seed=2**70), "the seed must be"),
        (lambda: model.alter(salt, count=-1), "count must be a whole number"),
        (lambda: model.alter(salt, count=10**9), "count must be a whole number"),
        (lambda: model.alter(salt, scale=float("nan")), "scale must be a number"),
        (lambda: model.interpolate(salt, salt, steps=10**9), "steps must be a whole number in 2..1,000"),
        (lambda: model.interpolate(salt, salt, steps=2.5), "steps must be a whole number"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="got NoneType"):
        model.encode(None)
    assert model.decode([]) == [] and model.decode(np.zeros((0, 4))) == [] and model.alter(salt, count=0) == []


@pytest.mark.parametrize("section, key, value, needle", [
    ("", "name", "../x", "invalid sweep name"),  # the sweep folder stays under --storage
    ("", "name", "a/b", "invalid sweep name"),
    ("budget", "trials", float("nan"), "trials"),
    ("budget", "trials", 10**9, "trials"),
    ("budget", "epochs", float("inf"), "epochs"),
    ("budget", "time_budget_s", float("nan"), "time_budget_s"),
    ("data", "grid", 10**6, "grid"),
    ("data", "sigma", float("nan"), "sigma"),
    ("data", "source", "/etc/passwd", "unknown structure format"),  # found now, not by every trial later
    ("data", "source", ["demo:3", 5], "data.source"),
    ("data", "val_fraction", float("nan"), "val_fraction"),
    ("resources", "gpus_per_worker", float("nan"), "gpus_per_worker"),
    ("search", "reduction_factor", float("nan"), "reduction_factor"),
    ("search", "warm_start", "../../nope", "warm_start"),
    ("train", "lr", float("nan"), "lr"),
    ("train", "batch_size", 10**9, "batch_size"),
    ("model", "max_width", 10**7, "max_width"),
])
def test_hostile_sweep_values_are_refused_when_the_config_is_read(section, key, value, needle):
    import copy

    from conftest import TINY_SWEEP

    from crystalae.files import load_yaml
    from crystalae.search.config import SweepConfigError, parse_sweep_config

    raw = copy.deepcopy(load_yaml(TINY_SWEEP))
    (raw.setdefault(section, {}) if section else raw)[key] = value
    with pytest.raises(SweepConfigError, match=re.escape(needle)):
        parse_sweep_config(raw)


@pytest.fixture
def one_trial_sweep(tmp_path, tiny_checkpoint):
    """sweeps/fake: one trial whose best checkpoint is the tiny model; its dataset is gone."""
    root = tmp_path / "sweeps" / "fake"
    checkpoint = root / "trials" / "t1" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    for name in ("checkpoint.pt", "config.json"):
        (checkpoint / name).write_bytes((tiny_checkpoint / name).read_bytes())
    (root / "sweep.json").write_text(json.dumps({"name": "fake", "objective_metric": "val_score",
                                                 "objective_mode": "max", "epochs": 1}))
    (root / "trials" / "t1" / "params.json").write_text("{}")
    return tmp_path / "sweeps"


def test_registry_page_refuses_hostile_names_before_any_work_and_says_what_it_promoted(one_trial_sweep, tmp_path,
                                                                                       monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from crystalae.pretrained import pretrained_models
    from crystalae.registry import Registry

    registry = tmp_path / "reg"
    monkeypatch.setenv("CRYSTALAE_STORAGE", str(one_trial_sweep))
    monkeypatch.setenv("CRYSTALAE_REGISTRY", str(registry))
    page = Path(__file__).resolve().parents[1] / "dashboard" / "pages" / "4_Registry.py"
    at = AppTest.from_file(str(page), default_timeout=120).run()

    def promote(name: str, alias: str = "", fit_prior: bool = True) -> AppTest:
        at.text_input(key="promote_name").input(name)
        at.text_input(key="promote_alias").input(alias)
        box = at.checkbox(key="promote_fit_prior")
        box.check() if fit_prior else box.uncheck()
        at.checkbox(key="promote_confirm").check().run()
        return at.button(key="promote_go").click().run()

    hostile = [("../x", "", "invalid model name '../x'"), ("a/b", "", "invalid model name 'a/b'"),
               ("", "", "invalid model name ''"), ("ok", "../y", "invalid alias '../y'"),
               ("ok", "ok", "alias 'ok' is the name of a model")]
    shipped = [m["name"] for m in pretrained_models()]
    hostile += [(shipped[0], "", "is a shipped model's name")] if shipped else []
    for name, alias, needle in hostile:
        promote(name, alias)
        assert not at.exception and not at.success, [e.value for e in at.exception]
        assert len(at.error) == 1 and at.error[0].value.startswith("Promotion failed") and needle in at.error[0].value
    assert not Registry(registry).entries()  # nothing promoted, nothing half-copied
    promote("fake", fit_prior=False)
    assert "as `fake@1`, without a fitted latent prior: generating from it needs `crystalae fit-prior`" in \
        at.success[0].value
    promote("fake")  # asked for, but the trial's dataset is gone: said so, not claimed
    assert "`fake@2`, without a fitted latent prior (the trial's dataset is gone" in at.success[0].value
    assert [e["ref"] for e in Registry(registry).entries()] == ["fake@1", "fake@2"]
