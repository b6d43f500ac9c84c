"""The environment crystalae gives the Ray processes it starts (trial drivers, Train controllers, workers)."""
from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["START_TIMEOUT_ENV", "runtime_env"]

# Ray Train gives a worker group 60 s to start. On a busy small machine a start takes longer (70 s was
# measured on 2 shared cores), and a sweep whose starts timed out hung with its CPUs held by
# placement groups. Ten minutes, unless the user set it. This is not the whole cure: a sweep on a
# loaded machine also hung once with this setting (see the issue notes).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_S = "600"


def runtime_env(passed: Iterable[str] = ()) -> dict:
    """`ray.init(runtime_env=...)`: the worker-group start timeout (the user's value if set), and the
    variables named in `passed` that are set here."""
    env = {START_TIMEOUT_ENV: os.environ.get(START_TIMEOUT_ENV, START_TIMEOUT_S)}
    env.update({k: os.environ[k] for k in passed if k in os.environ})
    return {"env_vars": env}
