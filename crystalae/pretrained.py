"""Shipped reference models: `pretrained/<name>/` in the repository, installed as the package data
`crystalae/_pretrained/<name>/`; each a normal checkpoint folder plus its model card (`README.md`), the
recipe that trained it (`recipe.yaml`) and its measured figures (`RESULTS.json`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["PRETRAINED", "pretrained_models"]

_INSTALLED = Path(__file__).resolve().parent / "_pretrained"  # a wheel install
PRETRAINED = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parents[1] / "pretrained"


def pretrained_models(root: Path = PRETRAINED) -> list[dict[str, Any]]:
    """Name, folder, recorded test figures and lineage (the sweep and trial a model was retrained from, with
    its dataset hash; empty for a hand-tuned model) of every shipped model (empty outside a checkout)."""
    models = []
    for file in sorted(root.glob("*/checkpoint.pt")):
        results = file.parent / "RESULTS.json"
        figures = json.loads(results.read_text()) if results.exists() else {}
        models.append({"name": file.parent.name, "path": file.parent,
                       "test": {k[5:]: v for k, v in figures.items() if k.startswith("test_") and isinstance(v, float)},
                       "lineage": figures.get("lineage") or {}, "dataset_hash": figures.get("dataset_hash")})
    return models
