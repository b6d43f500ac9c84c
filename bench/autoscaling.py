"""Ray's autoscaler run for real on this machine, no cloud: Ray's fake multi-node provider starts worker
nodes (local raylets) when a sweep's trials queue and stops them once idle.

    python bench/autoscaling.py --out bench/results/autoscaling.json

The cluster config is derived from cluster.yaml (`fake_cluster_config`): its node types with the same
names and their instances' resource shapes scaled down (`INSTANCE_SHAPES`, `SCALE`), its upscaling speed,
fewer workers and a shorter idle timeout. The head has fewer CPUs than the sweep's concurrent trials need,
so the autoscaler must add `gpu_worker` nodes while trials queue, then remove them after the idle timeout.
It prints and saves the timeline (nodes added and removed, trials started and ended) and checks both.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # this process watches the cluster as a Ray client, and Ray reads its auth mode on import
    sys.path.insert(0, str(ROOT / "tests"))
    from raycluster import RAY_ENV

    os.environ.update(RAY_ENV)

try:  # the Ray monitor imports this module (NamedHeadProvider) without the bench folder's helpers
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE
except ImportError:  # Ray missing: fails in main, where it is needed
    FakeMultiNodeProvider = object

# AWS's figures for cluster.yaml's instance types (vCPUs, GPUs); cluster.yaml leaves `resources: {}` for
# Ray's AWS provider to fill in from the instance type, so the fake provider needs them spelt out.
INSTANCE_SHAPES = {"m5.2xlarge": {"CPU": 8}, "g5.xlarge": {"CPU": 4, "GPU": 1}}
SCALE = {"CPU": 0.25, "GPU": 1.0}  # this machine has 2 cores: head 8 -> 2 CPUs, GPU worker 4 -> 1 CPU (+1 GPU)
MAX_WORKERS = 2  # cluster.yaml's 8 workers, capped for one small machine
IDLE_TIMEOUT_MINUTES = 0.25  # cluster.yaml's 10 minutes, shortened so the bench sees nodes removed
# Ray Train asks the autoscaler for its workers' resources (request_resources) and a killed run never
# withdraws the request: it expires after this long (Ray Train's AUTOSCALING_REQUESTS_EXPIRE_TIME_S), and
# until then the autoscaler keeps nodes for it, idle or not
REQUEST_EXPIRY_S = 180

SWEEP = """
name: autoscale
data: {source: "demo:36", grid: 8, val_fraction: 0.25}
search_space:
  latent_dim: {type: categorical, values: [4, 8]}
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
objective: {metric: val_score, mode: max}
budget: {trials: 4, epochs: 4}
max_concurrent: 3
resources: {workers_per_trial: 1, cpus_per_worker: 1}
search: {grace_period: 4, seed: 0}
train: {batch_size: 8, eval_limit: 4}
model: {depth: 1, base_width: 4, max_width: 8, seg_depth: 1, seg_width: 4, residual: false}
"""


class NamedHeadProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider with the head node under the config's head type name (Ray's own
    calls it "ray.head.default"), so the derived config keeps cluster.yaml's names."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self._nodes[self._head_node_id]["tags"][TAG_RAY_USER_NODE_TYPE] = provider_config["head_node_type"]


def scaled_shape(instance_type: str) -> dict[str, int]:
    """An instance type's resources, scaled down (`SCALE`), at least 1 of each."""
    return {k: max(1, round(v * SCALE[k])) for k, v in INSTANCE_SHAPES[instance_type].items()}


def fake_cluster_config(cluster: dict[str, Any], gcs_address: str) -> dict[str, Any]:
    """cluster.yaml's autoscaling settings on the fake provider: same node type names, scaled shapes,
    at most `MAX_WORKERS` workers, `IDLE_TIMEOUT_MINUTES`; no setup (the nodes are processes here)."""
    head = cluster["head_node_type"]
    types = {name: {"resources": scaled_shape(spec["node_config"]["InstanceType"]), "node_config": {},
                    "min_workers": spec.get("min_workers", 0),
                    "max_workers": 0 if name == head else min(spec.get("max_workers", 0), MAX_WORKERS)}
             for name, spec in cluster["available_node_types"].items()}
    empty_lists = ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                   "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                   "worker_start_ray_commands")
    return {
        "cluster_name": cluster["cluster_name"], "max_workers": min(cluster["max_workers"], MAX_WORKERS),
        "upscaling_speed": cluster["upscaling_speed"], "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        # the fake nodes are Ray processes started already: nothing to set up over SSH, no launch hash to compare
        "provider": {"type": "external", "module": "autoscaling.NamedHeadProvider", "gcs_address": gcs_address,
                     "head_node_type": head, "disable_node_updaters": True, "disable_launch_config_check": True,
                     "use_node_id_as_ip": True},  # its nodes share one IP; the provider names them by node id
        "auth": {"ssh_user": "ray"}, "available_node_types": types, "head_node_type": head,
        "file_mounts": {}, "file_mounts_sync_continuously": False, **{k: [] for k in empty_lists},
    }


def autoscaling_cluster(temp: Path):
    """A `tests/raycluster.LocalCluster` head whose monitor runs Ray's autoscaler on the derived config."""
    sys.path.insert(0, str(ROOT / "tests"))
    from raycluster import LocalCluster, free_port

    port = free_port()
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = fake_cluster_config(cluster, f"127.0.0.2:{port}")
    path = temp / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(config))
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "PYTHONPATH": str(Path(__file__).parent)}  # the monitor imports NamedHeadProvider from here
    return LocalCluster(head["CPU"], env=env, port=port,
                        head_args=(f"--autoscaling-config={path}", f"--num-gpus={head.get('GPU', 0)}")), config


def watch(cluster, sweep: subprocess.Popen, console: Path, idle_timeout_s: float, limit_s: float) -> list[dict]:
    """Poll the cluster's nodes every second while the sweep runs and until the idle workers are gone;
    the timeline of node and trial events, in seconds since the sweep started."""
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    started, events, known, seen_lines = time.monotonic(), [], {}, 0
    ended_at = None
    try:
        while time.monotonic() - started < limit_s:
            now = round(time.monotonic() - started, 1)
            alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            for node, resources in alive.items():
                if node not in known:
                    events.append({"t": now, "event": "node up", "node": node[-5:], "resources": resources})
            for node in set(known) - set(alive):
                events.append({"t": now, "event": "node down", "node": node[-5:]})
            known = alive
            lines = console.read_text().splitlines()
            for line in lines[seen_lines:]:
                if re.search(r" (started|finished|stopped early)", line):
                    events.append({"t": now, "event": "sweep", "line": line})
            seen_lines = len(lines)
            if ended_at is None and sweep.poll() is not None:
                ended_at = now
                events.append({"t": now, "event": "sweep ended", "rc": sweep.returncode})
            if ended_at is not None and (len(alive) == 1 or now - ended_at > REQUEST_EXPIRY_S + idle_timeout_s + 60):
                break
            time.sleep(1)
    finally:
        ray.shutdown()
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--limit", type=float, default=900, help="seconds before giving up")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="crae-as-", dir="/tmp") as tmp:
        temp = Path(tmp)
        cluster, config = autoscaling_cluster(temp)
        try:
            sweep_file = temp / "autoscale.yaml"
            sweep_file.write_text(SWEEP)
            console = temp / "console.txt"
            with console.open("w") as out:
                sweep = subprocess.Popen([sys.executable, "-m", "crystalae", "sweep", str(sweep_file), "--storage",
                                          str(temp / "sweeps"), "--address", cluster.address],
                                         env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
                try:
                    events = watch(cluster, sweep, console, config["idle_timeout_minutes"] * 60, args.limit)
                finally:
                    sweep.kill()
            summary = console.read_text().splitlines()[-8:]
        finally:
            cluster.stop()

    ups = [e for e in events if e["event"] == "node up"][1:]  # the first is the head
    downs = [e for e in events if e["event"] == "node down"]
    end = next((e for e in events if e["event"] == "sweep ended"), None)
    figures = {
        "cluster": {k: config[k] for k in ("max_workers", "upscaling_speed", "idle_timeout_minutes")}
        | {"node_types": {k: v["resources"] for k, v in config["available_node_types"].items()}},
        "sweep": {"trials": 4, "max_concurrent": 3, "cpus_per_trial": 1.01},
        "workers_added": len(ups), "workers_removed": len(downs),
        "sweep_rc": end["rc"] if end else None, "sweep_seconds": end["t"] if end else None,
        "removed_seconds_after_sweep": [round(e["t"] - end["t"], 1) for e in downs] if end else None,
        "timeline": events, "console_tail": summary,
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "timeline"}, indent=1))
    for event in events:
        print(event)
    if args.out:
        from crystalae.files import write_json

        write_json(args.out, figures)
    ok = end and end["rc"] == 0 and ups and len(downs) == len(ups) and all(e["t"] < end["t"] for e in ups)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
