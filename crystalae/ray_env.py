"""The environment crystalae gives the Ray processes it starts (trial drivers, Train controllers, workers)."""
from __future__ import annotations

import os
import socket
from collections.abc import Iterable

__all__ = ["API_SERVER_ENV", "START_TIMEOUT_ENV", "free_local_port", "runtime_env"]

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
