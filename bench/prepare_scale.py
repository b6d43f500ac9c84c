"""Dataset preparation at scale: memory of a streamed prepare, and Ray Data prepare across nodes.

    python bench/prepare_scale.py memory --sizes 1000 10000 100000 --grid 8
    python bench/prepare_scale.py ray --source demo:2000 --grid 16

`memory`: each size is prepared by `crystalae data prepare` in a subprocess while /proc is sampled; the
peak resident memory of the whole process tree (driver + voxelizer workers) is reported next to a
baseline measured in the same run: the same process reading the whole source into memory first
(`list_entries`), as prepare did before sources were streamed.

`ray`: the same source is prepared locally by one process (the serial baseline), then as Ray Data
tasks on a local cluster of 1 and of 2 nodes (1 CPU each, on 127.0.0.2/.3). It reports structures/s,
tasks per node, the parallel efficiency (of the whole command and of the Ray Data stage alone), the
serial fraction f from Amdahl's law (f = (N/S - 1) / (N - 1) for speed-up S on N nodes) and the
speed-up f predicts for larger clusters; and, as an optimistic bound, f taken as the measured share of
the 1-node run spent outside the Ray stage (start-up, listing the source, the manifest). This machine
has two cores shared by both nodes, Ray's own processes and the driver, so two nodes is as far as a
measurement goes and its f is pessimistic.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from report import ROOT, report  # bench/report.py (scripts run from bench/)

sys.path.insert(0, str(ROOT / "tests"))


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        p = int(status.parent.name)
        children.setdefault(int(fields["PPid"]), []).append(p)
        rss[p] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def run_sampled(command: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(seconds, peak resident bytes of the process tree, stdout) of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{command} failed:\n{out[-2000:]}")
    return time.perf_counter() - started, peak, out


WHOLE_READ = """
import sys, time
from crystalae.sources import list_entries
entries = list_entries(sys.argv[1])
print(len(entries))
"""


def bench_memory(args) -> dict:
    figures = {"grid": args.grid, "shard_size": args.shard_size, "workers": args.workers}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, peak, _ = run_sampled([sys.executable, "-m", "crystalae", "data", "prepare", f"demo:{size}",
                                            "--out", str(Path(tmp) / "ds"), "--grid", str(args.grid),
                                            "--shard-size", str(args.shard_size), "--workers", str(args.workers)])
        _, whole, _ = run_sampled([sys.executable, "-c", WHOLE_READ, f"demo:{size}"])
        figures[f"demo:{size}"] = {"seconds": round(seconds, 1), "structures_per_s": round(size / seconds, 1),
                                   "streamed_prepare_peak_mib": round(peak / 2**20),
                                   "baseline_whole_read_peak_mib": round(whole / 2**20),
                                   "ratio_streamed_to_whole_read": round(peak / whole, 3)}
        print(f"demo:{size}: {figures[f'demo:{size}']}", flush=True)
    return figures


def _prepare(args, out: Path, extra: list[str], env=None) -> tuple[float, str]:
    seconds, _, stdout = run_sampled([sys.executable, "-m", "crystalae", "data", "prepare", args.source, "--out",
                                      str(out), "--grid", str(args.grid), "--shard-size", str(args.shard_size), *extra],
                                     env=env)
    return seconds, stdout


def _ray_line(stdout: str) -> tuple[float, dict[str, int]]:
    """(seconds in the Ray Data stage, shards per node) from `built N shards on K node(s) in S s: ...`."""
    line = next(line for line in stdout.splitlines() if line.startswith("built "))
    head, _, nodes = line.partition(": ")
    counts = Counter()
    for part in nodes.split(", "):
        node, count = part.rsplit(" ", 1)
        counts[node] = int(count)
    return float(head.rsplit(" in ", 1)[1].removesuffix(" s")), dict(counts)


def _amdahl(serial_fraction: float) -> dict[int, float]:
    return {n: round(1 / (serial_fraction + (1 - serial_fraction) / n), 2) for n in (4, 8, 16, 64)}


def bench_ray(args) -> dict:
    from raycluster import RAY_ENV, two_node_cluster  # tests/raycluster.py: nodes on 127.0.0.2/.3

    from crystalae.dataset import read_manifest
    from crystalae.sources import plan_chunks

    count = plan_chunks(args.source, None)[1]
    env = {**os.environ, **RAY_ENV}
    figures = {"source": args.source, "structures": count, "grid": args.grid, "shard_size": args.shard_size}
    with tempfile.TemporaryDirectory() as tmp:
        serial, _ = _prepare(args, Path(tmp) / "serial", ["--workers", "1"])
        figures["serial_structures_per_s"] = round(count / serial, 1)
        hashes = read_manifest(Path(tmp) / "serial")["dataset_hash"]
        for nodes in (1, 2):
            with two_node_cluster(cpus_per_node=1, nodes=nodes) as address:
                out = Path(tmp) / f"ray{nodes}"
                seconds, stdout = _prepare(args, out, ["--ray", "--address", address], env=env)
            same = read_manifest(out)["dataset_hash"] == hashes
            stage, per_node = _ray_line(stdout)
            figures[f"ray_{nodes}_node"] = {
                "seconds": round(seconds, 1), "ray_stage_seconds": stage, "structures_per_s": round(count / seconds, 1),
                "stage_structures_per_s_per_node": round(count / stage / nodes, 1),
                "tasks_per_node": per_node, "same_shards_as_serial": same}
            print(f"{nodes} node(s): {figures[f'ray_{nodes}_node']}", flush=True)
    one, two = figures["ray_1_node"], figures["ray_2_node"]
    speedup = one["seconds"] / two["seconds"]
    stage_speedup = one["ray_stage_seconds"] / two["ray_stage_seconds"]
    # Amdahl on the whole command: f = (N/S - 1) / (N - 1); and the fixed part measured directly
    serial_fraction = min(1.0, max(0.0, 2 / speedup - 1))
    figures.update({
        "speedup_2_nodes": round(speedup, 3), "parallel_efficiency_2_nodes": round(speedup / 2, 3),
        "ray_stage_speedup_2_nodes": round(stage_speedup, 3),
        "ray_stage_parallel_efficiency_2_nodes": round(stage_speedup / 2, 3),
        "fixed_seconds_outside_ray_stage": round(one["seconds"] - one["ray_stage_seconds"], 1),
        "serial_fraction": round(serial_fraction, 3),
        "predicted_speedup": _amdahl(serial_fraction),
        # on separate machines only the part outside the Ray stage stays serial (an optimistic bound)
        "serial_fraction_fixed_part": round(fixed_fraction := (one["seconds"] - one["ray_stage_seconds"]) / one["seconds"], 3),
        "predicted_speedup_fixed_part": _amdahl(fixed_fraction),
    })
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("memory", "ray"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--source", default="demo:2000")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON (e.g. bench/results/prepare_memory.json)")
    args = parser.parse_args()
    report(bench_memory(args) if args.what == "memory" else bench_ray(args), args.out)


if __name__ == "__main__":
    main()
