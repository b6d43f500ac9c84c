"""Symmetry snapping of decoded crystals (spglib through pymatgen's `SpacegroupAnalyzer`).

A decoded crystal carries position and lattice errors of a few tenths of an Å and a few degrees; real
crystals are mostly symmetric. Snapping finds the space group the decoded crystal has within `symprec`
Å and returns the ideal crystal of that group: atoms on their Wyckoff positions, lattice lengths and
angles as the group requires. On carbon_24 test reconstructions this raises the match rate (docs/results.md);
it is reported beside the raw decode, never in its place, and a model stores the tolerance chosen on
its validation split (`bench/symmetry.py --update`).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

if TYPE_CHECKING:
    from crystalae.checkpoint import LoadedModel

__all__ = ["crystal_system", "decoding_symprec", "set_symprec", "spacegroup", "symmetrize"]

ANGLE_TOLERANCE = 5.0  # degrees, spglib's tolerance on lattice angles (pymatgen's default)


def symmetrize(structure: Structure, symprec: float, angle_tolerance: float = ANGLE_TOLERANCE) -> Structure:
    """The ideal crystal of the space group `structure` has within `symprec` Å (its conventional cell).

    Returns `structure` unchanged where spglib finds no symmetry operation or fails: snapping never
    loses a decoded crystal. Raises ValueError for a tolerance that is not positive.
    """
    if not symprec > 0:
        raise ValueError(f"symprec must be a positive length in Å, got {symprec}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spglib prints and warns for cells it cannot refine
        try:
            return SpacegroupAnalyzer(structure, symprec=symprec, angle_tolerance=angle_tolerance).get_refined_structure()
        except Exception:  # noqa: BLE001  (spglib's failures are not typed: keep the crystal as decoded)
            return structure


def spacegroup(structure: Structure, symprec: float = 0.1) -> tuple[str, int] | None:
    """(international symbol, number) of `structure` within `symprec` Å; None where spglib fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
            return analyzer.get_space_group_symbol(), int(analyzer.get_space_group_number())
        except Exception:  # noqa: BLE001
            return None


def crystal_system(structure: Structure, symprec: float = 0.1) -> str:
    """"cubic", "hexagonal", ..., "triclinic" within `symprec` Å ("unknown" where spglib fails)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return SpacegroupAnalyzer(structure, symprec=symprec).get_crystal_system()
        except Exception:  # noqa: BLE001
            return "unknown"


def set_symprec(loaded: LoadedModel, symprec: float | None) -> LoadedModel:
    """`loaded` decoding every crystal (reconstructed or sampled) with this snapping tolerance from now
    on (Å; 0: the raw decode; None: keep the model's own settings). Raises ValueError for a negative or
    non-finite tolerance."""
    if symprec is not None:
        if not 0 <= symprec < float("inf"):
            raise ValueError(f"symprec {symprec}: give a tolerance in Å, or 0 for the raw decode")
        loaded.meta["decoding"] = {**(loaded.meta.get("decoding") or {}), "user_symprec": symprec or None}
    return loaded


def decoding_symprec(loaded: LoadedModel, reconstructing: bool) -> float | None:
    """The snapping tolerance for what `loaded` decodes: the user's (`set_symprec`), else for a
    reconstruction the model's own (`decoding.symprec`, chosen on its validation split by
    `bench/symmetry.py`), and for samples none: on carbon_24 snapping at 0.5 Å raised reconstruction
    from 61.5% to 68.4% but lowered the samples' COV-P from 61.6% to 53.0% (docs/results.md)."""
    decoding = loaded.meta.get("decoding") or {}
    if "user_symprec" in decoding:
        return decoding["user_symprec"]
    return decoding.get("symprec") if reconstructing else None
