"""The Python API (`crystalae.load` and `CrystalModel`): structures in, structures out, as the CLI does."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import crystalae
from crystalae.metrics import compare
from crystalae.sources import StructureError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def perov_model():
    return crystalae.load("perov_5", device="cpu")


def test_import_is_light_and_the_api_is_visible():
    code = "import sys, crystalae; print('torch' in sys.modules, sorted(n for n in dir(crystalae) if not n.startswith('_')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False"), out  # torch loads on first use, not on import
    assert "load" in out and "CrystalModel" in out


def test_reconstruct_matches_like_the_reconstruct_command(perov_model, perov_sample, tmp_path):
    from crystalae.reconstruct import reconstruct

    sample = perov_sample[:12]
    folder = tmp_path / "cifs"
    folder.mkdir()
    for material_id, structure in sample:
        structure.to(filename=str(folder / f"{material_id}.cif"))
    metrics = reconstruct(perov_model.loaded, folder, tmp_path / "out.csv")
    rebuilt = perov_model.reconstruct([s for _, s in sample])
    assert len(rebuilt) == len(sample)
    matched = [bool(compare(r, s).get("match")) for r, (_, s) in zip(rebuilt, sample)]
    assert sum(matched) / len(sample) == pytest.approx(metrics["match_rate"])
    assert sum(matched) >= 8  # the shipped model reconstructs most held-in perovskites


def test_inputs_may_be_paths_atoms_or_one_structure(perov_model, perov_sample, tmp_path):
    _, structure = perov_sample[0]
    path = tmp_path / "one.cif"
    structure.to(filename=str(path))
    from_path = perov_model.encode(path)
    from_structure = perov_model.encode(structure)
    assert from_path.shape == (1, perov_model.latent_dim)
    np.testing.assert_allclose(from_path, from_structure, atol=1e-4)
    pytest.importorskip("ase")
    from pymatgen.io.ase import AseAtomsAdaptor

    np.testing.assert_allclose(perov_model.encode([AseAtomsAdaptor.get_atoms(structure)]), from_structure, atol=1e-4)


def test_decode_sample_interpolate_and_alter_give_structures(perov_model, perov_sample):
    a, b = perov_sample[0][1], perov_sample[1][1]
    z = perov_model.encode([a, b])
    assert len(perov_model.decode(z)) == 2
    assert len(perov_model.decode(z[0])) == 1  # one latent may be passed bare
    first = perov_model.sample(3, seed=4)
    assert [s.composition for s in first] == [s.composition for s in perov_model.sample(3, seed=4)]
    path = perov_model.interpolate(a, b, steps=4)
    assert len(path) == 4 and compare(path[0], a).get("match") is not None
    assert len(perov_model.alter(a, scale=0.05, count=2)) == 2


def test_bad_input_names_the_item_and_the_reason(perov_model, carbon_sample):
    with pytest.raises(TypeError, match="item 1"):
        perov_model.encode([carbon_sample[0][1], 42])
    with pytest.raises(StructureError, match=r"structure 0 \(C\).*never in this model's training data"):
        perov_model.encode(carbon_sample[0][1])
    with pytest.raises(ValueError, match=r"shape \(n, 128\)"):
        perov_model.decode(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        perov_model.decode(np.full((1, perov_model.latent_dim), np.nan))
    with pytest.raises(LookupError, match="shipped model"):
        crystalae.load("no-such-model", registry=ROOT / "runs" / "no-registry")


def test_load_takes_a_checkpoint_folder(tiny_checkpoint):
    model = crystalae.load(tiny_checkpoint, device="cpu")
    assert model.latent_dim == 4 and "tinymodel" in repr(model)


def test_the_python_api_page_runs():
    """docs/python-api.md's example, run as written."""
    page = (ROOT / "docs" / "python-api.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    exec(compile(code, "docs/python-api.md", "exec"), {})


def test_outputs_and_checkpoints_record_their_provenance(tmp_path):
    """summary.json, metrics.json, checkpoints and registry manifests say which model, seed and versions."""
    import json

    from crystalae.cli import main
    from crystalae.registry import Registry

    checkpoint = ROOT / "pretrained" / "perov_5"
    assert main(["generate", "--checkpoint", str(checkpoint), "--sample", "2", "--seed", "5",
                 "--out", str(tmp_path / "gen")]) == 0
    made = json.loads((tmp_path / "gen" / "summary.json").read_text())["provenance"]
    assert made["model"] == str(checkpoint) and made["seed"] == 5
    assert made["versions"]["crystalae"] == crystalae.__version__ and made["versions"]["torch"]
    assert main(["reconstruct", "demo:3", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.csv")]) == 0
    metrics = json.loads((tmp_path / "r.metrics.json").read_text())
    assert metrics["provenance"]["model"] == str(checkpoint) and metrics["provenance"]["versions"]["pymatgen"]
    manifest = Registry(tmp_path / "reg").promote(checkpoint, "perov")
    assert manifest["provenance"]["versions"]["crystalae"] == crystalae.__version__
    assert "trained_with" in manifest["provenance"]


def test_a_saved_checkpoint_records_the_versions_that_made_it(tiny_checkpoint):
    import json

    described = json.loads((tiny_checkpoint / "config.json").read_text())
    assert described["versions"]["crystalae"] == crystalae.__version__ and described["versions"]["torch"]


def test_quiet_silences_warnings_and_version_answers(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "")  # -q sets it; restored after the test
    from crystalae.cli import main
    from crystalae.registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.promote(tiny_checkpoint, "a")
    (registry.root / "a" / "v1" / "manifest.json").unlink()
    assert main(["models", "--registry", str(registry.root)]) == 0
    assert "crystalae: warning: skipped" in capsys.readouterr().err
    assert main(["models", "-q", "--registry", str(registry.root)]) == 0
    assert "skipped" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"crystalae {crystalae.__version__}"


def test_training_progress_shows_each_new_epoch_once(tmp_path, caplog):
    import json
    import logging

    from crystalae.progress import EpochLines

    run = tmp_path / "run"

    def checkpoint(epochs: int) -> None:  # as a training run writes them: the history of every epoch so far
        folder = run / f"checkpoint_2026-01-01_00-00-{epochs:02d}"
        folder.mkdir(parents=True)
        history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 2.0, "val_match_rate": 0.25,
                    "epoch_seconds": 3.0, "eval_seconds": 1.0} for e in range(epochs)]
        (folder / "config.json").write_text(json.dumps({"history": history}))

    checkpoint(2)  # a resumed run: epochs already trained are not shown again
    with caplog.at_level(logging.INFO, logger="crystalae"), EpochLines(run, epochs=5, every=0.05):
        checkpoint(4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"resuming from epoch 2/5 (the newest checkpoint in {run})",
                     "epoch 3/5 | loss 0.3333 (val 2) | val match 25.0% | 4.0 s",
                     "epoch 4/5 | loss 0.25 (val 2) | val match 25.0% | 4.0 s"]


def test_a_train_run_logs_its_epochs_to_mlflow_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    import json

    from mlflow.tracking import MlflowClient

    from crystalae.progress import EpochLines
    from crystalae.tracking import MlflowRun

    uri, run = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"

    def checkpoint(epochs: int) -> None:
        folder = run / f"checkpoint_2026-01-01_00-00-{epochs:02d}"
        folder.mkdir(parents=True)
        history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_match_rate": 0.1 * e} for e in range(epochs)]
        (folder / "config.json").write_text(json.dumps({"history": history}))

    for after in (2, 3):  # a run, then its resume
        sink = MlflowRun(uri, run, {"train": {"lr": 0.001, "epochs": 3}})
        with EpochLines(run, epochs=3, every=0.05, sinks=[sink]):
            checkpoint(after)
        sink.close()
    client = MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("crystalae").experiment_id])
    assert logged.data.params["train.lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "val_match_rate")] == [0, 1, 2]


def test_a_box_model_reconstructs_but_refuses_to_generate_before_decoding(monkeypatch):
    """A box-representation model carries no lattice: decoding latents alone is one ValueError, raised
    before any batch is decoded."""
    import torch

    import crystalae.generate as generate
    from crystalae.checkpoint import LoadedModel
    from crystalae.config import VoxelConfig
    from crystalae.models import CrystalAE, model_config_for

    voxel = VoxelConfig(representation="box", grid=8)
    model = CrystalAE(model_config_for(voxel, (11, 17), latent_dim=4, depth=1, base_width=4, max_width=8, seg_depth=1,
                                       seg_width=4, residual=False))
    loaded = LoadedModel(model, voxel, {})
    decoded = []
    monkeypatch.setattr(generate, "decode_latents", lambda *a: decoded.append(1))
    with pytest.raises(ValueError, match="box representation, which carries no lattice"):
        generate.decode_to_structures(loaded, torch.zeros(3, 4))
    assert not decoded
