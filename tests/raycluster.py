"""A multi-node Ray cluster on this machine (a head on 127.0.0.2, worker nodes on 127.0.0.3, .4, ...), for
tests that must show work spread over nodes, nodes lost and nodes joining. Only this cluster's processes
are stopped afterwards."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY_ENV = {"RAY_AUTH_MODE": "token"}  # what `ray start` sets up; clients need the same mode
# A node whose raylet stops answering is declared dead after period x threshold (Ray's defaults: 3 s x 5,
# plus a 10 s timeout per check); 1 s x 3 keeps a node-loss test short.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}
LIMITS = ["--memory=2000000000", "--object-store-memory=200000000"]  # else each node claims half the RAM


def marked_line(stdout: str, marker: str) -> str:
    """The rest of the last line of `stdout` that starts with `marker` (AssertionError naming the output if
    none does): a client's answer among whatever lines Ray itself prints."""
    found = [line[len(marker):].strip() for line in stdout.splitlines() if line.startswith(marker)]
    assert found, f"no {marker!r} line in: {stdout[-2000:]!r}"
    return found[-1]


class LocalCluster:
    """Ray nodes started with `ray start` as docs/cluster.md shows, sharing one temp dir (so one place to
    find and stop their processes). `env` goes to every node's processes (e.g. the S3 endpoint);
    `head_args` are more `ray start --head` options (e.g. an autoscaling config), `port` the head's (default:
    a free one)."""

    def __init__(self, head_cpus: int, dashboard: bool = False, env: dict[str, str] | None = None,
                 head_args: tuple[str, ...] = (), port: int | None = None):
        self.ray_bin = str(Path(sys.executable).parent / "ray")
        self.env = {**os.environ, **RAY_ENV, **FAST_NODE_DEATH, **(env or {})}
        self.temp_dir = Path(tempfile.mkdtemp(prefix="crae-", dir="/tmp"))  # short: Unix socket paths are capped
        port = port or free_port()
        self.address = f"127.0.0.2:{port}"
        self.nodes: list[str] = []
        self.dashboard_port = free_port() if dashboard else None
        dash = ["--include-dashboard=true", "--dashboard-host=127.0.0.2", f"--dashboard-port={self.dashboard_port}"] \
            if dashboard else ["--include-dashboard=false"]
        try:
            self._start(["--head", f"--port={port}", "--node-ip-address=127.0.0.2", f"--temp-dir={self.temp_dir}",
                         f"--num-cpus={head_cpus}", *dash, *head_args], "127.0.0.2")
        except BaseException:
            self.stop()  # a head that started half-way
            raise

    def _start(self, args: list[str], ip: str) -> None:
        try:
            # minutes, not seconds: `ray start` took over 120 s here while other test runs loaded the 2 cores
            subprocess.run([self.ray_bin, "start", *args, *LIMITS], env=self.env, check=True, capture_output=True,
                           timeout=300)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"ray start {ip} failed:\n{error.stderr.decode()[-2000:]}") from error
        self.nodes.append(ip)

    def add_node(self, ip: str, cpus: int) -> None:
        """A worker node on `ip` (127.0.0.x, not 127.0.0.1, which Ray rewrites to the host's address)."""
        self._start([f"--address={self.address}", f"--node-ip-address={ip}", f"--num-cpus={cpus}"], ip)

    def kill_raylet(self, ip: str) -> None:
        """SIGKILL the raylet of the node on `ip`, as when a spot instance is reclaimed: its workers exit,
        and the head declares the node dead a few seconds later."""
        pids = self._pids(lambda cmd: b"/raylet/raylet" in cmd and f"--node_ip_address={ip}".encode() in cmd)
        assert pids, f"no raylet of {ip} under {self.temp_dir}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.nodes.remove(ip)

    def alive_nodes(self) -> int:
        """How many live nodes the head counts (from a short-lived client process)."""
        code = (f"import ray; ray.init(address={self.address!r}, log_to_driver=False); "
                "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        # Ray may print its own lines too (e.g. "raylet has lagging heartbeats" about the node just killed)
        return int(marked_line(out.stdout, "alive nodes:"))

    def wait_for_nodes(self, alive: int, timeout: float = 60) -> None:
        """Wait until the head counts `alive` live nodes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() == alive:
                return
            time.sleep(1)
        raise TimeoutError(f"cluster {self.address} did not reach {alive} live nodes")

    def _pids(self, match) -> list[int]:
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                cmd = cmdline.read_bytes()
            except OSError:
                continue
            if str(self.temp_dir).encode() in cmd and match(cmd):
                pids.append(int(cmdline.parent.name))
        return pids

    def stop(self) -> None:
        """Stop only this cluster's Ray processes (`ray stop` would also stop other Ray users here)."""
        for pid in self._pids(lambda cmd: True):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextmanager
def local_cluster(head_cpus: int, workers: dict[str, int], dashboard: bool = False,
                  env: dict[str, str] | None = None, head_args: tuple[str, ...] = ()) -> Iterator[LocalCluster]:
    """A `LocalCluster` with worker nodes `{ip: cpus}`, stopped on exit."""
    cluster = LocalCluster(head_cpus, dashboard, env, head_args)
    try:
        for ip, cpus in workers.items():
            cluster.add_node(ip, cpus)
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def two_node_cluster(cpus_per_node: int = 5, nodes: int = 2) -> Iterator[str]:
    """Start a head on 127.0.0.2 and a worker node on 127.0.0.3 (`nodes=1`: the head only); yields
    the head's HOST:PORT."""
    with local_cluster(cpus_per_node, {"127.0.0.3": cpus_per_node} if nodes > 1 else {}) as cluster:
        yield cluster.address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
