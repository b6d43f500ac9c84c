"""Validity as the field computes it: structural, and composition by CDVAE's `smact_validity` (SMACT).

A composition is valid when some assignment of SMACT's oxidation states to its elements is charge
neutral at the composition's own (gcd-reduced) ratios and passes the Pauling electronegativity test
(cations less electronegative than anions); a single element, or only metals (an alloy), is valid as
it is. pymatgen's `oxi_state_guesses`, which crystalae reported before, is stricter: real perov_5
crystals pass SMACT 98% and it 88%.

SMACT is an optional dependency (`pip install crystalae[metrics]`); without it the SMACT figure is
None, never a guess.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from math import gcd

from pymatgen.core import Composition

from crystalae.extras import available

__all__ = ["smact_valid", "structure_valid"]


def structure_valid(structure, min_distance: float = 0.5) -> bool:
    """CDVAE's structural validity: every interatomic distance (periodic images included) and every
    lattice length above `min_distance` Å."""
    import numpy as np

    if structure is None or len(structure) == 0:
        return False
    d = structure.distance_matrix + np.eye(len(structure)) * 1e9
    return bool(d.min() > min_distance) and min(structure.lattice.abc) > min_distance


def _smact_available() -> bool:
    return available("smact")


def smact_valid(composition: Composition | str) -> bool | None:
    """CDVAE's composition validity of `composition` (None where SMACT is not installed)."""
    if not _smact_available():
        return None
    amounts = Composition(composition).get_el_amt_dict()
    symbols = tuple(sorted(amounts))
    counts = [int(round(amounts[s])) for s in symbols]
    divisor = 0
    for c in counts:
        divisor = gcd(divisor, c)
    return _smact_valid(symbols, tuple(c // max(divisor, 1) for c in counts))


@lru_cache(maxsize=65536)
def _smact_valid(symbols: tuple[str, ...], counts: tuple[int, ...]) -> bool:
    import smact
    from smact.screening import pauling_test

    if len(symbols) == 1 or all(s in smact.metals for s in symbols):
        return True
    elements = smact.element_dictionary(symbols)
    electronegativities = [elements[s].pauling_eneg for s in symbols]
    stoichs = [(c,) for c in counts]  # the composition's own ratio, nothing else
    for states in itertools.product(*(elements[s].oxidation_states for s in symbols)):
        if not smact.neutral_ratios(states, stoichs=stoichs, threshold=max(counts)):
            continue
        try:
            if pauling_test(states, electronegativities):
                return True
        except TypeError:  # an element without an electronegativity: the test cannot object
            return True
    return False
