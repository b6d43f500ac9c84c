"""Streamed sources: chunks read on their own give exactly the entries a whole read gives, and a
dataset built from chunks (locally or as Ray Data tasks on two nodes) has the same shard bytes."""
import csv
import re

import pytest

from crystalae.config import VoxelConfig
from crystalae.dataset import read_manifest
from crystalae.ray_shards import on_ray
from crystalae.shards import PrepareOptions, prepare_dataset
from crystalae.sources import list_entries, plan_chunks, read_chunk
from tests.test_sources import GOOD_CIF


def _fields(entries):
    return [(e.material_id, e.fmt, e.text, e.duplicate_of, e.error,
             e.structure.as_dict() if e.structure is not None else None) for e in entries]


@pytest.mark.parametrize("size", [1, 4, 7, 100])
@pytest.mark.parametrize("limit", [None, 30])
def test_chunks_read_on_their_own_equal_one_whole_read(mixed_sources, size, limit):
    whole = list_entries(mixed_sources, limit=limit)
    chunks, kept, listed = plan_chunks(mixed_sources, size, limit)
    assert listed == 24 + 3 + 9 and kept == len(whole) == (limit or listed)
    assert all(sum(piece.count for piece in chunk) == size for chunk in chunks[:-1])
    pieces = [item for chunk in chunks for item in read_chunk(chunk)]
    assert [k for k, _ in pieces] == list(range(kept))
    assert _fields([e for _, e in pieces]) == _fields(whole)
    duplicates = {whole[k].material_id: whole[k].duplicate_of for k in range(kept) if whole[k].duplicate_of is not None}
    assert duplicates == {"id-3": 3, "id-7": 7} if kept > 25 else duplicates == {"id-3": 3}


def test_a_csv_without_ids_numbers_its_rows(tmp_path):
    path = tmp_path / "plain.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["cif"], *[[GOOD_CIF]] * 5])
    chunks, _, _ = plan_chunks(str(path), 2)
    assert [e.material_id for chunk in chunks for _, e in read_chunk(chunk)] == ["0", "1", "2", "3", "4"]


def test_shards_do_not_depend_on_how_the_work_is_split(tmp_path, mixed_sources):
    config, options = VoxelConfig(representation="box", grid=8), PrepareOptions(shard_size=6)
    one = prepare_dataset(mixed_sources, tmp_path / "one", config, options, workers=1)
    two = prepare_dataset(mixed_sources, tmp_path / "two", config, options, workers=2)
    assert one["shards"] == two["shards"] and one["dataset_hash"] == two["dataset_hash"]
    assert one["counts"]["rejected"] == 6 + 2  # 6 garbage CIFs, 2 duplicate ids
    assert read_manifest(tmp_path / "one")["counts"]["splits"] == two["counts"]["splits"]


@pytest.mark.slow
def test_ray_data_prepare_on_two_nodes_gives_the_local_shards_and_resumes(tmp_path, mixed_sources):
    import os
    import subprocess
    import sys

    from raycluster import RAY_ENV, two_node_cluster

    args = ["data", "prepare", *mixed_sources, "--grid", "8", "--shard-size", "4"]
    local = subprocess.run([sys.executable, "-m", "crystalae", *args, "--out", str(tmp_path / "local"), "--workers", "1"],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    out = tmp_path / "on-ray"
    env = {**os.environ, **RAY_ENV}
    with two_node_cluster(cpus_per_node=4) as address:
        def on_ray():
            result = subprocess.run([sys.executable, "-m", "crystalae", *args, "--out", str(out), "--ray",
                                     "--address", address], env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-2000:]
            return result.stderr  # the progress line is a log record

        first = on_ray()
        assert re.search(r"built 9 shards on 2 node\(s\) in [0-9.]+ s: 127\.0\.0\.2 \d+, 127\.0\.0\.3 \d+", first), first
        expected = read_manifest(tmp_path / "local")
        assert read_manifest(out)["shards"] == expected["shards"]
        assert (out / "rejects.csv").read_bytes() == (tmp_path / "local" / "rejects.csv").read_bytes()
        # killed after most shards: two shard records and the manifest are missing; only those two are rebuilt
        for name in ("manifest.json", "shards/shard-00001.json", "shards/shard-00007.json"):
            (out / name).unlink()
        assert "built 2 shards" in on_ray()
    assert read_manifest(out)["dataset_hash"] == expected["dataset_hash"]


def test_prepare_on_a_ray_the_caller_started_leaves_it_running(tmp_path):
    import ray

    config, options = VoxelConfig(grid=8), PrepareOptions(shard_size=2)
    local = prepare_dataset("demo:4", tmp_path / "local", config, options, workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        built = prepare_dataset("demo:4", tmp_path / "ray", config, options, executor=on_ray("local"))
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert built["shards"] == local["shards"]


def test_overwrite_removes_the_dataset_not_what_else_is_in_its_folder(tmp_path):
    out = tmp_path / "ds"
    prepare_dataset("demo:4", out, VoxelConfig(grid=8), PrepareOptions(shard_size=2), workers=1)
    (out / "notes.txt").write_text("mine")
    manifest = prepare_dataset("demo:6", out, VoxelConfig(grid=8), PrepareOptions(shard_size=4), workers=1,
                               overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert manifest["counts"]["entries"] == 6
