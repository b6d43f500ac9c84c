"""The field's reconstruction metric: pymatgen StructureMatcher(stol=0.5, ltol=0.3, angle_tol=10),
as in CDVAE, plus composition and atom-count agreement."""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

import numpy as np
from pymatgen.core import Structure

from crystalae.validity import smact_valid, structure_valid

__all__ = ["compare", "reconstruction_score", "recovery", "site_confusion", "structure_matcher", "summarize"]

MATCHER_SETTINGS = {"stol": 0.5, "ltol": 0.3, "angle_tol": 10}


@lru_cache(maxsize=1)
def structure_matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**MATCHER_SETTINGS)


def compare(predicted: Structure | None, true: Structure) -> dict[str, Any]:
    """Match flag, RMS displacement (normalised by (V/n)^(1/3), as pymatgen/CDVAE) and agreement."""
    if predicted is None:
        return {"match": False, "rms": None, "composition_ok": False, "count_ok": False, "recovery": 0.0,
                "valid_match": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rms = structure_matcher().get_rms_dist(predicted, true)
    smact = smact_valid(predicted.composition) if rms is not None else False
    return {
        "match": rms is not None,
        # CDVAE's protocol: a match counts only when the reconstruction is valid (None without SMACT)
        "valid_match": None if smact is None else bool(rms is not None and smact and structure_valid(predicted)),
        "rms": None if rms is None else float(rms[0]),
        "composition_ok": predicted.composition == true.composition,
        "count_ok": len(predicted) == len(true),
        "recovery": recovery(predicted, true),
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates over all records (a failed decode counts as a miss); mean RMS over matches."""
    n = len(records)
    if n == 0:
        return {"n": 0, "match_rate": None, "mean_rms": None, "composition_accuracy": None,
                "atom_count_accuracy": None, "mean_recovery": None, "valid_match_rate": None}
    rms = [r["rms"] for r in records if r["match"]]
    return {
        "n": n,
        "match_rate": sum(r["match"] for r in records) / n,
        "mean_rms": float(np.mean(rms)) if rms else None,
        "composition_accuracy": sum(r["composition_ok"] for r in records) / n,
        "atom_count_accuracy": sum(r["count_ok"] for r in records) / n,
        "mean_recovery": float(np.mean([r.get("recovery") or 0.0 for r in records])),
        "valid_match_rate": None if any(r.get("valid_match") is None for r in records)
        else sum(bool(r["valid_match"]) for r in records) / n,
    }


def reconstruction_score(match_rate: float | None, species_accuracy: float | None,
                         atom_count_rate: float | None) -> float:
    """One number to rank models across sigma, grid and architecture: the match rate, with species and
    atom-count accuracy as tie-breakers worth at most 0.001 together, so one more match out of up to
    1,000 crystals always ranks higher (missing values count as 0)."""
    return float((match_rate or 0.0) + 0.0005 * ((species_accuracy or 0.0) + (atom_count_rate or 0.0)))


def _distances_in_true_cell(predicted: Structure, true: Structure) -> np.ndarray:
    """(true, predicted) periodic distances in Å, both read as fractional coordinates of the true lattice."""
    d = true.frac_coords[:, None, :] - predicted.frac_coords[None, :, :]
    d -= np.round(d)
    return np.linalg.norm(d @ true.lattice.matrix, axis=-1)


def recovery(predicted: Structure | None, true: Structure, tolerance: float = 0.5) -> float:
    """A continuous reconstruction score in [0, 1]: the share of atoms recovered, times a lattice term.

    Atoms: each true atom counts when the decoded atom nearest to it (in fractional coordinates of
    the true lattice, as `site_confusion`) lies within `tolerance` Å and has its species, each decoded
    atom used once; divided by max(true, decoded) atoms, so extra atoms cost as much as missing ones.
    Lattice: 1 / (1 + (e_len / ltol)^2 + (e_ang / angle_tol)^2) with the largest relative length error
    and the largest angle error (degrees), so it is 1/2 at the matcher's own tolerances.

    Unlike the match rate, which stays 0 until a decoder gets every atom right, this rises from the
    first epoch as positions, species and cells improve, so it ranks trials early (a sweep objective).
    """
    if predicted is None or len(predicted) == 0 or len(true) == 0:
        return 0.0
    dist = _distances_in_true_cell(predicted, true)
    same = np.array([site.specie.Z for site in true])[:, None] == np.array([site.specie.Z for site in predicted])[None, :]
    dist = np.where(same, dist, np.inf)
    used, found = set(), 0
    for i in np.argsort(dist.min(axis=1)):  # closest pairs first
        for j in np.argsort(dist[i]):
            if dist[i, j] >= tolerance:
                break
            if j not in used:
                used.add(int(j))
                found += 1
                break
    atoms = found / max(len(true), len(predicted))
    a, b = np.array(true.lattice.abc), np.array(predicted.lattice.abc)
    len_err = float(np.max(np.abs(b - a) / a))
    ang_err = float(np.max(np.abs(np.array(predicted.lattice.angles) - np.array(true.lattice.angles))))
    lattice = 1.0 / (1.0 + (len_err / MATCHER_SETTINGS["ltol"]) ** 2 + (ang_err / MATCHER_SETTINGS["angle_tol"]) ** 2)
    return float(atoms * lattice)


def site_confusion(predicted: Structure | None, true: Structure, species: tuple[int, ...],
                   tolerance: float = 0.5) -> np.ndarray:
    """(len(species) + 1)^2 counts of true atom species (rows) against the species of the decoded atom
    within `tolerance` Å of it (columns; column 0 = no decoded atom there). Positions are compared in
    fractional coordinates of the true lattice, so a slightly wrong predicted lattice is not penalised."""
    index = {z: k + 1 for k, z in enumerate(species)}
    counts = np.zeros((len(species) + 1, len(species) + 1), dtype=np.int64)
    rows = [index.get(site.specie.Z, 0) for site in true]
    if predicted is None or len(predicted) == 0:
        np.add.at(counts, (rows, 0), 1)
        return counts
    dist = _distances_in_true_cell(predicted, true)
    nearest = dist.argmin(axis=1)
    for row, j, ok in zip(rows, nearest, dist[np.arange(len(true)), nearest] < tolerance):
        counts[row, index.get(predicted[int(j)].specie.Z, 0) if ok else 0] += 1
    return counts
