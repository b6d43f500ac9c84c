"""Ray's autoscaler on cluster.yaml's node types, scaled down onto this machine with Ray's fake multi-node
provider (`bench/autoscaling.py` derives the config; the bench runs a whole sweep on it)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from raycluster import marked_line

ROOT = Path(__file__).resolve().parents[1]

QUEUE_AND_DRAIN = """
import json, time, ray
from ray.util.placement_group import placement_group, remove_placement_group
ray.init(address="{address}", log_to_driver=False)
alive = lambda: sum(n["Alive"] for n in ray.nodes())
start = time.monotonic()
before = alive()
pg = placement_group([{{"CPU": 1}}] * 3)  # the 2-CPU head holds two: one more node must come
ray.get(pg.ready(), timeout=180)
up = time.monotonic() - start
during = alive()
remove_placement_group(pg)
idle = time.monotonic()
while alive() > 1 and time.monotonic() - idle < 180:
    time.sleep(1)
print("autoscaling:", json.dumps({{"before": before, "during": during, "after": alive(), "up_s": round(up, 1),
                  "down_s": round(time.monotonic() - idle, 1)}}))
"""


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import autoscaling

    return autoscaling


def test_the_config_derived_from_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    autoscaling = _bench()
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = autoscaling.fake_cluster_config(cluster, "127.0.0.2:6379")
    validate_config(prepare_config(config))  # what `ray start --autoscaling-config` and `ray up` check
    types = config["available_node_types"]
    assert set(types) == set(cluster["available_node_types"]) and config["head_node_type"] == cluster["head_node_type"]
    assert types["head"]["resources"] == {"CPU": 2} and types["head"]["max_workers"] == 0
    assert types["gpu_worker"]["resources"] == {"CPU": 1, "GPU": 1} and types["gpu_worker"]["max_workers"] == 2
    assert config["upscaling_speed"] == cluster["upscaling_speed"]


@pytest.mark.slow
def test_the_autoscaler_adds_a_worker_for_queued_work_and_removes_it_when_idle(tmp_path):
    autoscaling = _bench()
    cluster, config = autoscaling.autoscaling_cluster(tmp_path)
    try:
        result = subprocess.run([sys.executable, "-c", QUEUE_AND_DRAIN.format(address=cluster.address)],
                                env=cluster.env, capture_output=True, text=True, timeout=420)
    finally:
        cluster.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(marked_line(result.stdout, "autoscaling:"))  # Ray may print lines of its own
    assert (seen["before"], seen["during"], seen["after"]) == (1, 2, 1), seen
    # removed after the idle timeout, not at once
    assert seen["down_s"] >= config["idle_timeout_minutes"] * 60, seen
