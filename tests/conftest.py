"""Shared fixtures: tiny configs, demo structures, and small samples of the shared datasets."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_csv(name: str) -> Path:
    path = SHARED / name / "val.csv"
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def perov_sample():
    return _sample("perov_5", 40)


@pytest.fixture(scope="session")
def carbon_sample():
    return _sample("carbon_24", 40)


def _sample(name: str, count: int):
    from crystalae.sources import list_entries, load_structure

    entries = list_entries(shared_csv(name))
    step = max(1, len(entries) // count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(e.material_id, load_structure(e)) for e in entries[::step][:count]]


@pytest.fixture(scope="session")
def demo_set():
    from crystalae.demo import demo_structures

    return demo_structures(24)
