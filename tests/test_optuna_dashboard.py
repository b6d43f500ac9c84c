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
        # Optuna records each trial's last reported objectives: the last epoch of crystalae's own history
        metrics = [o.metric for o in summary.objectives]
        assert sorted([round(v, 9) for v in t["values"]] for t in served) == \
            sorted([round(t.history[-1][m], 9) for m in metrics] for t in summary.trials)
        assert detail["best_trials"]  # optuna-dashboard's own Pareto front of the study
    finally:
        server.terminate()
        server.wait(timeout=30)
