"""Dataset preparation as Ray Data tasks: each task builds one shard with `build_shard`, on whichever
node Ray places it, so a cluster voxelizes a large source in parallel into the same bytes as a local run.

The output folder must be reachable from every node: object storage (s3://...) or a shared mount.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from crystalae.shards import ShardTask, build_shard

__all__ = ["check_ray_address", "on_ray"]

log = logging.getLogger(__name__)


def _build_row(row: dict[str, Any]) -> dict[str, Any]:
    import ray

    record = build_shard(row["task"])
    return {"index": row["task"].index, "record": json.dumps(record), "node": ray.util.get_node_ip_address()}


def on_ray(address: str = "auto") -> Callable[[list[ShardTask]], list[dict[str, Any]]]:
    """An executor for `crystalae.shards.prepare_dataset`: shard tasks built on the Ray cluster at
    `address`. The address is checked here, before preparation writes anything."""
    check_ray_address(address)
    return partial(_build_shards_on_ray, address=address)


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Refuse, in one line and within `timeout` seconds, a HOST:PORT (or ray://HOST:PORT) Ray address
    that nothing answers on; Ray itself retries for minutes. "auto", "local" and None pass through."""
    if address in (None, "", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"Ray address {address!r} is not HOST:PORT (or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as connection:
            speaks = _speaks_grpc(connection)
    except OSError as exc:
        raise ValueError(f"no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}); start one "
                         "with `ray start --head` or check --address") from None
    if not speaks:
        raise ValueError(f"no Ray cluster answers at {address} (something accepts connections there but does not "
                         "speak gRPC, as Ray does); check --address (Ray's GCS port, 6379 by default)")


def _speaks_grpc(connection: socket.socket) -> bool:
    """Whether the server answers an HTTP/2 client preface with a SETTINGS frame, as every gRPC server
    (Ray's GCS, the Ray client server) does first; a port that accepts and stays silent would make
    `ray.init` retry for minutes."""
    connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5))  # + empty SETTINGS
    header = b""
    while len(header) < 9:
        chunk = connection.recv(9 - len(header))
        if not chunk:
            break
        header += chunk
    return len(header) == 9 and header[3] == 4


def _build_shards_on_ray(tasks: list[ShardTask], address: str) -> list[dict[str, Any]]:
    """Build `tasks` as Ray Data tasks on the cluster at `address` ("auto", HOST:PORT, or "local" for a
    Ray started here); returns the shard records in task order and prints shards per node."""
    import ray

    if not tasks:
        return []
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=None if address == "local" else address, log_to_driver=False, configure_logging=False)
    started = time.perf_counter()
    try:
        # one block per shard, so Ray spreads shards over nodes rather than batching them in one task
        dataset = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=len(tasks))
        rows = dataset.map(_build_row, num_cpus=1).take_all()
    finally:
        if own_ray:  # a Ray the caller started stays up
            ray.shutdown()
    by_index = {row["index"]: json.loads(row["record"]) for row in rows}
    nodes = Counter(row["node"] for row in rows)
    log.info("built %d shards on %d node(s) in %.1f s: %s", len(rows), len(nodes), time.perf_counter() - started,
             ", ".join(f"{node} {count}" for node, count in sorted(nodes.items())))
    return [by_index[t.index] for t in tasks]
