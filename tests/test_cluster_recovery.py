"""Sweeps on a multi-node local Ray cluster (nodes on 127.0.0.x, `tests/raycluster.py`) that lose a node or
their driver: every trial ends accounted for, trials resume from their checkpoints, and no placement group
of an ended run keeps its CPUs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_SWEEP
from raycluster import marked_line

from crystalae import uri_fs
from crystalae.search.results import collect_trials

FREE_CHECK = """
import json, time, ray
from ray._private.state import state
ray.init(address="{address}", log_to_driver=False)
for _ in range(90):  # Ray frees a dead job's resources within seconds; on a loaded machine, a minute or more
    total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
    cleaners = [a for a in state.actor_table(None).values()
                if a["ActorClassName"] == "PlacementGroupCleaner" and a["State"] == "ALIVE"]
    if free == total and not cleaners:
        break
    time.sleep(1)
print("cluster state:", json.dumps({{"total": total, "free": free, "cleaners": len(cleaners)}}))
"""


def _sweep_yaml(tmp_path: Path, name: str, trials: int, epochs: int, grace: int) -> Path:
    """TINY_SWEEP, single objective, 2 at a time, one 1-CPU Train worker per trial."""
    single = TINY_SWEEP[:TINY_SWEEP.index("objective:")] + "objective: {metric: val_score, mode: max}\n" + \
        TINY_SWEEP[TINY_SWEEP.index("budget:"):]
    path = tmp_path / f"{name}.yaml"
    path.write_text(single.replace("name: tiny", f"name: {name}")
                    .replace("budget: {trials: 3, epochs: 2}", f"budget: {{trials: {trials}, epochs: {epochs}}}")
                    .replace("search: {grace_period: 1, seed: 0}", f"search: {{grace_period: {grace}, seed: 0}}")
                    + "resources: {workers_per_trial: 1, cpus_per_worker: 1}\n")
    return path


def _snapshots(root: str | Path) -> dict[str, list[dict]]:
    """Each trial's committed checkpoints (Ray Train's snapshot), local folder or s3://."""
    out = {}
    trials = uri_fs.join(root, "trials")
    if not uri_fs.exists(trials):
        return out
    for path, _ in uri_fs.list_files(trials):
        if path.endswith("checkpoint_manager_snapshot.json"):
            try:
                results = json.loads(uri_fs.read_text(uri_fs.join(trials, path)))["checkpoint_results"]
            except (OSError, ValueError, KeyError):
                continue  # being rewritten
            out[path.split("/")[0]] = results
    return out


def _cluster_state(cluster) -> dict:
    result = subprocess.run([sys.executable, "-c", FREE_CHECK.format(address=cluster.address)], env=cluster.env,
                            capture_output=True, text=True, timeout=240)
    return json.loads(marked_line(result.stdout, "cluster state:"))


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen):
    """`condition()`'s first true value, polled each second while the sweep `proc` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before {what}")
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_sweep_survives_losing_the_node_its_trials_train_on(tmp_path, s3_bucket, monkeypatch):
    from raycluster import local_cluster

    monkeypatch.setenv("CRYSTALAE_CACHE", str(tmp_path / "cache"))
    storage = f"{s3_bucket}/sweeps"
    root = f"{storage}/spot"
    aws = {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}
    # The head has no CPUs: every trial's driver, Train controller and worker run on the worker node, so
    # losing it kills whole trials (Tune restarts them) and leaves their worker groups' placement groups
    # to be rescheduled onto the next node. Three CPUs per node hold two trials and no leaked group.
    with local_cluster(head_cpus=0, workers={"127.0.0.3": 3}, env=aws) as cluster:
        config = _sweep_yaml(tmp_path, "spot", trials=3, epochs=5, grace=5)
        console = (tmp_path / "console.txt").open("w+")  # a file, not a pipe: readable while the sweep runs
        proc = subprocess.Popen([sys.executable, "-m", "crystalae", "sweep", str(config), "--storage", storage,
                                 "--address", cluster.address], env=cluster.env, stdout=console,
                                stderr=subprocess.STDOUT, text=True)
        try:
            # kill the node once a trial has committed a checkpoint there, its next epochs still to train
            _wait_for(lambda: any(r["metrics"].get("node_ip") == "127.0.0.3" for results in _snapshots(root).values()
                                  for r in results), 300, "a checkpoint on 127.0.0.3", proc)
            cluster.kill_raylet("127.0.0.3")
            cluster.wait_for_nodes(alive=1)
            cluster.add_node("127.0.0.4", 3)
            proc.wait(timeout=420)
        finally:
            proc.kill()
        out = (tmp_path / "console.txt").read_text()
        assert proc.returncode == 0, out[-3000:]
        state = _cluster_state(cluster)
    summary = collect_trials(root)
    assert len(summary.trials) == 3 and all(t.status == "finished" for t in summary.trials), \
        [(t.trial_id, t.status) for t in summary.trials]
    moved = [t for t in summary.trials if {h["node_ip"] for h in t.history} == {"127.0.0.3", "127.0.0.4"}]
    assert moved, out[-3000:]
    for trial in moved:
        # resumed from its last checkpoint on S3: every epoch trained once, none again
        assert [h["epoch"] for h in trial.history] == [0, 1, 2, 3, 4]
        # the last epoch it trained there (its last result to reach the console may be an epoch earlier:
        # a checkpoint can be committed before the node dies and its result reaches Tune)
        lost = [h["epoch"] + 1 for h in trial.history if h["node_ip"] == "127.0.0.3"][-1]
        assert re.search(rf"{trial.trial_id} lost node 127\.0\.0\.3 after epoch \d/5; resumed on 127\.0\.0\.4 "
                         rf"from its epoch-{lost} checkpoint, nothing lost", out), out[-3000:]
    assert state == {"total": 3.0, "free": 3.0, "cleaners": 0}


@pytest.mark.slow
def test_a_killed_driver_resumes_on_a_cluster_with_a_dashboard(tmp_path):
    from raycluster import local_cluster

    storage = tmp_path / "s"
    root = storage / "restart"
    # ASHA stops the worse trial at epoch 1: its run is killed, which leaves a placement group that Ray
    # Train's own cleaner removes only where the dashboard serves the State API (here it does)
    with local_cluster(head_cpus=1, workers={"127.0.0.3": 2}, dashboard=True) as cluster:
        config = _sweep_yaml(tmp_path, "restart", trials=3, epochs=2, grace=1)
        command = [sys.executable, "-m", "crystalae", "sweep", str(config), "--storage", str(storage),
                   "--address", cluster.address]
        proc = subprocess.Popen(command, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            ended = _wait_for(lambda: {t: {r["checkpoint_dir_name"] for r in results}
                                       for t, results in _snapshots(root).items()
                                       if any(r["metrics"].get("epoch") == 1 for r in results)}, 300,
                              "a trial's last epoch", proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert not (root / "summary.json").exists()
        result = subprocess.run(command + ["--resume"], env=cluster.env, capture_output=True, text=True, timeout=420)
        assert result.returncode == 0, result.stderr[-3000:]
        state = _cluster_state(cluster)
    summary = collect_trials(root)
    by_id = {t.trial_id: t for t in summary.trials}
    assert len(by_id) == 3 and all(t.status in ("finished", "early-stopped") for t in by_id.values()), \
        [(t.trial_id, t.status) for t in summary.trials]
    for trial_id, dirs in ended.items():  # finished before the kill: kept, not retrained
        assert {Path(c.path).name for c in by_id[trial_id].checkpoints} == dirs
    assert state == {"total": 3.0, "free": 3.0, "cleaners": 0}


def test_a_multi_node_sweep_on_a_node_local_folder_is_warned_about(tmp_path):
    from crystalae.search.sweep import node_local_storage

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/root / ext4 rw 0 0\nfs-1.efs:/ {tmp_path}/shared nfs4 rw 0 0\n")
    here = {"Alive": True, "NodeManagerHostname": "head"}
    other = {"Alive": True, "NodeManagerHostname": "spot-1"}
    gone = {"Alive": False, "NodeManagerHostname": "spot-0"}
    problem = node_local_storage(tmp_path / "local", [here, other, gone], host="head", mounts=mounts)
    assert problem and "spot-1" in problem and "spot-0" not in problem and "(ext4)" in problem
    assert "epoch 0" in problem and "s3://" in problem
    assert node_local_storage(tmp_path / "shared" / "sweeps", [here, other], host="head", mounts=mounts) is None
    assert node_local_storage(tmp_path / "local", [here, gone], host="head", mounts=mounts) is None  # one machine
    assert node_local_storage("s3://bucket/sweeps", [here, other], host="head", mounts=mounts) is None
