import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Structure

from crystalae.config import VoxelConfig
from crystalae.dataset import DatasetError, read_manifest, read_table
from crystalae.decode import decode
from crystalae.metrics import compare
from crystalae.shards import PrepareOptions, prepare_dataset
from crystalae.voxelize import Density

CONFIG = VoxelConfig(grid=16)
OPTIONS = PrepareOptions(shard_size=10)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    prepare_dataset("demo:40", out, CONFIG, OPTIONS, workers=2)
    return out


def test_shards_round_trip_to_crystals(dataset):
    manifest = read_manifest(dataset)
    assert manifest["counts"]["rows"] == 40 and len(manifest["shards"]) == 4
    assert sum(manifest["counts"]["splits"].values()) == 40
    table = read_table(dataset)
    densities = table.column("density").combine_chunks().to_numpy_ndarray()
    labels = table.column("labels").combine_chunks().to_numpy_ndarray()
    assert densities.shape == (40, 16, 16, 16) and densities.dtype == np.float32 and labels.dtype == np.uint8
    for i in range(0, 40, 7):
        true = Structure.from_str(table.column("cif")[i].as_py(), fmt="cif")
        lattice = np.array(table.column("lattice")[i].as_py()).reshape(3, 3)
        density = Density(densities[i], labels[i], lattice, np.array(table.column("origin")[i].as_py()), CONFIG)
        assert compare(decode(density), true)["match"]


def test_shards_read_with_pandas_and_ray_data(dataset):
    frame = pd.read_parquet(dataset / "shards" / "shard-00000.parquet")
    assert list(frame.columns)[:3] == ["material_id", "rotation", "split"] and len(frame) == 10
    assert np.asarray(frame["density"].iloc[0]).reshape(-1).size == 16**3

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_parquet([str(p) for p in sorted((dataset / "shards").glob("*.parquet"))])
        batch = next(iter(ds.select_columns(["density", "labels"]).iter_torch_batches(batch_size=8)))
        assert tuple(batch["density"].shape) == (8, 16, 16, 16)
        assert ds.count() == 40
    finally:
        ray.shutdown()


def test_other_settings_are_refused(dataset):
    with pytest.raises(DatasetError, match="other settings"):
        prepare_dataset("demo:40", dataset, VoxelConfig(grid=12), OPTIONS, workers=1)


def test_a_folder_prepared_by_the_previous_version_is_reused(tmp_path, dataset):
    """prepare.json files written before `skipped` was recorded still match the same settings."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    plan = json.loads((old / "prepare.json").read_text())
    del plan["skipped"]
    (old / "prepare.json").write_text(json.dumps(plan))
    manifest = prepare_dataset("demo:40", old, CONFIG, OPTIONS, workers=1)
    assert manifest["dataset_hash"] == read_manifest(dataset)["dataset_hash"]


def _shard_hashes(folder: Path) -> dict:
    return {s["file"]: s["sha256"] for s in read_manifest(folder)["shards"]}


def test_killed_prepare_resumes_to_identical_shards(tmp_path, dataset):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "crystalae", "data", "prepare", "demo:40", "--out", str(out),
               "--grid", "16", "--shard-size", "10", "--workers", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "shards").glob("shard-*.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "shards").glob("shard-*.json")))
    assert 1 <= done_before < 4 and not (out / "manifest.json").exists()
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert _shard_hashes(out) == _shard_hashes(dataset)
    for name, digest in _shard_hashes(out).items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert not [p for p in out.rglob("*.tmp")]


def test_read_table_filters_a_split_without_its_column(dataset):
    counts = read_manifest(dataset)["counts"]["splits"]
    train = read_table(dataset, split="train", columns=["density"])
    assert train.column_names == ["density"] and train.num_rows == counts["train"]


def test_training_batches_come_without_a_not_writable_warning(dataset):
    """torch.from_numpy warns on Arrow's read-only buffers ("The given NumPy array is not writable")."""
    import warnings

    from crystalae.dataset import WorkerShare, table_batches

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = next(table_batches(read_table(dataset, split="train"), 4))
        shared = next(WorkerShare(dataset, 0, 1, 4, keep=False).batches(0))
    assert batch["density"].shape[1:] == (16, 16, 16) and shared["density"].shape[0] == 4
