"""Sweeps, resume, retries and the registry, on tiny real sweeps (8^3 grid, tiny models)."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SWEEP, generated

from crystalae.registry import Registry, RegistryError
from crystalae.search.config import SweepConfig, SweepConfigError, load_sweep_config, parse_sweep_config
from crystalae.search.results import collect_trials


def test_tiny_sweep_writes_results(tiny_sweep):
    summary = tiny_sweep["summary"]
    assert len(summary.trials) == 3
    root = tiny_sweep["root"]
    assert json.loads((root / "summary.json").read_text())["trials"]
    for trial in summary.trials:
        assert trial.status in ("finished", "early-stopped")
        assert trial.best_checkpoint_path and (root / trial.best_checkpoint_path / "checkpoint.pt").exists()
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


def test_sweep_reports_its_compute_and_the_compute_before_its_best(tiny_sweep):
    summary = tiny_sweep["summary"]
    budget = summary.budget()
    assert budget.trials == 3 and budget.epochs == sum(t.epochs for t in summary.trials)
    assert budget.trial_seconds == pytest.approx(sum(h["epoch_seconds"] + h["eval_seconds"]
                                                     for t in summary.trials for h in t.history), abs=0.01)
    timeline = summary.timeline()
    best = summary.best_trial()
    at_best = next(i for i, r in enumerate(timeline) if (r.trial_id, r.epoch) == (best.trial_id, best.best_epoch))
    assert budget.epochs_to_best == at_best + 1 <= budget.epochs
    assert 0 < budget.seconds_to_best <= budget.trial_seconds
    for trial in summary.trials:  # each trial's epochs appear in the order they were trained
        assert [r.epoch for r in timeline if r.trial_id == trial.trial_id] == list(range(trial.epochs))
    written = json.loads((tiny_sweep["root"] / "summary.json").read_text())["budget"]
    assert written["epochs"] == budget.epochs and written["epochs_to_best"] == budget.epochs_to_best


def test_an_ended_sweep_extends_on_its_study_and_a_new_sweep_warm_starts(tiny_sweep, tmp_path, capsys):
    import shutil

    import optuna
    import ray

    from crystalae.search.config import parse_sweep_config
    from crystalae.search.sweep import run_sweep

    storage = tmp_path / "s"
    root = storage / "tiny"
    shutil.copytree(tiny_sweep["root"], root, ignore=shutil.ignore_patterns("*.lock"))
    stored = json.loads((root / "sweep.json").read_text())
    for key in ("warm_start", "warm_start_trials"):  # a sweep.json written before these fields existed
        stored.pop(key)
    (root / "sweep.json").write_text(json.dumps(stored))
    config = load_sweep_config(tiny_sweep["config"])
    raw = yaml.safe_load(tiny_sweep["config"].read_text())
    warm = parse_sweep_config({**raw, "name": "warm", "budget": {"trials": 1, "epochs": 1},
                               "search": {"warm_start": str(tiny_sweep["root"]), "warm_start_trials": 1}})
    try:
        extended = run_sweep(dataclasses.replace(config, trials=4), storage=storage, resume=True)
        warmed = run_sweep(warm, storage=storage)
        # every trial's Ray Train placement-group cleaner has ended (it needs the State API, so the
        # dashboard, to see a controller die; without it a stopped trial kept its CPUs for good)
        from ray.util.state import list_actors

        def cleaners() -> list:  # this sweep's Ray by address: another Ray may run on the machine
            return list_actors(address=ray.get_runtime_context().gcs_address,
                               filters=[("class_name", "=", "PlacementGroupCleaner"), ("state", "=", "ALIVE")])

        deadline = time.time() + 30
        while cleaners() and time.time() < deadline:
            time.sleep(1)
        assert not cleaners()
    finally:
        ray.shutdown()
    before = {t.trial_id: t.status for t in tiny_sweep["summary"].trials}
    after = {t.trial_id: t.status for t in extended.trials}
    assert len(after) == 4 and {k: after[k] for k in before} == before  # earlier trials kept as they were
    assert (root / "tune-2").is_dir() and json.loads((root / "summary.json").read_text())["tune_runs"] == 2
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'optuna.db'}")
    assert len(study.trials) == 4  # the new trial was sampled from the same study
    earlier = [t.params for t in tiny_sweep["summary"].trials]
    assert all(t.params not in earlier for t in extended.trials if t.trial_id not in before)  # not a replay
    assert [t.params for t in warmed.trials] == [tiny_sweep["summary"].best_trial().params]
    out = capsys.readouterr().out
    assert "started: latent_dim=" in out and "| best val_score" in out and "left" in out
    assert "╭" not in out and "Trial name" not in out  # Ray Tune's boxed tables went to ray.log
    assert (root / "ray.log").exists()


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
    assert entry["source"]["latent_prior"]  # promoting a trial fits its prior by default (issue 37)
    out = tmp_path / "gen"
    rc = main(["generate", "--model", "champion", "--registry", str(tiny_sweep["registry"]), "--sample", "2",
               "--out", str(out)])
    # from the prior the promote fitted (auto: its kind); the 2-epoch model may decode none (then exit 1, never 0)
    assert generated(rc, out, 2)["prior"]["kind"] == "posterior"
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


def test_promote_best_can_fit_the_sampling_prior_on_the_trials_dataset(tiny_sweep, tmp_path, capsys):
    from crystalae.checkpoint import load_checkpoint
    from crystalae.cli import main

    registry = tmp_path / "reg"
    assert main(["promote", str(tiny_sweep["root"]), "--best", "--fit-prior", "--registry", str(registry)]) == 0
    entry = Registry(registry).entries()[0]
    loaded = load_checkpoint(Registry(registry).resolve(entry["ref"]))
    assert loaded.meta["latent_prior"]["count"] > 0  # fitted on the trial's own training split
    assert entry["source"]["trial"] == tiny_sweep["summary"].best_trial().trial_id
    assert loaded.meta["latent_prior"]["mean"].shape == (loaded.model_config.latent_dim,)
    assert load_checkpoint(tiny_sweep["root"] / tiny_sweep["summary"].best_checkpoint()[1].path).meta["latent_prior"] is None
    # issue 37: fitting is the default for a trial (its dataset is known); --no-fit-prior opts out
    assert main(["promote", str(tiny_sweep["root"]), "--best", "--no-fit-prior", "--registry", str(registry)]) == 0
    assert load_checkpoint(Registry(registry).resolve(Registry(registry).entries()[-1]["ref"])).meta["latent_prior"] is None
    assert main(["promote", "tiny/x", "--fit-prior", "--storage", str(tiny_sweep["storage"]),
                 "--registry", str(registry)]) == 2
    assert "tiny/x: not a checkpoint folder" in capsys.readouterr().err


def test_train_from_trial_retrains_its_configuration_with_lineage(tiny_sweep, tmp_path, capsys):
    import ray

    from crystalae.checkpoint import read_checkpoint
    from crystalae.cli import main

    best = tiny_sweep["summary"].best_trial()
    ref = f"tiny/{best.trial_id}"
    try:
        assert main(["train", "--from-trial", ref, "--sweeps", str(tiny_sweep["storage"]), "--epochs", "1",
                     "--storage", str(tmp_path / "runs"), "--threads", "1", "--grad-clip", "5"]) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr()
    assert "best checkpoint:" in printed.out
    assert re.search(r"crystalae: epoch 1/1 \| loss [0-9.e+-]+ \(val [0-9.e+-]+\) \| val match [0-9.]+% \| [0-9.]+ s",
                     printed.err), printed.err  # one line per epoch
    run = tmp_path / "runs" / f"tiny-{best.trial_id}"
    newest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    payload = read_checkpoint(newest)
    lineage = payload["lineage"]
    assert lineage["sweep"] == "tiny" and lineage["trial"] == best.trial_id and lineage["epochs"] == 1
    assert lineage["params"] == best.params and lineage["objective"]["trial_best"] == best.best_value
    trial_payload = read_checkpoint(tiny_sweep["root"] / best.best_checkpoint_path)
    assert payload["dataset_hash"] == trial_payload["dataset_hash"]  # the sweep's own shards for its sigma
    assert payload["model_config"] == trial_payload["model_config"]
    assert payload["train_config"]["grad_clip"] == 5.0  # a run setting the command line adds to the trial's
    registry = tmp_path / "reg"
    assert main(["promote", str(newest), "--name", "final", "--registry", str(registry)]) == 0
    assert Registry(registry).entries()[0]["lineage"]["trial"] == best.trial_id
    assert main(["models", "--registry", str(registry)]) == 0
    assert f"retrain of sweep tiny trial {best.trial_id}" in capsys.readouterr().out
    for bad in ([ref, "--lr", "0.1"], ["tiny/nope"], ["nosweep/x"], ["justone"]):
        assert main(["train", "--from-trial", *bad, "--sweeps", str(tiny_sweep["storage"]),
                     "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "drop --config" in err and "no trial 'nope'" in err and "no sweep at" in err and "SWEEP/TRIAL" in err


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
    single = TINY_SWEEP[:TINY_SWEEP.index("objective:")] + "objective: {metric: val_score, mode: max}\n" + \
        TINY_SWEEP[TINY_SWEEP.index("budget:"):]  # these sweeps cover the single-objective path
    path.write_text(single.replace("name: tiny", f"name: {name}")
                    .replace("budget: {trials: 3, epochs: 2}", f"budget: {{trials: {trials}, epochs: {epochs}}}")
                    .replace("search: {grace_period: 1, seed: 0}", f"search: {{grace_period: {epochs}, seed: 0}}"))
    return path


def test_a_trial_that_raises_once_is_retried(tmp_path, monkeypatch):
    import ray

    from crystalae.search import sweep as sweep_module

    real, markers = sweep_module.run_trial, tmp_path / "markers"

    def raises_once(params, sweep_dict, root):  # a local function: Ray ships it to the trial by value
        from ray import tune

        marker = markers / tune.get_context().get_trial_id()
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            raise RuntimeError("injected failure (the test's, once per trial)")
        return real(params, sweep_dict, root)

    # the fault is injected here, in the test, not through a hook in the product's trial code
    monkeypatch.setattr(sweep_module, "run_trial", raises_once)
    config = _sweep_yaml(tmp_path, "retry", trials=2, epochs=1)
    try:
        sweep_module.run_sweep(load_sweep_config(config), storage=tmp_path / "s")
    finally:
        ray.shutdown()
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
        # the console counts a restored trial's epochs from its start, not from the resume
        shown = re.findall(rf"{trial_id} epoch (\d+)/2", result.stdout)
        assert shown and set(shown) == {"2"}, result.stdout[-2000:]
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


@pytest.mark.slow
def test_sweep_on_a_two_node_local_cluster_uses_both_nodes(tmp_path):
    from raycluster import RAY_ENV, two_node_cluster

    with two_node_cluster() as address:
        # 3-CPU Train workers on 5-CPU nodes: two concurrent trials cannot share a node, and each node
        # keeps 2 CPUs for trial drivers
        config = _sweep_yaml(tmp_path, "cluster", trials=2, epochs=1)
        config.write_text(config.read_text() + "resources: {workers_per_trial: 1, cpus_per_worker: 3}\n")
        result = subprocess.run([sys.executable, "-m", "crystalae", "sweep", str(config), "--storage",
                                 str(tmp_path / "s"), "--address", address],
                                env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
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
    from crystalae.models import ModelConfig, model_config_for
    from crystalae.search.config import MODEL_PARAMS

    data_fields = {f.name for f in fields(ModelConfig) if f.metadata.get("set_by") == "data"}
    assert data_fields == {"grid", "periodic", "species", "n_classes", "lattice_head", "max_atoms"}
    assert not data_fields & MODEL_PARAMS
    voxel = VoxelConfig(grid=8)
    base = model_config_for(voxel, (8, 22), depth=1, seg_depth=1)
    wrong = {"grid": 16, "periodic": False, "n_classes": 2, "lattice_head": False, "max_atoms": 3}  # species: the argument
    assert model_config_for(voxel, (8, 22), depth=1, seg_depth=1, **wrong) == base


def _scored_summary(points: dict[str, tuple[float, float]], finished_at: dict[str, float] | None = None):
    from crystalae.search.results import CheckpointRecord, Objective, SweepSummary, Trial

    trials = []
    for trial_id, (score, size) in points.items():
        metrics = {"val_score": score, "parameters": size}
        if finished_at:
            metrics["finished_at"] = finished_at[trial_id]
        record = CheckpointRecord(f"trials/{trial_id}/checkpoint_000000", 0, metrics)
        trials.append(Trial(trial_id, {}, "finished", 1, [{**metrics, "epoch": 0}], [record], score, record.path))
    return SweepSummary("s", Objective("val_score", "max"), trials, (Objective("parameters", "min"),))


def test_a_tie_goes_to_the_trial_that_reached_the_value_first():
    # the live console names the first trial to reach the best value; the summary, its budget and
    # promote must name the same one, not whichever trial folder sorts first
    summary = _scored_summary({"a": (0.0, 900), "b": (0.0, 300), "c": (0.0, 100)},
                              finished_at={"a": 30.0, "b": 10.0, "c": 20.0})
    assert summary.best_trial().trial_id == "b"
    assert [t.trial_id for t in summary.ranked_trials()] == ["b", "c", "a"]  # what warm starts seed from
    assert summary.best_checkpoint()[0].trial_id == "b"
    assert summary.budget().epochs_to_best == 1
    assert summary.pick(0.0)[0].trial_id == "c"  # all tie on score: the smallest model
    # the kept checkpoints may all be later epochs that only equal the value a trial's history reached first
    late = summary.trials[0]
    early = dataclasses.replace(late, history=[{"val_score": 0.0, "epoch": 0, "finished_at": 5.0},
                                               {"val_score": 0.0, "epoch": 1, "finished_at": 30.0}])
    summary = dataclasses.replace(summary, trials=[early, *summary.trials[1:]])
    assert summary.best_trial().trial_id == "a" and summary.best_checkpoint()[0].trial_id == "a"
    assert summary.budget().epochs_to_best == 1


def test_pareto_front_and_the_within_rule():
    from crystalae.search.results import Objective

    summary = _scored_summary({"a": (0.90, 900), "b": (0.895, 300), "c": (0.80, 100), "d": (0.80, 500),
                               "e": (0.70, 100)})
    assert {t.trial_id for t, _ in summary.pareto_front()} == {"a", "b", "c"}  # d and e are dominated
    assert summary.pick(0.01)[0].trial_id == "b"  # the smallest model within 1 point of the best score
    assert summary.pick(0.0)[0].trial_id == "a"
    assert summary.pick(0.2)[0].trial_id == "c"  # ties on size go to the first found, c before e
    assert summary.pick(0.2, Objective("val_score", "max"))[0].trial_id == "a"
    with pytest.raises(ValueError, match="METRIC:min"):
        Objective.parse("epochs", summary.objectives)
    assert Objective.parse("parameters", summary.objectives) == Objective("parameters", "min")


def test_promote_within_takes_the_smallest_good_enough_model(tiny_sweep, tmp_path):
    from crystalae.cli import main

    summary = tiny_sweep["summary"]
    assert [o.metric for o in summary.objectives] == ["val_score", "parameters"]
    front = summary.pareto_front()
    assert front and all(c.metrics["parameters"] > 0 for _, c in front)
    assert main(["promote", str(tiny_sweep["root"]), "--best", "--within", "1", "--name", "small",
                 "--registry", str(tmp_path / "reg")]) == 0
    entry = next(e for e in Registry(tmp_path / "reg").entries() if e["name"] == "small")
    assert entry["metrics"]["parameters"] == min(c.metrics["parameters"] for _, c in summary.scored())
    assert main(["promote", str(tiny_sweep["root"]), "--within", "1", "--registry", str(tmp_path / "reg")]) == 2
    assert main(["promote", str(tiny_sweep["root"]), "--best", "--prefer", "parameters",
                 "--registry", str(tmp_path / "reg2")]) == 2
    assert not (tmp_path / "reg2").exists()  # refused before the registry is touched


def test_search_settings_reach_the_sampler(tmp_path):
    """ASHA's grace period defaults to an eighth of the epochs (at least 3); `startup_trials` sets TPE's random start; the
    default TPE models parameters jointly and lies constant for running trials (two trials at a time
    must not get the same proposal)."""
    from crystalae.search.searcher import persistent_searcher

    path = tmp_path / "sweep.yaml"
    path.write_text(TINY_SWEEP.replace("search: {grace_period: 1, seed: 0}",
                                       "search: {grace_period: 1, seed: 0, startup_trials: 3}"))
    sweep = load_sweep_config(path)
    assert (sweep.startup_trials, sweep.reduction_factor, sweep.asha_grace_period()) == (3, 2.0, 1)
    # unset, ASHA's first cut comes after an eighth of the epochs, at least 3 (epoch 1 ranks trials poorly)
    unset = [dataclasses.replace(sweep, grace_period=None, epochs=e) for e in (1, 2, 6, 30, 54)]
    assert [s.asha_grace_period() for s in unset] == [1, 2, 3, 3, 6]
    sampler = persistent_searcher(sweep, tmp_path)._sampler
    assert (sampler._n_startup_trials, sampler._multivariate, sampler._constant_liar) == (3, True, True)


@pytest.mark.parametrize("name", ["demo", "perov_5", "carbon_24"])
def test_the_shipped_sweep_configs_are_valid_and_search_the_users_three(name, shipped_config_cwd):
    repo = Path(__file__).resolve().parents[1]
    # their data paths are relative to the repository root: shipped_config_cwd maps them to tests/data
    config = load_sweep_config(repo / "search" / "configs" / f"{name}.yaml")
    assert {"latent_dim", "sigma", "depth"} <= {p.name for p in config.search_space}
    assert config.objective_metric == "val_recovery" and config.scheduler == "asha"


def test_a_sweep_reads_a_list_of_sources_as_one_dataset_and_checks_each(tmp_path):
    import yaml as _yaml

    from crystalae.search.config import parse_sweep_config

    raw = _yaml.safe_load(TINY_SWEEP)
    ok = parse_sweep_config({**raw, "data": {**raw["data"], "source": ["demo:20", "demo:16"]}})
    assert ok.data["source"] == ["demo:20", "demo:16"]
    with pytest.raises(SweepConfigError, match="nope.csv does not exist"):
        parse_sweep_config({**raw, "data": {**raw["data"], "source": ["demo:20", str(tmp_path / "nope.csv")]}})
    with pytest.raises(SweepConfigError, match="empty list"):
        parse_sweep_config({**raw, "data": {**raw["data"], "source": []}})


def test_a_sweeps_small_files_export_as_a_record_that_reads_like_the_sweep(tiny_sweep, tmp_path):
    from crystalae.search.export import export_record

    written = export_record(tiny_sweep["root"], tmp_path / "record")
    assert written and not list((tmp_path / "record").rglob("*.pt")) and not (tmp_path / "record" / "datasets").exists()
    copy, original = collect_trials(tmp_path / "record"), collect_trials(tiny_sweep["root"])
    assert [t.trial_id for t in copy.trials] == [t.trial_id for t in original.trials]
    assert [t.status for t in copy.trials] == [t.status for t in original.trials]
    assert copy.best_trial().trial_id == original.best_trial().trial_id
    assert copy.budget() == original.budget()
    import ray

    from crystalae.search.retrain import retrain_trial

    best = original.best_trial()
    try:  # a committed record has no shards: the retrain prepares the trial's own under its output folder
        result = retrain_trial("unused", str(tmp_path / "record" / "trials" / best.trial_id), epochs=1,
                               train_overrides={"threads": 1}, out=tmp_path / "runs")
    finally:
        ray.shutdown()
    assert result.error is None and list((tmp_path / "runs" / "datasets").glob("*/manifest.json"))
    assert not (tmp_path / "record" / "datasets").exists()


def test_a_record_names_its_local_sources_relative_to_the_current_directory(tmp_path, monkeypatch):
    from crystalae.search.export import export_record

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    data = tmp_path / "shared" / "val.csv"
    (sweep / "sweep.json").write_text(json.dumps({"name": "s", "data": {"source": [str(data), "demo:20", "s3://b/x.csv"]}}))
    monkeypatch.chdir(tmp_path / "sweep")
    export_record(sweep, tmp_path / "record")
    stored = json.loads((tmp_path / "record" / "sweep.json").read_text())
    assert stored["data"]["source"] == ["../shared/val.csv", "demo:20", "s3://b/x.csv"]


def test_epochs_done_counts_from_the_trials_start_not_the_resume():
    from crystalae.search.console import epochs_done

    # a trial restored at epoch 17 reports Tune's training_iteration 1 again
    assert epochs_done({"epochs_done": 18, "epoch": 17, "training_iteration": 1}) == 18
    assert epochs_done({"epoch": 17, "training_iteration": 1}) == 18  # checkpoints from before the field
    assert epochs_done({"training_iteration": 3}) == 3


def test_a_sweep_with_mlflow_tracking_logs_each_trial_as_a_run(tiny_sweep):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny_sweep["mlflow"])
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    # every trial of the fixture's sweep is a run (tests that extend a copy of it add theirs)
    logged = [{k: run.data.params.get(k) for k in ("latent_dim", "sigma", "lr")} for run in runs]
    for trial in tiny_sweep["summary"].trials:
        assert {k: str(v) for k, v in trial.params.items()} in logged, trial.params
    for run in runs:
        assert "val_score" in run.data.metrics and "epochs_done" in run.data.metrics


def test_a_sweep_folder_plans_restore_extend_or_new_without_ray():
    from crystalae.search.sweep import _plan_run

    first, second, fresh = Path("tune"), Path("tune-2"), Path("tune-3")
    new = _plan_run([], restorable=False, ended=0, had=0, trials=8, next_dir=first)
    assert (new.action, new.experiment, new.new_trials, new.warm_start) == ("new", first, 8, True)
    stopped = _plan_run([first], restorable=True, ended=0, had=5, trials=8, next_dir=second)
    assert (stopped.action, stopped.experiment, stopped.warm_start) == ("restore", first, False)
    grown = _plan_run([first, second], restorable=True, ended=2, had=8, trials=12, next_dir=fresh)
    assert (grown.action, grown.experiment, grown.new_trials, grown.study_run) == ("new", fresh, 4, 2)
    ended = _plan_run([first], restorable=True, ended=1, had=8, trials=8, next_dir=second)
    assert ended.action == "restore"  # read back, nothing trains
    unsaved = _plan_run([first], restorable=False, ended=0, had=3, trials=8, next_dir=second)
    assert (unsaved.action, unsaved.experiment, unsaved.new_trials) == ("new", first, 5)
    assert _plan_run([first], restorable=False, ended=0, had=8, trials=8, next_dir=second).action == "none"


def test_a_sweep_is_the_same_sweep_whatever_its_unread_search_settings():
    """A FIFO sweep reads no grace period or reduction factor, random search no start-up trials: changing
    them (or their defaults) keeps it resumable; for ASHA + TPE they are part of what the sweep is."""
    from crystalae.search.sweep import _identity

    def identity(**search):
        raw = {**yaml.safe_load(TINY_SWEEP), "search": {"seed": 0, **search}}
        return _identity(parse_sweep_config(raw).as_dict())

    fifo = {"algorithm": "random", "scheduler": "fifo"}
    assert identity(**fifo, grace_period=1, reduction_factor=3, startup_trials=2) == identity(**fifo)
    assert identity(grace_period=1) != identity(grace_period=2)
    assert identity(reduction_factor=3) != identity()
    assert identity(startup_trials=2) != identity()


def test_ray_trains_cleaner_finds_the_sweeps_state_api_while_another_ray_runs():
    """Ray Train's PlacementGroupCleaner (what frees a stopped trial's CPUs) asks the State API, found by
    address: with a second Ray instance on the machine an address-less lookup raised, the cleaner died,
    and a search-efficiency sweep hung with 7 of 8 CPUs held. Asked as the cleaner asks, from a worker."""
    import ray

    from crystalae.search.sweep import start_local_ray

    other = subprocess.Popen([sys.executable, "-c", "import ray, sys, time\n"
                              "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
                              "print('up', flush=True)\ntime.sleep(600)"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        start_local_ray(parse_sweep_config(yaml.safe_load(TINY_SWEEP)))

        @ray.remote(num_cpus=0)
        class Controller:
            def ready(self) -> bool:
                return True

        @ray.remote(num_cpus=0)
        def state_of(actor_id: str) -> str:
            from ray.util.state import get_actor  # what the cleaner calls, with no address

            return get_actor(actor_id, timeout=30).state

        controller = Controller.remote()
        ray.get(controller.ready.remote())
        assert ray.get(state_of.remote(controller._actor_id.hex())) == "ALIVE"
    finally:
        ray.shutdown()
        other.kill()
        other.wait()


def test_configured_points_run_first_then_the_warm_start_sweeps_best(tiny_sweep):
    """`search.points` (say, a hand-tuned recipe) come before the earlier sweep's best, never twice."""
    from crystalae.search.results import best_params
    from crystalae.search.sweep import warm_start_points

    best, second = best_params(tiny_sweep["root"])[:2]
    hand = {"latent_dim": 4, "sigma": 0.6, "lr": 2.0e-3}
    raw = yaml.safe_load(TINY_SWEEP)
    config = parse_sweep_config({**raw, "search": {"warm_start": str(tiny_sweep["root"]), "warm_start_trials": 1,
                                                   "points": [hand, best]}})
    # the earlier best is already a point: not repeated, the warm start takes the next best
    assert warm_start_points(config) == [hand, best, second]
    alone = parse_sweep_config({**raw, "search": {"points": [hand]}})
    assert warm_start_points(alone) == [hand]
    stored = json.loads(json.dumps(config.as_dict()))  # as sweep.json keeps it
    assert SweepConfig.from_dict(stored).points == config.points
    assert parse_sweep_config(raw).points == ()


@pytest.mark.parametrize("point, message", [
    ({"latent_dim": 4, "sigma": 0.6}, "points\\[0\\]: must give every searched parameter.*missing \\['lr'\\]"),
    ({"latent_dim": 4, "sigma": 0.6, "lr": 2.0e-3, "depth": 2}, "not searched \\['depth'\\]"),
    ({"latent_dim": 5, "sigma": 0.6, "lr": 0.5}, "outside the search space: latent_dim=5, lr=0.5"),
    ([4, 0.6, 2.0e-3], "must be a mapping"),
])
def test_a_point_the_search_space_cannot_produce_is_refused(point, message):
    raw = yaml.safe_load(TINY_SWEEP)
    with pytest.raises(SweepConfigError, match=message):
        parse_sweep_config({**raw, "search": {"points": [point]}})
