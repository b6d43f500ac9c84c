"""optuna-dashboard serves the Optuna study a `crystalae sweep` writes (the real package, on loopback)."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_optuna_dashboard_serves_a_sweeps_study(tiny_sweep):
    binary = Path(sys.executable).parent / "optuna-dashboard"
    if not binary.exists():
        pytest.fail("optuna-dashboard is not installed (it is in the dev and dashboard extras)")
    root, summary = tiny_sweep["root"], tiny_sweep["summary"]
    port = _free_port()
    server = subprocess.Popen([str(binary), f"sqlite:///{root / 'optuna.db'}", "--host", "127.0.0.1",
                               "--port", str(port), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, studies = time.time() + 60, None
        while studies is None and time.time() < deadline and server.poll() is None:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, server.stdout.read().decode()[-2000:] if server.poll() is not None else "no answer"
        study = next(s for s in studies if s["study_name"] == summary.name)
        assert study["directions"] == ["maximize", "minimize"]  # the tiny sweep's two objectives
        detail = _get(f"{base}/api/studies/{study['study_id']}")
        served = detail["trials"]
        assert len(served) == len(summary.trials) == 3
        assert {p["name"] for t in served for p in t["params"]} == set(summary.trials[0].params)
        # the objectives by name; each trial's values are those of the checkpoint crystalae calls its best
        # (its best epoch on the first objective), and a trial ASHA stopped is pruned
        metrics = [o.metric for o in summary.objectives]
        assert detail["objective_names"] == metrics
        by_params = {tuple(sorted((k, str(v)) for k, v in t.params.items())): t for t in summary.trials}
        for served_trial in served:
            ours = by_params[tuple(sorted((p["name"], p["param_external_value"]) for p in served_trial["params"]))]
            assert [round(v, 9) for v in served_trial["values"]] == \
                [round(ours.best_record.metrics[m], 9) for m in metrics]
            assert served_trial["state"] == ("Pruned" if ours.status == "early-stopped" else "Complete")
        assert detail["best_trials"]  # optuna-dashboard's own Pareto front of the study
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("objectives", ["multi", "single"])
def test_the_study_names_its_objectives_keeps_each_trials_best_and_prunes_a_stopped_trial(tmp_path, objectives):
    """What optuna-dashboard shows comes from the study the searcher writes: fed by hand here, no Ray."""
    import optuna
    import yaml
    from conftest import TINY_SWEEP

    from crystalae.search.config import parse_sweep_config
    from crystalae.search.searcher import persistent_searcher

    raw = yaml.safe_load(TINY_SWEEP)  # two objectives, a budget of 2 epochs
    if objectives == "single":
        raw["objective"] = {"metric": "val_score", "mode": "max"}
    sweep = parse_sweep_config(raw)
    searcher = persistent_searcher(sweep, tmp_path)
    primary = (None, None) if sweep.multi_objective else ("val_score", "max")  # as Tune passes them
    searcher.set_search_properties(*primary, config={p.name: p.to_tune() for p in sweep.search_space})
    metrics = list(sweep.objective_metrics())
    for trial_id in ("full", "stopped", "worse"):
        searcher.suggest(trial_id)

    def report(trial_id: str, epoch: int, score: float) -> dict:
        result = {"val_score": score, "parameters": 100 + epoch, "epoch": epoch, "epochs_done": epoch + 1,
                  "training_iteration": epoch + 1, "pid": 1234}
        searcher.on_trial_result(trial_id, result)
        return result

    report("full", 0, 0.5)
    searcher.on_trial_complete("full", report("full", 1, 0.25))  # a worse last epoch: the value is still its best
    searcher.on_trial_complete("stopped", report("stopped", 0, 0.125))  # ASHA stopped it after 1 epoch of 2
    report("worse", 0, 0.5)
    searcher.on_trial_complete("worse", report("worse", 1, 0.5))  # a tie goes to the earlier epoch

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.metric_names == metrics  # optuna-dashboard's column names, not "Objective 0"
    full, stopped, worse = study.trials
    assert full.state == worse.state == optuna.trial.TrialState.COMPLETE
    assert full.values == [0.5, 100][:len(metrics)]  # the best epoch's values, each objective at that epoch
    assert worse.values == [0.5, 100][:len(metrics)]
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.values == [0.125, 100][:len(metrics)]
