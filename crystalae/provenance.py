"""What made an output: the model reference, the seed, and the versions of the packages that ran.

Every output file (reconstruct/roundtrip metrics, generate summaries, registry manifests) and every
checkpoint carries this record, so a figure can be traced to the code and model that produced it.
"""
from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

__all__ = ["provenance", "versions"]

PACKAGES = ("crystalae", "torch", "pymatgen", "ray", "optuna", "numpy")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages whose behaviour shapes results (None: not installed).
    Read from the package metadata, so nothing heavy is imported."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def provenance(model: str | None = None, seed: int | None = None, **more: Any) -> dict[str, Any]:
    """The record stored under "provenance": `model` (the reference it was given: a path, NAME@N,
    an alias), `seed` where randomness was used, the package versions, and any `more` fields."""
    record: dict[str, Any] = {}
    if model is not None:
        record["model"] = str(model)
    if seed is not None:
        record["seed"] = int(seed)
    return {**record, **more, "versions": versions()}
