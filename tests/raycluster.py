"""A two-node Ray cluster on this machine (nodes on 127.0.0.2 and 127.0.0.3), for tests that must
show work spread over nodes. Only this cluster's processes are stopped afterwards."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY_ENV = {"RAY_AUTH_MODE": "token"}  # what `ray start` sets up; clients need the same mode


@contextmanager
def two_node_cluster(cpus_per_node: int = 5, nodes: int = 2) -> Iterator[str]:
    """Start a head on 127.0.0.2 and a worker node on 127.0.0.3 (`nodes=1`: the head only); yields
    the head's HOST:PORT."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, **RAY_ENV}
    temp_dir = Path(tempfile.mkdtemp(prefix="crae-", dir="/tmp"))  # short: Unix socket paths are capped
    port = free_port()
    limits = [f"--num-cpus={cpus_per_node}", "--memory=2000000000", "--object-store-memory=200000000"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.2",
                        "--include-dashboard=false", f"--temp-dir={temp_dir}", *limits],
                       env=env, check=True, capture_output=True, timeout=120)
        if nodes > 1:
            subprocess.run([ray_bin, "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3", *limits],
                           env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.2:{port}"
    finally:
        _stop_ray_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_ray_under(temp_dir: Path) -> None:
    """Stop only this cluster's Ray processes (`ray stop` would also stop other Ray users here)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(temp_dir).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
