"""The environment crystalae gives the Ray processes it starts (trial drivers, Train controllers, workers)."""
from __future__ import annotations

import os
import socket
from collections.abc import Iterable

__all__ = ["API_SERVER_ENV", "START_TIMEOUT_ENV", "free_local_port", "free_dead_runs", "orphan_placement_groups", "runtime_env",
           "stale_cleaners"]

# Ray Train gives a worker group 60 s to start. On a busy small machine a start takes longer (70 s was
# measured on 2 shared cores), and a start that times out leaves its placement group to Ray Train's
# PlacementGroupCleaner. Ten minutes, unless the user set it.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_S = "600"
# Ray Train's PlacementGroupCleaner (the only thing that frees the CPUs of a trial ASHA stops) asks the
# State API for the controller's state. Without an address it looks for "the" Ray instance on the
# machine; with a second one running (a test run, another sweep, `crystalae train`) it raises, its
# thread dies, and every trial stopped after that keeps its placement group until the sweep hangs
# waiting for CPUs (seen twice, with 7 of 8 CPUs held). Naming our dashboard's address avoids the search.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the dashboard of a Ray instance about to start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def runtime_env(passed: Iterable[str] = (), api_server: str | None = None) -> dict:
    """`ray.init(runtime_env=...)`: the worker-group start timeout (the user's value if set), the State API
    address `api_server` (the user's RAY_API_SERVER_ADDRESS if set) and the variables named in `passed`
    that are set here."""
    env = {START_TIMEOUT_ENV: os.environ.get(START_TIMEOUT_ENV, START_TIMEOUT_S)}
    if api_server is not None:
        env[API_SERVER_ENV] = os.environ.get(API_SERVER_ENV, api_server)
    env.update({k: os.environ[k] for k in passed if k in os.environ})
    return {"env_vars": env}


def orphan_placement_groups(job_id: str) -> list[str]:
    """Placement groups of job `job_id` (hex) whose creating actor is dead: the CPUs of a Ray Train run
    whose controller was killed (a trial ASHA stopped, a trial on a lost node). Ray keeps them until
    the job ends; Ray Train's own PlacementGroupCleaner frees them only while it reaches the State API,
    which a cluster started with `--include-dashboard=false` does not serve (its monitor thread then
    dies on the first query, and each such run keeps its CPUs for the rest of the sweep).

    Read from the GCS directly (no dashboard needed). Detached groups and groups the job's driver
    created itself (Tune's per-trial groups) are never listed. Returns hex ids.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    orphans = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        # a group the driver created has the nil actor id (all 0xff) as creator, and counts as "dead"
        by_actor = pg.creator_actor_id.strip(b"\xff") != b""
        if (by_actor and pg.creator_actor_dead and pg.creator_job_id.hex() == job_id and not pg.is_detached
                and pg.state != table.REMOVED):
            orphans.append(pg.placement_group_id.hex())
    return orphans


def stale_cleaners(job_id: str) -> list[dict]:
    """Ray Train PlacementGroupCleaner actors of job `job_id` whose controller is gone (their rows of
    Ray's actor table). Each is a detached Python process of ~200 MB on the head node; one whose
    controller was killed outlives the job (its monitor thread is dead without the State API, see
    `orphan_placement_groups`). A cleaner's owner is its controller's worker, so a cleaner whose owner
    address no live actor has is stale."""
    from ray._private.state import state

    actors = state.actor_table(None).values()
    alive = {(a["Address"]["IPAddress"], a["Address"]["Port"]) for a in actors if a["State"] == "ALIVE"}
    return [a for a in actors
            if a["ActorClassName"] == "PlacementGroupCleaner" and a["JobID"] == job_id and a["State"] == "ALIVE"
            and (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) not in alive]


def free_dead_runs() -> tuple[list[str], list[str]]:
    """What killed Ray Train runs of this job still hold: remove their placement groups
    (`orphan_placement_groups`) and end their stale cleaner actors (`stale_cleaners`) that run on this
    node (the head, where Ray puts them and where the sweep driver runs; Ray offers no way to kill an
    actor by id without its handle, so this is a signal to its process). Returns the ids of both.
    Safe beside Ray Train's own cleaner: a group it removed meanwhile is skipped."""
    import signal

    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    context = ray.get_runtime_context()
    removed = []
    for pg_id in orphan_placement_groups(context.get_job_id()):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
        except Exception:  # noqa: BLE001 - removed meanwhile (by Ray Train's cleaner, where it works)
            continue
        removed.append(pg_id)
    ended = []
    for actor in stale_cleaners(context.get_job_id()):
        if actor["Address"]["NodeID"] == context.get_node_id() and actor["Pid"]:
            try:
                os.kill(actor["Pid"], signal.SIGTERM)
            except OSError:  # it exited meanwhile
                continue
            ended.append(actor["ActorID"])
    return removed, ended
