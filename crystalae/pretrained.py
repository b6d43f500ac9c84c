"""Shipped reference models: `pretrained/<name>/` in the repository, installed as the package data
`crystalae/_pretrained/<name>/`; each a normal checkpoint folder plus its model card (`README.md`), the
recipe that trained it (`recipe.yaml`) and its measured figures (`RESULTS.json`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["PRETRAINED", "default_decoding_figures", "pretrained_models"]

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
                       "default_decoding": default_decoding_figures(figures),
                       "lineage": figures.get("lineage") or {}, "dataset_hash": figures.get("dataset_hash")})
    return models


def default_decoding_figures(results: dict[str, Any]) -> dict[str, Any] | None:
    """Test match rate and RMS of a shipped model as it decodes by default, where that is not its heads'
    raw decode (`test_*`): with its count choice (`bench/count_choice.py`) and/or symmetry snapping
    (`bench/symmetry.py`), as its RESULTS.json records them; None for a raw-decoding model."""
    chosen = (results.get("count_choice") or {}).get("test_chosen")
    snapped = results.get("symmetrized") or {}
    if chosen:
        prefix = "symmetrized_" if chosen.get("symmetrized_match_rate") is not None else ""
        how = "atom count by density fit" + (f", snapped at {snapped.get('chosen_symprec')} Å" if prefix else "")
        return {"match_rate": chosen[prefix + "match_rate"], "rms": chosen[prefix + "rms"], "decoding": how}
    if snapped.get("test_symmetrized_match_rate") is not None:
        return {"match_rate": snapped["test_symmetrized_match_rate"], "rms": snapped["test_symmetrized_rms"],
                "decoding": f"snapped at {snapped['chosen_symprec']} Å"}
    return None
