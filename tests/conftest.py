"""Shared fixtures: tiny configs, demo structures, and small samples of the CDVAE datasets (tests/data)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"  # 40 rows each of perov_5 and carbon_24 (README.md there)


def data_csv(name: str) -> Path:
    """The in-repository sample of dataset `name` (tests/data/<name>.csv): rows of ../shared/datasets/<name>/val.csv."""
    return DATA / f"{name}.csv"


@pytest.fixture
def shipped_config_cwd(tmp_path, monkeypatch) -> Path:
    """A current folder from which the shipped sweep configs' data paths resolve without ../shared:
    search/configs/*.yaml name ../shared/datasets/<name>/{val,extra}.csv (relative to the repository
    root); here each of those is a copy of tests/data/<name>.csv. Returns the folder (the test's cwd)."""
    import shutil

    for csv in DATA.glob("*.csv"):
        folder = tmp_path / "shared" / "datasets" / csv.stem
        folder.mkdir(parents=True)
        for part in ("val.csv", "extra.csv"):
            shutil.copyfile(csv, folder / part)
    cwd = tmp_path / "main"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def generated(rc: int, out: str | Path, count: int) -> dict:
    """summary.json of a `generate` run into `out` that made `count` crystals, checked against what it wrote
    and its exit code: a CIF per decoded crystal, 0 only when at least one decoded, 1 when none did (a run
    that made nothing does not succeed). Returns the summary."""
    import json

    summary = json.loads((Path(out) / "summary.json").read_text())
    assert summary["count"] == count, summary
    cifs = [p for p in Path(out).glob("*.cif") if not p.name.endswith(".sym.cif")]
    assert len(cifs) == summary["decoded"], (sorted(p.name for p in cifs), summary["decoded"])
    assert rc == (0 if summary["decoded"] else 1), (rc, summary["decoded"])
    return summary


@pytest.fixture(scope="session")
def perov_sample():
    return _sample("perov_5", 40)


@pytest.fixture(scope="session")
def carbon_sample():
    return _sample("carbon_24", 40)


def _sample(name: str, count: int):
    from crystalae.sources import list_entries, load_structure

    entries = list_entries(data_csv(name))
    step = max(1, len(entries) // count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(e.material_id, load_structure(e)) for e in entries[::step][:count]]


@pytest.fixture(scope="session")
def demo_set():
    from crystalae.demo import demo_structures

    return demo_structures(24)


TINY_SWEEP = """
name: tiny
data: {source: demo:36, grid: 8, val_fraction: 0.25}
search_space:
  latent_dim: {type: categorical, values: [4, 8]}
  sigma: {type: categorical, values: [0.5, 0.6]}
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
objective:                      # two objectives: the dashboard's Pareto front and promote --within
  - {metric: val_score, mode: max}
  - {metric: parameters, mode: min}
budget: {trials: 3, epochs: 2}
max_concurrent: 2
search: {grace_period: 1, seed: 0}
train: {batch_size: 8, eval_limit: 4}
model: {depth: 1, base_width: 4, max_width: 8, seg_depth: 1, seg_width: 4, residual: false}
"""


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """A tiny real sweep (3 trials, 8^3 grid) plus a registry whose best checkpoint is `champion`.

    Returns {"storage", "root" (the sweep folder), "registry", "config" (its YAML path), "summary",
    "mlflow" (the tracking URI its trials were logged to)}.
    """
    import ray

    from crystalae.registry import Registry
    from crystalae.search.config import load_sweep_config
    from crystalae.search.layout import sweep_dir
    from crystalae.search.promote import promote_trial
    from crystalae.search.sweep import run_sweep

    base = tmp_path_factory.mktemp("sweep")
    config = base / "tiny.yaml"
    # its trials also go to MLflow (tracking section), when the tracking extra is installed
    from crystalae.extras import available

    config.write_text(TINY_SWEEP + (f"tracking: {{mlflow: 'sqlite:///{base}/mlflow.db'}}\n" if available("mlflow") else ""))
    storage = base / "sweeps"
    try:
        summary = run_sweep(load_sweep_config(config), storage=storage)
    finally:
        ray.shutdown()
    root = sweep_dir(storage, "tiny")
    promote_trial(root, Registry(base / "registry"), alias="champion")
    return {"storage": storage, "root": root, "registry": base / "registry", "config": config, "summary": summary,
            "mlflow": f"sqlite:///{base}/mlflow.db"}


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a loopback port, shared by the session (skipped when moto[server] is missing)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install 'moto[server]>=5'")
    pytest.importorskip("boto3", reason="boto3 (installed with moto) is missing")
    from s3server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback server as "s3://<name>"; the AWS_* variables point at the server for this test."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):  # a developer's own credentials must not leak into the tests
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return f"s3://{s3_server.create_bucket()}"


@pytest.fixture
def mixed_sources(tmp_path):
    """Three sources read as one: a CSV whose CIF fields span many lines (one id holds a quote and a
    comma; every fourth CIF is garbage), a folder, and the demo set; ids repeat across parts."""
    import csv

    from tests.test_sources import BAD_ROWS, GOOD_CIF

    path = tmp_path / "mixed.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "material_id", "cif", "note"])
        for k in range(23):
            writer.writerow([k, f'id-{k}, "q"' if k == 5 else f"id-{k}", GOOD_CIF if k % 4 else BAD_ROWS["garbage"][0],
                             "é"])
        writer.writerow([99, "id-3", GOOD_CIF, ""])  # duplicate within the CSV
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a", "id-7", "b"):  # id-7 repeats a CSV id
        (folder / f"{name}.cif").write_text(GOOD_CIF)
    return [str(path), str(folder), "demo:9"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained 8^3 model saved as a normal checkpoint folder (no training needed to test I/O)."""
    import torch

    from crystalae.checkpoint import save_checkpoint
    from crystalae.config import VoxelConfig
    from crystalae.models import CrystalAE, ModelConfig

    torch.manual_seed(0)
    model = CrystalAE(ModelConfig(grid=8, latent_dim=4, depth=1, base_width=4, max_width=8, seg_depth=1,
                                  seg_width=4, residual=False, species=(11, 17), n_classes=3, site_width=8))
    folder = tmp_path_factory.mktemp("ckpt") / "tinymodel"
    save_checkpoint(folder, model, VoxelConfig(grid=8), epoch=0, metrics={"val_score": 0.0},
                    train_config={}, dataset_hash="test")
    return folder
