"""Regression tests for the hostile-input probe (issue 10): every bad option or file gives one error line
naming the input and the reason (exit 2, no traceback), nothing is lost silently, memory stays bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from crystalae.cli import main

GOOD_CIF = """data_NaCl
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Na1 Na 0 0 0
Cl1 Cl 0.5 0.5 0.5
"""


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI in-process; it must exit 2 with one error line containing every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("crystalae: warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def fails_to_parse(capsys, argv: list[str], *needles: str) -> None:
    """argparse-level refusals: also exit 2 with one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# --- silent data loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, needle", [
    ("--shard-size", "-1", "shard_size"), ("--shard-size", "0", "shard_size"),
    ("--limit", "-1", "limit"), ("--val-fraction", "2", "val_fraction"),
    ("--sigma", "inf", "sigma"), ("--cutoff-sigmas", "nan", "cutoff_sigmas"), ("--label-radius", "inf", "label_radius"),
    ("--grid", "1000", "grid 1000 is above the limit of 128"), ("--grid", "100000", "limit of 128"),
])
def test_bad_prepare_options_are_refused_before_anything_is_written(tmp_path, capsys, option, value, needle):
    out = tmp_path / "ds"
    fails(capsys, ["data", "prepare", "demo:4", "--out", str(out), option, value], needle)
    assert not out.exists()
    # the folder is not blocked: the same command with good options then works
    assert main(["data", "prepare", "demo:4", "--out", str(out), "--grid", "8", "--workers", "1"]) == 0


def test_shards_that_would_not_fit_in_memory_are_refused(tmp_path, capsys):
    out = tmp_path / "ds"
    fails(capsys, ["data", "prepare", "demo:4", "--out", str(out), "--representation", "box", "--rotations", "1000",
                   "--grid", "64"], "GiB", "--shard-size", "--rotations")
    assert not out.exists()


def test_a_run_that_rejects_every_row_is_an_error_not_exit_0(tmp_path, capsys):
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i in range(3):
        (folder / f"bad{i}.cif").write_text("data_x\n_cell_length_a 1\n")
    fails(capsys, ["data", "prepare", str(folder), "--out", str(tmp_path / "ds"), "--grid", "8", "--workers", "1"],
          "every one of the 3 structures was rejected", "rejects.csv")


def test_limit_skips_are_counted_in_the_summary_line(tmp_path, capsys):
    assert main(["data", "prepare", "demo:6", "--out", str(tmp_path / "ds"), "--grid", "8", "--limit", "4",
                 "--workers", "1"]) == 0
    line = capsys.readouterr().out
    assert "from 4 of 4 structures" in line and "2 skipped by --limit" in line


def test_one_unreadable_file_in_a_folder_is_rejected_with_its_name_and_the_rest_is_written(tmp_path, capsys):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "good.cif").write_text(GOOD_CIF)
    (folder / "binary.cif").write_bytes(bytes(range(256)) * 4)
    (folder / "latin.cif").write_bytes(GOOD_CIF.replace("NaCl", "NaCl\xe9").encode("latin-1"))
    out = tmp_path / "ds"
    assert main(["data", "prepare", str(folder), "--out", str(out), "--grid", "8", "--workers", "1"]) == 0
    assert "wrote 1 rows from 1 of 3 structures" in capsys.readouterr().out
    rejects = pd.read_csv(out / "rejects.csv")
    assert sorted(rejects["material_id"]) == ["binary", "latin"]
    assert all("not UTF-8" in reason for reason in rejects["reason"])
    assert rejects["reason"].str.contains("binary.cif").any()


# --- registry ---------------------------------------------------------------------------------------

def test_names_cannot_collide_with_the_registry_files(tmp_path, capsys, tiny_checkpoint):
    registry = tmp_path / "reg"
    for name in ("aliases.json", "x.lock", "../evil"):
        fails(capsys, ["promote", str(tiny_checkpoint), "--name", name, "--registry", str(registry)], "invalid model name")
    assert main(["promote", str(tiny_checkpoint), "--registry", str(registry), "--alias", "best"]) == 0
    assert main(["models", "--registry", str(registry)]) == 0
    assert "tinymodel@1 [best]" in capsys.readouterr().out


@pytest.mark.parametrize("garbage", [b"\xff\xfe garbage", b"[1, 2]", b'{"champion": 3}'])
def test_a_damaged_alias_file_is_named_and_breaks_nothing_else(tmp_path, capsys, tiny_checkpoint, garbage):
    from crystalae.registry import Registry, RegistryError

    registry = Registry(tmp_path / "reg")
    registry.promote(tiny_checkpoint, "m", alias="champion")
    (registry.root / "aliases.json").write_bytes(garbage)
    assert registry.resolve("m@1").name == "v1" and registry.resolve("m").name == "v1"  # plain refs still work
    with pytest.raises(RegistryError, match="aliases.json"):
        registry.resolve("champion")
    assert main(["models", "--registry", str(registry.root)]) == 0
    captured = capsys.readouterr()
    assert "m@1" in captured.out and "aliases.json" in captured.err
    # a promote that cannot set its alias creates nothing
    fails(capsys, ["promote", str(tiny_checkpoint), "--name", "m", "--alias", "new", "--registry", str(registry.root)],
          "aliases.json")
    assert registry.versions("m") == [1]


def test_alias_command_pins_an_existing_version(tmp_path, capsys, tiny_checkpoint):
    from crystalae.registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.promote(tiny_checkpoint, "m")
    registry.promote(tiny_checkpoint, "m")
    assert main(["alias", "champion", "m", "--registry", str(registry.root)]) == 0
    assert registry.aliases() == {"champion": "m@2"}
    assert main(["alias", "champion", "m@1", "--registry", str(registry.root)]) == 0
    assert registry.resolve("champion").name == "v1"
    capsys.readouterr()
    fails(capsys, ["alias", "champion", "m@9", "--registry", str(registry.root)], "no version")
    fails(capsys, ["alias", "../x", "m@1", "--registry", str(registry.root)], "invalid alias")
    assert registry.aliases() == {"champion": "m@1"}


def test_a_version_without_manifest_is_skipped_with_a_warning(tmp_path, capsys, tiny_checkpoint):
    from crystalae.registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.promote(tiny_checkpoint, "a")
    registry.promote(tiny_checkpoint, "b")
    (registry.root / "a" / "v1" / "manifest.json").unlink()
    assert main(["models", "--registry", str(registry.root)]) == 0
    captured = capsys.readouterr()
    assert "b@1" in captured.out and "a@1" not in captured.out
    assert "skipped" in captured.err and "a/v1" in captured.err


def test_promote_by_absolute_path_derives_the_name_from_the_folder(tmp_path, capsys, tiny_checkpoint):
    registry = tmp_path / "reg"
    assert main(["promote", str(tiny_checkpoint.resolve()), "--registry", str(registry)]) == 0
    assert "as tinymodel@1" in capsys.readouterr().out
    odd = tmp_path / "-odd name"
    odd.mkdir()
    (odd / "checkpoint.pt").write_bytes((tiny_checkpoint / "checkpoint.pt").read_bytes())
    fails(capsys, ["promote", str(odd), "--registry", str(registry)], "give --name")


# --- memory and size bounds ---------------------------------------------------------------------------

def test_roundtrip_refuses_a_huge_grid_up_front(tmp_path, capsys):
    fails(capsys, ["roundtrip", "demo:2", "--out", str(tmp_path / "o.csv"), "--grid", "100000"], "grid", "128")


def test_crystals_above_max_atoms_are_rejected_with_the_reason(tmp_path, capsys):
    from pymatgen.core import Lattice, Structure

    big = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]) * (10, 10, 10)
    big.to(filename=str(tmp_path / "big.cif"))
    out = tmp_path / "o.csv"
    # issue 37: a run whose every input was refused scored nothing, so it exits 2 naming the reason
    fails(capsys, ["roundtrip", str(tmp_path / "big.cif"), "--out", str(out), "--grid", "16", "--reduce", "none"],
          "big.cif", "the structure was rejected", "2000 atoms, more than max_atoms=64", "o.details.csv")
    details = pd.read_csv(tmp_path / "o.details.csv", keep_default_na=False)
    assert "2000 atoms, more than max_atoms=64" in details["error"][0]


def test_neighbour_sums_in_blocks_match_the_all_at_once_result():
    from crystalae.config import VoxelConfig
    from crystalae.decode import _image_translations, _neighbour_density

    rng = np.random.default_rng(0)
    lattice, config = np.eye(3) * 6.0, VoxelConfig(grid=16)
    step = lattice / 16
    pos = rng.uniform(0, 16, size=(30, 3))
    z = rng.integers(1, 30, size=30)
    sigmas = np.full(30, 0.5)
    images = _image_translations(lattice, config)
    args = (pos, z, sigmas, np.rint(pos).astype(int), step, images, 5.0)
    whole = _neighbour_density(*args, block_elements=10**9)
    blocked = _neighbour_density(*args, block_elements=len(pos) * len(images) * 3)  # blocks of 3 peaks
    np.testing.assert_allclose(blocked, whole, rtol=1e-12)
    assert whole.sum() > 0


def test_crafted_checkpoints_are_refused_without_allocating(tmp_path, tiny_checkpoint):
    import torch

    from crystalae.checkpoint import CheckpointError, load_checkpoint

    payload = torch.load(tiny_checkpoint / "checkpoint.pt", weights_only=True)
    huge = dict(payload, model_config={**payload["model_config"], "base_width": 1024, "max_width": 2048,
                                       "latent_dim": 4096, "grid": 128})
    torch.save(huge, tmp_path / "huge.pt")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(tmp_path / "huge.pt")
    absurd = dict(payload, model_config={**payload["model_config"], "base_width": 10**9})
    torch.save(absurd, tmp_path / "absurd.pt")
    with pytest.raises(CheckpointError, match="base_width"):
        load_checkpoint(tmp_path / "absurd.pt")
    missing = {k: v for k, v in payload.items() if k != "model_config"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing \\['model_config'\\]"):
        load_checkpoint(tmp_path / "missing.pt")


# --- one-line errors ------------------------------------------------------------------------------------

def test_roundtrip_out_that_is_a_folder_is_refused_before_the_work(tmp_path, capsys):
    fails(capsys, ["roundtrip", "demo:2", "--out", str(tmp_path)], "is a folder")


@pytest.mark.parametrize("text, needle", [
    ("grid: [8\n", "not valid YAML"), ("- 8\n- 9\n", "expected a mapping"), ('grid: "eight"\n', "grid must be an integer"),
])
def test_bad_voxel_config_yaml_is_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "v.yaml"
    path.write_text(text)
    line = fails(capsys, ["roundtrip", "demo:2", "--out", str(tmp_path / "o.csv"), "--voxel-config", str(path)], needle)
    assert "v.yaml" in line or "grid" in line


@pytest.mark.parametrize("text, needle", [
    ("- 1\n", "expected a mapping"), ("optim: {lr: 1}\n", "unknown sections ['optim']"),
    ("train: [1]\n", "`train` must be a mapping"),
])
def test_bad_train_config_yaml_is_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    fails(capsys, ["train", "--data", str(tmp_path), "--config", str(path)], needle, "t.yaml")


def test_generate_counts_are_checked(tmp_path, capsys, tiny_checkpoint):
    fails_to_parse(capsys, ["generate", "--checkpoint", str(tiny_checkpoint), "--sample", "-1"], "--sample", "-1")
    fails_to_parse(capsys, ["generate", "--checkpoint", str(tiny_checkpoint), "--alter", "x", "--count", "0"], "--count")


def test_sweep_yaml_shape_errors_name_the_file(tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    fails(capsys, ["sweep", str(listed), "--name", "x"], "list.yaml", "top level must be a mapping")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    fails(capsys, ["sweep", str(binary)], "bin.yaml", "not a text file")


SWEEP = {"name": "s", "data": {"source": "demo:20", "grid": 8},
         "search_space": {"latent_dim": {"type": "categorical", "values": [4, 8]}},
         "budget": {"trials": 2, "epochs": 2}, "model": {"depth": 1}}


@pytest.mark.parametrize("section, key, value, needle", [
    ("train", "batch_size", 0, "batch_size must be >= 1"),
    ("model", "latent_dim", -3, "latent_dim must be >= 1"),
    ("resources", "gpus_per_worker", -1, "gpus_per_worker must be >= 0"),
    ("resources", "cpus_per_worker", 0, "cpus_per_worker must be >= 1"),
    ("objective", "metric", "val_accuracy", "not reported by training"),
    ("data", "source", None, "data.source is required"),
    ("data", "source", "no/such/file.csv", "does not exist"),
    ("data", "source", "demo:0", "use demo or demo:N with N in 1..1000000"),
    ("data", "source", "demo_set.csv", "does not exist"),  # a path named demo..., not the built-in set
    ("data", "grid", 100000, "limit of 128"),
    ("data", "val_fraction", 2, "val_fraction"),
    ("budget", "trials", 0, "trials must be >= 1"),
    ("budget", "epochs", "two", "epochs must be an integer, got 'two'"),
    ("budget", "time_budget_s", -5, "time_budget_s must be > 0"),
    ("search", "max_failures", -1, "max_failures must be >= 0"),
    ("search", "grace_period", 9, "grace_period must be >= 1 and <= 2"),
    ("search", "reduction_factor", 1, "reduction_factor must be > 1"),
    ("search", "startup_trials", -2, "startup_trials must be >= 0"),
    ("train", "lr", -1.0, "lr must be > 0"),
    ("search_space", "latent_dim", {"type": "int", "low": -3, "high": 4}, "search_space.latent_dim=-3"),
    ("search_space", "sigma", {"type": "uniform", "low": 0.1, "high": 50.0}, "sigma must be > 0 and <= 5"),
])
def test_sweep_values_out_of_range_are_refused_with_key_and_file(tmp_path, section, key, value, needle):
    import yaml

    from crystalae.search.config import SweepConfigError, load_sweep_config

    raw = json.loads(json.dumps(SWEEP))
    raw.setdefault(section, {})
    if value is None:
        raw[section].pop(key)
    else:
        raw[section][key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepConfigError) as error:
        load_sweep_config(path)
    assert needle in str(error.value) and "bad.yaml" in str(error.value), str(error.value)
    raw = json.loads(json.dumps(SWEEP))  # and the unmodified config is fine
    path.write_text(yaml.safe_dump(raw))
    load_sweep_config(path)


# --- processes and outputs --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_to_crystalae_dashboard_stops_the_server(tmp_path):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "crystalae", "dashboard", "--port", str(port),
                                "--storage", str(tmp_path), "--registry", str(tmp_path / "reg")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not _listening(port):
            assert process.poll() is None and time.time() < deadline, "dashboard did not start"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        deadline = time.time() + 10
        while _listening(port) and time.time() < deadline:
            time.sleep(0.2)
        assert not _listening(port), "the Streamlit server outlived crystalae"
    finally:
        if process.poll() is None:
            process.kill()


def test_binding_every_interface_warns(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    assert main(["dashboard", "--host", "0.0.0.0", "--storage", str(tmp_path)]) == 0
    assert "beyond this machine" in capsys.readouterr().err
    assert calls and "0.0.0.0" in calls[0]
    main(["dashboard", "--storage", str(tmp_path)])
    assert "warning" not in capsys.readouterr().err


def test_generate_refuses_a_used_folder_unless_overwrite(tmp_path, capsys):
    from crystalae.pretrained import PRETRAINED

    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    out = tmp_path / "gen"  # a model that decodes (issue 37: a run that decodes nothing exits 1)
    base = ["generate", "--checkpoint", str(PRETRAINED / "perov_5"), "--out", str(out), "--cpu"]
    assert main(base + ["--sample", "2"]) == 0
    (out / "mine.cif").write_text("a file no generate run wrote")
    fails(capsys, base + ["--sample", "1"], "not empty", "--overwrite")
    # an earlier run's crystal, named in its summary.csv (the untrained model may decode none itself)
    (out / "sample-0009.cif").write_text("an earlier sample")
    with open(out / "summary.csv", "a") as handle:
        handle.write("sample-0009" + "," * (len((out / "summary.csv").read_text().splitlines()[0].split(",")) - 2)
                     + ",sample-0009.cif\n")
    assert main(base + ["--sample", "1", "--overwrite"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 1
    # issue 24: --overwrite removes the earlier run's crystals, and only those
    assert not (out / "sample-0009.cif").exists()
    assert (out / "mine.cif").read_text() == "a file no generate run wrote"
    assert len([p for p in out.glob("*.cif") if not p.name.endswith(".sym.cif")]) == summary["decoded"] + 1


def test_ids_resolve_to_the_first_kept_row_not_a_rejected_duplicate(tmp_path, tiny_checkpoint):
    from crystalae.checkpoint import load_checkpoint
    from crystalae.generate import voxelized_source

    csv = tmp_path / "dup.csv"
    pd.DataFrame({"material_id": ["a", "a"], "cif": [GOOD_CIF, "not a cif"]}).to_csv(csv, index=False)
    [item] = voxelized_source(load_checkpoint(tiny_checkpoint), csv, ids=["a"])
    assert "error" not in item and item["structure"].composition.reduced_formula == "NaCl"


class Payload:
    """Unpickling this would call print(): the shape of a malicious checkpoint."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_checkpoints_are_refused_without_suggesting_unsafe_loading(tmp_path, capsys):
    import torch

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"format": "crystalae-checkpoint/1", "model": Payload()}, folder / "checkpoint.pt")
    line = fails(capsys, ["generate", "--checkpoint", str(folder), "--sample", "1", "--out", str(tmp_path / "g")],
                 "cannot be loaded safely")
    assert "weights_only" not in line and "trust" not in line
    assert "must never run" not in capsys.readouterr().out


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    args = [sys.executable, "-m", "crystalae", "roundtrip", "demo:2", "--out", str(tmp_path), "--grid", "8"]
    quiet = subprocess.run(args, capture_output=True, text=True)
    assert quiet.returncode == 2 and len(quiet.stderr.strip().splitlines()) == 1 and "Traceback" not in quiet.stderr
    loud = subprocess.run(args + ["--debug"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


# --- issue 24: the second hostile probe -------------------------------------------------------------


def test_decoding_refuses_cells_far_from_any_crystal_in_bounded_time():
    """A lattice head that predicts a near-flat 9,582 Å cell (crafted weights) and latents far from the
    prior decode to nothing, quickly, instead of sizing a periodic-image grid of millions."""
    import torch
    from pymatgen.core import Lattice

    from crystalae.checkpoint import load_checkpoint
    from crystalae.config import VoxelConfig
    from crystalae.decode import DecodeError, decode
    from crystalae.generate import decode_to_structures
    from crystalae.pretrained import PRETRAINED
    from crystalae.voxelize import voxelize_arrays

    config = VoxelConfig(grid=16, sigma=0.5)
    flat = Lattice.from_parameters(60.0, 1.0, 1.0, 30, 30, 30).matrix
    density = voxelize_arrays(Lattice.cubic(4.0).matrix, np.array([[0.0, 0.0, 0.0]]), np.array([6]), config)
    density.lattice = flat  # the grid of a real crystal read in a cell too thin for its Gaussians
    with pytest.raises(DecodeError, match="periodic images"):
        decode(density, species_from="density")
    density.lattice = Lattice.cubic(150.0).matrix
    with pytest.raises(DecodeError, match="over 100 Å"):
        decode(density, species_from="density")

    folder = PRETRAINED / "carbon_24"
    if not (folder / "checkpoint.pt").exists():
        pytest.skip("no shipped carbon_24 model in this checkout")
    loaded = load_checkpoint(folder)
    latent_dim = loaded.model.config.latent_dim
    for scale in (1e4, 1e6, -1e6):
        assert decode_to_structures(loaded, torch.full((2, latent_dim), scale)) == [None, None]
    with torch.no_grad():
        loaded.model.vae.lattice[2].weight.zero_()
        loaded.model.vae.lattice[2].bias.copy_(torch.tensor([958.2, -4125.4, -22172.5, -64601.3, -31939.3, -17235.7]))
    assert decode_to_structures(loaded, torch.zeros(2, latent_dim)) == [None, None]


def test_one_row_over_max_atoms_is_rejected_and_the_rest_reconstructed(tmp_path, capsys, tiny_checkpoint):
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(0)
    points = [[i / 5, j / 5, k / 3] for i in range(5) for j in range(5) for k in range(3)]  # 75 sites, 2 Å apart
    big = Structure(Lattice.orthorhombic(10, 10, 6), rng.choice(["Na", "Cl"], len(points)).tolist(), points)
    source = tmp_path / "src"
    source.mkdir()
    big.to(filename=str(source / "big.cif"))
    (source / "good.cif").write_text(GOOD_CIF)
    out = tmp_path / "rec.csv"
    assert main(["reconstruct", "--checkpoint", str(tiny_checkpoint), str(source), "--out", str(out)]) == 0
    details = pd.read_csv(tmp_path / "rec.details.csv", keep_default_na=False).set_index("material_id")
    assert "more than max_atoms=64" in details.loc["big", "error"]
    metrics = json.loads((tmp_path / "rec.metrics.json").read_text())
    assert metrics["entries"] == 2 and metrics["rejected_inputs"] == 1 and metrics["n"] == 1


def test_tampered_registry_weights_are_refused(tmp_path, capsys, tiny_checkpoint):
    from crystalae.registry import Registry, RegistryError

    registry = tmp_path / "reg"
    assert main(["promote", str(tiny_checkpoint), "--registry", str(registry)]) == 0
    folder = Registry(registry).resolve("tinymodel")
    with open(folder / "checkpoint.pt", "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(RegistryError, match="sha256 differs"):
        Registry(registry).resolve("tinymodel@1")
    fails(capsys, ["generate", "--model", "tinymodel", "--registry", str(registry), "--sample", "1",
                   "--out", str(tmp_path / "gen")], "modified after promotion")


def test_bad_out_seed_name_and_address_options_fail_early_with_a_clear_line(tmp_path, capsys, tiny_checkpoint):
    from crystalae.config import ConfigError, check_name
    from crystalae.registry import Registry, RegistryError

    (tmp_path / "afile").write_text("x")
    gen = ["generate", "--checkpoint", str(tiny_checkpoint), "--sample", "1"]
    fails(capsys, gen + ["--out", str(tmp_path / "afile" / "sub")], "is a file", "cannot be created")
    fails_to_parse(capsys, gen + ["--out", str(tmp_path / "g"), "--seed", str(2**70)], "--seed", "must be")
    fails_to_parse(capsys, gen + ["--out", str(tmp_path / "g"), "--seed", "2^70"], "--seed", "expected an integer")
    registry = tmp_path / "reg"
    assert main(["promote", str(tiny_checkpoint), "--registry", str(registry)]) == 0
    with pytest.raises(RegistryError, match="has no version"):
        Registry(registry).resolve("tinymodel@\u00b2")  # a superscript two is a digit to str.isdigit
    for name in ("tinymodel\n", "a\nb"):  # `$` in a regex matches before a trailing newline
        with pytest.raises(ConfigError, match="invalid"):
            check_name(name)
    fails(capsys, ["data", "prepare", "demo:4", "--out", str(tmp_path / "d"), "--address", "127.0.0.1:1"],
          "--address", "--ray")
    assert not (tmp_path / "d").exists()


def _symmetry_bomb(sites: int = 52) -> str:
    """A small CIF whose 192 Fm-3m operations on `sites` general positions expand to ~10,000 atoms."""
    from pymatgen.symmetry.groups import SpaceGroup

    ops = [op.as_xyz_str() for op in SpaceGroup("Fm-3m").symmetry_ops]
    rng = np.random.default_rng(0)
    lines = ["data_bomb", "_cell_length_a 30", "_cell_length_b 30", "_cell_length_c 30", "_cell_angle_alpha 90",
             "_cell_angle_beta 90", "_cell_angle_gamma 90", "loop_", "_symmetry_equiv_pos_as_xyz",
             *[f"'{op}'" for op in ops], "loop_", "_atom_site_label", "_atom_site_type_symbol",
             "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z"]
    lines += [f"C{i} C {x:.4f} {y:.4f} {z:.4f}" for i, (x, y, z) in enumerate(rng.random((sites, 3)))]
    return "\n".join(lines) + "\n"


def test_a_cif_symmetry_bomb_is_rejected_before_it_is_built(tmp_path, capsys):
    from crystalae.sources import Entry, StructureError, load_structure

    bomb = _symmetry_bomb()
    assert len(bomb) < 8_000  # a few KB of text
    with pytest.raises(StructureError, match="52 sites x 192 symmetry operations"):
        load_structure(Entry("bomb", "cif", bomb))
    source = tmp_path / "src"
    source.mkdir()
    (source / "bomb.cif").write_text(bomb)
    (source / "good.cif").write_text(GOOD_CIF)
    assert main(["data", "prepare", str(source), "--out", str(tmp_path / "d"), "--grid", "8", "--workers", "1"]) == 0
    assert "1 rejected" in capsys.readouterr().out


def test_damaged_sweep_files_are_named_and_one_damaged_checkpoint_hides_nothing_else(tmp_path):
    from crystalae.search.results import collect_trials, sweep_config
    from crystalae.uri_fs import DamagedFileError

    root = tmp_path / "sweeps" / "broken"
    for trial in ("a", "b"):
        ckpt = root / "trials" / trial / "checkpoint_000000"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text(json.dumps({"epoch": 0, "metrics": {"val_score": 0.5}, "history": [{}]}))
        (root / "trials" / trial / "params.json").write_text("{}")
    (root / "sweep.json").write_text(json.dumps({"objective_metric": "val_score", "objective_mode": "max"}))
    (root / "trials" / "b" / "checkpoint_000000" / "config.json").write_text('{"epoch": 0, "metr')  # cut short
    with pytest.warns(UserWarning, match="config.json is damaged"):
        trials = collect_trials(root).trials
    assert {t.trial_id: t.best_value for t in trials} == {"a": 0.5, "b": None}
    (root / "sweep.json").write_text("{")
    with pytest.raises(DamagedFileError, match="sweep.json is damaged"):
        sweep_config(root)


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path, capsys):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    bomb = "\n".join(levels)
    config = tmp_path / "bomb.yaml"
    config.write_text("name: bomb\ndata: {source: demo:10}\nsearch_space:\n  latent_dim: {type: categorical, values: *i}\n"
                      .replace("values: *i", "values: [1]") + "anchors:\n" + "\n".join("  " + line for line in levels)
                      + "\n  z: {type: categorical, values: *i}\n")
    assert len(bomb) < 700
    line = fails(capsys, ["sweep", str(config)], "bomb.yaml", "expands to over")
    assert len(line) < 500


def test_one_huge_csv_field_rejects_its_row_not_the_file(tmp_path, capsys):
    huge = GOOD_CIF + "#" + "x" * (1_100_000) + "\n"  # over 128 KB (Python's csv limit) and over 1 MB
    pd.DataFrame({"material_id": ["good", "huge", "good2"], "cif": [GOOD_CIF, huge, GOOD_CIF]}).to_csv(
        tmp_path / "s.csv", index=False)
    out = tmp_path / "o.csv"
    assert main(["roundtrip", str(tmp_path / "s.csv"), "--out", str(out), "--grid", "8"]) == 0
    details = pd.read_csv(tmp_path / "o.details.csv", keep_default_na=False).set_index("material_id")
    assert "over the 1,048,576 crystalae reads" in details.loc["huge", "error"]
    assert details.loc["good", "error"] == "" and details.loc["good2", "error"] == ""


def test_dot_dot_in_an_object_storage_uri_is_refused(tmp_path, capsys):
    fails_to_parse(capsys, ["data", "prepare", "demo:4", "--out", "s3://bkt/x/../../bkt2/y"], "'..' is not allowed")


def test_an_unreachable_ray_address_fails_fast_and_writes_nothing(tmp_path, capsys):
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    out = tmp_path / "ds"
    assert main(["data", "prepare", "demo:4", "--out", str(out), "--ray", "--address", f"127.0.0.1:{port}"]) == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in capsys.readouterr().err
    assert not out.exists()
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\ndata: {source: 'demo:8', grid: 8}\nmodel: {depth: 1}\n"
                     "search_space: {lr: {type: loguniform, low: 0.001, high: 0.01}}\n")
    assert main(["sweep", str(sweep), "--storage", str(tmp_path / "sweeps"), "--address", f"127.0.0.1:{port}"]) == 2
    assert "no Ray cluster answers" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()
    assert time.monotonic() - started < 30


def test_reconstructing_elements_the_model_never_saw_warns(tmp_path, capsys, carbon_sample):
    source = tmp_path / "carbon"
    source.mkdir()
    for mid, structure in carbon_sample[:2]:
        structure.to(filename=str(source / f"{mid}.cif"))
    from crystalae.pretrained import PRETRAINED

    perov = PRETRAINED / "perov_5"
    assert main(["reconstruct", "--checkpoint", str(perov), str(source), "--out", str(tmp_path / "r.csv")]) == 0
    assert "2 of 2 crystals hold elements this model was never trained on (C)" in capsys.readouterr().err


def test_a_folder_source_does_not_follow_links_out_of_the_folder(tmp_path):
    from crystalae.sources import StructureError, list_entries, load_structure

    secret = tmp_path / "secret.cif"
    secret.write_text("password: hunter2\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "leak.cif").symlink_to(secret)
    (folder / "real.cif").write_text(GOOD_CIF)
    (folder / "inside.cif").symlink_to(folder / "real.cif")  # a link within the folder is read
    entries = {e.material_id: e for e in list_entries(folder)}
    assert load_structure(entries["inside"]).composition.reduced_formula == "NaCl"
    with pytest.raises(StructureError, match="outside the folder") as refused:
        load_structure(entries["leak"])
    assert "hunter2" not in str(refused.value)


def test_a_promote_killed_after_publishing_still_moves_its_alias_and_leaves_no_staging(tmp_path, tiny_checkpoint):
    import subprocess
    import sys

    from crystalae.registry import Registry

    root = tmp_path / "reg"
    Registry(root).promote(tiny_checkpoint, "m", alias="champion")
    # killed (os._exit) right after the new version's folder appears, before aliases.json is written
    killed = ("import os, crystalae.registry as r\n"
              "real = r.write_json\n"
              "r.write_json = lambda path, data: os._exit(9) if str(path).endswith('aliases.json') else real(path, data)\n"
              f"r.Registry({str(root)!r}).promote({str(tiny_checkpoint)!r}, 'm', alias='champion')\n")
    assert subprocess.run([sys.executable, "-c", killed]).returncode == 9
    (root / "m" / ".m-v3-leftover").mkdir()  # a staging copy of a promote killed earlier still
    registry = Registry(root)
    assert registry.resolve("champion").name == "v2"  # the killed promote's alias, moved on the next open
    assert not list(root.glob("m/.*"))
    assert registry.promote(tiny_checkpoint, "m")["version"] == 3


def test_ctrl_c_during_generate_keeps_the_crystals_decoded_so_far(tmp_path, capsys, monkeypatch):
    import json

    import crystalae.generate as generate
    from crystalae.pretrained import PRETRAINED

    real, calls = generate.outputs_to_structures, []

    def stop_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "outputs_to_structures", stop_on_the_third_batch)
    out = tmp_path / "gen"
    assert main(["generate", "--checkpoint", str(PRETRAINED / "perov_5"), "--sample", "200", "--out", str(out)]) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 128 and "after 128 of 200 samples" in summary["interrupted"]  # two batches of 64
    assert len([p for p in out.glob("*.cif") if not p.name.endswith(".sym.cif")]) == summary["decoded"] > 100
    assert "kept the 128 crystals decoded so far" in capsys.readouterr().err


def test_ray_processes_get_a_worker_start_timeout_a_busy_machine_can_meet(monkeypatch):
    """A worker-group start took 70 s on 2 busy cores, past Ray Train's 60 s: the Ray processes crystalae
    starts get 600 s unless the user says; and the State API address it names (the user's if set)."""
    from crystalae.ray_env import API_SERVER_ENV, START_TIMEOUT_ENV, runtime_env

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(API_SERVER_ENV, raising=False)
    assert runtime_env() == {"env_vars": {START_TIMEOUT_ENV: "600"}}
    assert runtime_env(api_server="http://127.0.0.1:1234")["env_vars"][API_SERVER_ENV] == "http://127.0.0.1:1234"
    monkeypatch.setenv(START_TIMEOUT_ENV, "30")
    monkeypatch.setenv(API_SERVER_ENV, "http://10.0.0.1:8265")
    monkeypatch.setenv("CRYSTALAE_PASSED", "1")
    assert runtime_env(passed=("CRYSTALAE_PASSED", "UNSET_HERE"), api_server="http://127.0.0.1:1234") == {
        "env_vars": {START_TIMEOUT_ENV: "30", API_SERVER_ENV: "http://10.0.0.1:8265", "CRYSTALAE_PASSED": "1"}}
