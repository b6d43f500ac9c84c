"""The field's reconstruction metric: pymatgen StructureMatcher(stol=0.5, ltol=0.3, angle_tol=10),
as in CDVAE, plus composition and atom-count agreement."""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

import numpy as np
from pymatgen.core import Structure

MATCHER_SETTINGS = {"stol": 0.5, "ltol": 0.3, "angle_tol": 10}


@lru_cache(maxsize=1)
def structure_matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**MATCHER_SETTINGS)


def compare(predicted: Structure | None, true: Structure) -> dict[str, Any]:
    """Match flag, RMS displacement (normalised by (V/n)^(1/3), as pymatgen/CDVAE) and agreement."""
    if predicted is None:
        return {"match": False, "rms": None, "composition_ok": False, "count_ok": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rms = structure_matcher().get_rms_dist(predicted, true)
    return {
        "match": rms is not None,
        "rms": None if rms is None else float(rms[0]),
        "composition_ok": predicted.composition == true.composition,
        "count_ok": len(predicted) == len(true),
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates over all records (a failed decode counts as a miss); mean RMS over matches."""
    n = len(records)
    if n == 0:
        return {"n": 0, "match_rate": None, "mean_rms": None, "composition_accuracy": None,
                "atom_count_accuracy": None}
    rms = [r["rms"] for r in records if r["match"]]
    return {
        "n": n,
        "match_rate": sum(r["match"] for r in records) / n,
        "mean_rms": float(np.mean(rms)) if rms else None,
        "composition_accuracy": sum(r["composition_ok"] for r in records) / n,
        "atom_count_accuracy": sum(r["count_ok"] for r in records) / n,
    }
