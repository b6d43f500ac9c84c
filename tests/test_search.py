"""Sweeps, resume, retries and the registry, on tiny real sweeps (8^3 grid, tiny models)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_SWEEP

from crystalae.registry import Registry, RegistryError
from crystalae.search.config import SweepConfigError, load_sweep_config
from crystalae.search.results import collect_trials


def test_tiny_sweep_writes_results(tiny_sweep):
    summary = tiny_sweep["summary"]
    assert len(summary.trials) == 3
    root = tiny_sweep["root"]
    assert json.loads((root / "summary.json").read_text())["trials"]
    for trial in summary.trials:
        assert trial.status in ("finished", "early-stopped")
        assert trial.best_checkpoint and (root / trial.best_checkpoint / "checkpoint.pt").exists()
        assert trial.history[0]["epoch"] == 0 and "val_loss" in trial.history[0]
        assert set(trial.params) == {"latent_dim", "sigma", "lr"}
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'optuna.db'}")
    assert len(study.trials) == 3
    # one rule for "best": the dashboard's best trial holds the checkpoint `promote --best` picks
    best, (_, checkpoint) = summary.best_trial(), summary.best_checkpoint()
    assert best.best_value == checkpoint.metrics[summary.objective.metric]
    sigmas = {t.params["sigma"] for t in summary.trials}
    assert len(list((root / "datasets").glob("*/manifest.json"))) == len(sigmas)  # one dataset per sigma


@pytest.mark.parametrize("edit, message", [
    ("name: tiny\nbogus: 1\n", "unknown keys \\['bogus'\\]"),
    ("lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}", "low \\(0.1\\) must be below high"),
    ("budget: {trials: 3, epochs: 2}", "unknown keys in budget"),
])
def test_bad_yaml_fails_before_ray_starts(tmp_path, edit, message):
    import ray

    replacement = {"lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}": "lr: {type: loguniform, low: 0.1, high: 1.0e-2}",
                   "budget: {trials: 3, epochs: 2}": "budget: {trials: 3, epochs: 2, hours: 1}"}
    text = TINY_SWEEP.replace("name: tiny\n", edit) if edit.startswith("name") else TINY_SWEEP.replace(edit, replacement[edit])
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepConfigError, match=message):
        load_sweep_config(path)
    result = subprocess.run([sys.executable, "-m", "crystalae", "sweep", str(path), "--storage", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "bad.yaml" in result.stderr
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


def test_promote_alias_and_generate_from_alias(tiny_sweep, tmp_path):
    from crystalae.cli import main

    registry = Registry(tiny_sweep["registry"])
    assert registry.resolve("champion") == registry.resolve("tiny@1") == registry.resolve("tiny")
    entry = registry.entries()[0]
    assert entry["aliases"] == ["champion"] and len(entry["sha256"]) == 64 and entry["source"]["trial"]
    out = tmp_path / "gen"
    assert main(["generate", "--model", "champion", "--registry", str(tiny_sweep["registry"]),
                 "--sample", "2", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["count"] == 2
    reg2 = tmp_path / "reg2"
    assert main(["promote", str(tiny_sweep["root"]), "--best", "--registry", str(reg2), "--alias", "champion"]) == 0
    trial = tiny_sweep["summary"].trials[0].trial_id
    assert main(["promote", f"tiny/{trial}", "--storage", str(tiny_sweep["storage"]), "--registry", str(reg2),
                 "--name", "tiny", "--alias", "champion"]) == 0
    assert Registry(reg2).aliases() == {"champion": "tiny@2"} and Registry(reg2).versions("tiny") == [1, 2]
    with pytest.raises(RegistryError, match="no version"):
        Registry(reg2).resolve("tiny@7")
    with pytest.raises(RegistryError, match="invalid model name"):
        Registry(reg2).promote(registry.resolve("champion"), "../evil")


def test_concurrent_promotes_get_distinct_versions(tiny_sweep, tmp_path):
    source = Registry(tiny_sweep["registry"]).resolve("champion")
    registry = Registry(tmp_path / "reg")
    errors = []

    def promote():
        try:
            registry.promote(source, "many", alias="latest")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert registry.versions("many") == [1, 2, 3, 4, 5, 6]
    assert registry.aliases()["latest"].startswith("many@")
    assert not [p for p in (tmp_path / "reg" / "many").iterdir() if p.name.startswith(".")]


def _sweep_yaml(tmp_path: Path, name: str, trials: int, epochs: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY_SWEEP.replace("name: tiny", f"name: {name}")
                    .replace("budget: {trials: 3, epochs: 2}", f"budget: {{trials: {trials}, epochs: {epochs}}}")
                    .replace("search: {grace_period: 1, seed: 0}", f"search: {{grace_period: {epochs}, seed: 0}}"))
    return path


def test_a_trial_that_raises_once_is_retried(tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    monkeypatch.setenv("CRYSTALAE_FAIL_ONCE_DIR", str(markers))
    config = _sweep_yaml(tmp_path, "retry", trials=2, epochs=1)
    result = subprocess.run([sys.executable, "-m", "crystalae", "sweep", str(config), "--storage", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = collect_trials(tmp_path / "s" / "retry")
    assert len(list(markers.iterdir())) == 2  # both trials failed once
    assert [t.status for t in summary.trials] == ["finished", "finished"]


def _committed_final_checkpoints(root: Path, last_epoch: int) -> dict[str, set[str]]:
    """Trials whose last epoch Ray Train has committed (its snapshot lists it): trial -> checkpoint paths.

    A checkpoint folder can exist on disk before Ray records it; only recorded ones count as finished.
    """
    finished = {}
    for snapshot in (root / "trials").glob("*/checkpoint_manager_snapshot.json") if (root / "trials").exists() else []:
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            continue  # being rewritten
        if any(r["metrics"].get("epoch") == last_epoch for r in results):
            trial = snapshot.parent.name
            finished[trial] = {f"trials/{trial}/{r['checkpoint_dir_name']}" for r in results}
    return finished


def test_killed_driver_resumes_without_losing_finished_trials(tmp_path):
    config = _sweep_yaml(tmp_path, "resume", trials=3, epochs=2)
    storage = tmp_path / "s"
    command = [sys.executable, "-m", "crystalae", "sweep", str(config), "--storage", str(storage)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    root = storage / "resume"
    deadline = time.time() + 400
    finished: dict = {}
    while time.time() < deadline and not finished:
        time.sleep(2)
        finished = _committed_final_checkpoints(root, last_epoch=1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert finished, "no trial finished before the deadline"
    assert not (root / "summary.json").exists()
    time.sleep(3)
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = collect_trials(root)
    assert len(summary.trials) == 3
    by_id = {t.trial_id: t for t in summary.trials}
    for trial_id, paths in finished.items():
        assert by_id[trial_id].status in ("finished", "early-stopped")
        assert by_id[trial_id].epochs == 2
        # not retrained: a rerun would have written new (timestamped) checkpoints and dropped these
        assert {c.path for c in by_id[trial_id].checkpoints} == paths
    assert all(t.status != "error" for t in summary.trials)


def test_cluster_yaml_passes_ray_schema():
    import jsonschema
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` checks before it starts anything
    assert any("crystalae" in command for command in config["setup_commands"])
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**config, "max_workers": "lots"}))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_ray_under(temp_dir: Path) -> None:
    """Stop only this test's Ray processes (`ray stop` would also stop other Ray users here)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(temp_dir).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.mark.slow
def test_sweep_on_a_two_node_local_cluster_uses_both_nodes(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    import tempfile

    temp_dir = Path(tempfile.mkdtemp(prefix="crae-", dir="/tmp"))  # short: Unix socket paths are capped
    port = _free_port()
    limits = ["--num-cpus=5", "--memory=2000000000", "--object-store-memory=200000000"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.2",
                        "--include-dashboard=false", f"--temp-dir={temp_dir}", *limits],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3", *limits],
                       env=env, check=True, capture_output=True, timeout=120)
        # 3-CPU Train workers on 5-CPU nodes: two concurrent trials cannot share a node, and each node
        # keeps 2 CPUs for trial drivers and Ray Data tasks (with fewer, Ray Data waits forever)
        config = _sweep_yaml(tmp_path, "cluster", trials=2, epochs=1)
        config.write_text(config.read_text() + "resources: {workers_per_trial: 1, cpus_per_worker: 3}\n")
        result = subprocess.run([sys.executable, "-m", "crystalae", "sweep", str(config), "--storage",
                                 str(tmp_path / "s"), "--address", f"127.0.0.2:{port}"],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    finally:
        _stop_ray_under(temp_dir)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    summary = collect_trials(tmp_path / "s" / "cluster")
    nodes = {h["node_ip"] for t in summary.trials for h in t.history}
    assert nodes == {"127.0.0.2", "127.0.0.3"}


def test_depth_the_grid_cannot_support_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(TINY_SWEEP.replace("sigma: {type: categorical, values: [0.5, 0.6]}",
                                       "depth: {type: int, low: 1, high: 4}"))
    with pytest.raises(SweepConfigError, match="depth=4: .*grid 8 must be divisible by 2\\*\\*depth = 16"):
        load_sweep_config(path)


def test_reading_results_needs_no_ray():
    code = ("import sys, crystalae.search.results, crystalae.registry, crystalae.dashboard.launch; "
            "heavy = [m for m in ('ray', 'optuna', 'streamlit') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fields_marked_set_by_data_are_set_by_the_data():
    """The sweep routes keys by field role; the fields a sweep may not set must be the ones
    `model_config_for` takes from the dataset (whatever an override says)."""
    from dataclasses import fields

    from crystalae.config import VoxelConfig
    from crystalae.inference import model_config_for
    from crystalae.models import ModelConfig
    from crystalae.search.config import MODEL_PARAMS

    data_fields = {f.name for f in fields(ModelConfig) if f.metadata.get("set_by") == "data"}
    assert data_fields == {"grid", "periodic", "species", "n_classes", "lattice_head"}
    assert not data_fields & MODEL_PARAMS
    voxel = VoxelConfig(grid=8)
    base = model_config_for(voxel, (8, 22), depth=1, seg_depth=1)
    wrong = {"grid": 16, "periodic": False, "n_classes": 2, "lattice_head": False}  # species is the argument
    assert model_config_for(voxel, (8, 22), depth=1, seg_depth=1, **wrong) == base
