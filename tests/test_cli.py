import json
import subprocess
import sys

import pandas as pd
from conftest import generated

from crystalae.cli import main


def test_roundtrip_command_writes_ids_cifs_and_metrics(tmp_path, capsys):
    out = tmp_path / "rt.csv"
    assert main(["roundtrip", "demo:12", "--out", str(out), "--workers", "1", "--grid", "24"]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["material_id", "cif"] and len(frame) == 12
    metrics = json.loads((tmp_path / "rt.metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["config"]["grid"] == 24
    assert 0 <= metrics["match_rate"] <= 1
    assert "match rate" in capsys.readouterr().out


def test_bad_input_gives_a_clear_error_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "crystalae", "roundtrip", str(tmp_path / "missing.csv"),
                             "--out", str(tmp_path / "o.csv")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing.csv does not exist" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "crystalae", "roundtrip", "demo:2", "--sigma", "-1",
                             "--out", str(tmp_path / "o.csv")], capture_output=True, text=True)
    assert result.returncode == 2 and "sigma must be > 0" in result.stderr


def test_a_bad_grad_clip_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "crystalae", "train", "--data", str(tmp_path), "--grad-clip", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["crystalae: error: invalid TrainConfig: grad_clip must be > 0, got 0.0"]


def test_voxel_config_yaml_with_cli_override(tmp_path):
    from crystalae.cli import build_parser, voxel_config_from_args

    path = tmp_path / "v.yaml"
    path.write_text("grid: 20\nsigma: 0.7\nrepresentation: box\n")
    args = build_parser().parse_args(["roundtrip", "demo", "--out", "x.csv", "--voxel-config", str(path),
                                      "--sigma", "0.4"])
    config = voxel_config_from_args(args)
    assert (config.grid, config.sigma, config.representation) == (20, 0.4, "box")


def test_version_answers_from_the_package_metadata(capsys):
    from importlib.metadata import version

    import pytest

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"crystalae {version('crystalae')}"


def test_configs_read_numbers_as_people_write_them(tmp_path):
    from crystalae.files import load_yaml, read_yaml_mapping
    from crystalae.search.config import load_sweep_config

    assert load_yaml("a: 1e-3\nb: -5E4\nc: 2\nd: 1.0e-3\ne: '1e-3'\nf: 1e3x") == \
        {"a": 0.001, "b": -50000.0, "c": 2, "d": 0.001, "e": "1e-3", "f": "1e3x"}
    (tmp_path / "train.yaml").write_text("train: {lr: 1e-3, beta: 1e-4}\n")
    assert read_yaml_mapping(tmp_path / "train.yaml", "--config")["train"] == {"lr": 0.001, "beta": 0.0001}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\ndata: {source: 'demo:8', grid: 16}\n"
                     "search_space: {lr: {type: loguniform, low: 1e-3, high: 1e-2}}\n")
    assert load_sweep_config(sweep).search_space[0].low == 0.001


def test_generated_config_flags_parse_and_help_stays_light():
    """Train and prepare flags are generated from their dataclasses on first use of their subcommand;
    `crystalae --help` must not import torch or pyarrow for them."""
    import subprocess
    import sys

    from crystalae.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "d", "--epochs", "3", "--batch-size", "8"])
    assert (args.epochs, args.batch_size, args.lr) == (3, 8, None)
    args = build_parser().parse_args(["data", "prepare", "demo:4", "--out", "o", "--shard-size", "7", "--grid", "8"])
    assert (args.shard_size, args.val_fraction, args.grid) == (7, 0.1, 8)
    code = ("import sys, contextlib, io\nfrom crystalae.cli import build_parser\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    build_parser().parse_args(['--help'])\nprint('torch' in sys.modules, 'pyarrow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False", "False"]


def test_the_demo_promotes_where_model_load_and_dashboard_look(tmp_path, monkeypatch, tiny_checkpoint, capsys):
    """After `make demo`, `generate --model champion` and `crystalae.load("champion")` need no other flag:
    the demo's registry and sweeps are every other command's defaults."""
    from pathlib import Path

    import crystalae
    from crystalae.cli import build_parser
    from crystalae.locations import REGISTRY, SWEEPS
    from crystalae.registry import Registry
    from crystalae.search.demo_job import demo_next_steps

    parser = build_parser()
    demo = parser.parse_args(["demo"])
    for command in ("generate", "models", "dashboard", "promote x", "reconstruct x --out o.csv"):
        assert Path(parser.parse_args(command.split()).registry) == Path(demo.registry) == REGISTRY, command
    assert Path(parser.parse_args(["dashboard"]).storage) == Path(demo.storage) == SWEEPS
    assert "crystalae generate --model champion --sample 4\n" in demo_next_steps(demo.storage, demo.registry) + "\n"

    monkeypatch.chdir(tmp_path)
    Registry(REGISTRY).promote(tiny_checkpoint, "demo", alias="champion")  # what the demo's step 3 does
    # the lookup is what is tested: the untrained model may decode none (then it exits 1, never 0)
    rc = main(["generate", "--model", "champion", "--sample", "2", "--prior", "normal", "--out", "g"])
    summary = generated(rc, "g", 2)
    assert summary["provenance"]["model"] == f"champion (registry {REGISTRY})" and summary["prior"]["kind"] == "normal"
    assert crystalae.load("champion", device="cpu").latent_dim == 4
    assert main(["models"]) == 0
    assert "demo@1 [champion]" in capsys.readouterr().out


def test_model_takes_shipped_names_and_a_wrong_name_says_what_exists(tmp_path, capsys):
    import pytest

    from crystalae.pretrained import pretrained_models

    shipped = [m["name"] for m in pretrained_models()]
    if "perov_5" not in shipped:
        pytest.skip("no shipped perov_5 model in this checkout")
    empty = str(tmp_path / "no-registry")
    assert main(["generate", "--model", "perov_5", "--registry", empty, "--sample", "2", "--out", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "perov5", "--registry", empty, "--sample", "2", "--out", str(tmp_path / "h")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "perov_5" in error and "--checkpoint PATH" in error
