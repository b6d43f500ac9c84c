"""Built-in demo set: common prototypes with element substitutions and lattice scaling, no files.

Each prototype lists its space group, Wyckoff sites (as element pools) and the nearest-neighbour
distance in units of `a`, so the lattice parameter follows from the chosen elements' atomic radii.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure

__all__ = ["PROTOTYPES", "Prototype", "build_prototype", "demo_ids", "demo_structures"]


@dataclass(frozen=True)
class Prototype:
    name: str
    spacegroup: str
    sites: tuple[tuple[tuple[str, ...], tuple[float, float, float]], ...]  # (element pool, position)
    bond: tuple[int, int, float]  # (site i, site j, nearest-neighbour distance / a)
    c_over_a: float = 1.0
    hexagonal: bool = False


_ALKALI_EARTH = ("Mg", "Ca", "Sr", "Ba")
PROTOTYPES = (
    Prototype("rocksalt", "Fm-3m", ((("Li", "Na", "K", "Mg", "Ca", "Sr", "Ba", "Ni", "Mn", "Pb"), (0, 0, 0)),
              (("F", "Cl", "Br", "O", "S", "Se", "Te", "N"), (0.5, 0.5, 0.5))), (0, 1, 0.5)),
    Prototype("cscl", "Pm-3m", ((("Cs", "Rb", "Tl", "Ag", "Cu", "Fe", "Co", "Ni"), (0, 0, 0)),
              (("Cl", "Br", "I", "Al", "Zn"), (0.5, 0.5, 0.5))), (0, 1, 3**0.5 / 2)),
    Prototype("zincblende", "F-43m", ((("Zn", "Cd", "Ga", "In", "Al", "Cu", "Hg", "B"), (0, 0, 0)),
              (("S", "Se", "Te", "As", "P", "Sb", "N"), (0.25, 0.25, 0.25))), (0, 1, 3**0.5 / 4)),
    Prototype("wurtzite", "P6_3mc", ((("Zn", "Ga", "Al", "Cd", "In", "Be"), (1 / 3, 2 / 3, 0)),
              (("O", "S", "N", "Se"), (1 / 3, 2 / 3, 0.375))), (0, 1, 0.375 * 1.633), 1.633, True),
    Prototype("fluorite", "Fm-3m", (((*_ALKALI_EARTH[1:], "Ce", "Zr", "Th", "U", "Cd", "Pb"), (0, 0, 0)),
              (("F", "O", "Cl"), (0.25, 0.25, 0.25))), (0, 1, 3**0.5 / 4)),
    Prototype("perovskite", "Pm-3m", ((("Ca", "Sr", "Ba", "La", "K", "Na", "Pb", "Cs"), (0, 0, 0)),
              (("Ti", "Zr", "Nb", "Mn", "Fe", "Co", "Ni", "Sn", "Al"), (0.5, 0.5, 0.5)),
              (("O", "F", "Cl", "Br"), (0.5, 0.5, 0))), (1, 2, 0.5)),
    Prototype("spinel", "Fd-3m", ((("Mg", "Zn", "Fe", "Co", "Ni", "Mn"), (0, 0, 0)),
              (("Al", "Cr", "Fe", "Ga", "V", "Ti"), (0.625, 0.625, 0.625)),
              (("O", "S"), (0.388, 0.388, 0.388))), (1, 2, 0.2385)),
    Prototype("rutile", "P4_2/mnm", ((("Ti", "Sn", "Mn", "Ru", "Ir", "V", "Cr", "Ge"), (0, 0, 0)),
              (("O", "F"), (0.305, 0.305, 0))), (0, 1, 0.305 * 2**0.5), 0.644),
    Prototype("diamond", "Fd-3m", ((("C", "Si", "Ge", "Sn"), (0, 0, 0)),), (0, 0, 3**0.5 / 4)),
    Prototype("bcc", "Im-3m", ((("Fe", "Cr", "Mo", "W", "V", "Nb", "Ta", "Li", "Na", "K", "Ba"), (0, 0, 0)),),
              (0, 0, 3**0.5 / 2)),
    Prototype("fcc", "Fm-3m", ((("Cu", "Ag", "Au", "Al", "Ni", "Pd", "Pt", "Pb", "Ca", "Sr"), (0, 0, 0)),),
              (0, 0, 2**-0.5)),
    Prototype("hcp", "P6_3/mmc", ((("Mg", "Ti", "Zn", "Cd", "Co", "Zr", "Be", "Hf", "Re", "Ru"), (1 / 3, 2 / 3, 0.25)),),
              (0, 0, 1.0), 1.633, True),
)


def _radius(symbol: str) -> float:
    r = Element(symbol).atomic_radius
    return float(r) if r is not None else 1.5


_PLACEHOLDERS = ("H", "He", "Li")  # one distinct element per Wyckoff site while finding the primitive cell


@cache
def _template(proto: Prototype) -> Structure:
    """Primitive cell of `proto` at a = 1 Å, site i holding placeholder element i."""
    a = 5.0  # built at a realistic size so the primitive search's 0.25 Å tolerance means what it should
    lattice = Lattice.hexagonal(a, a * proto.c_over_a) if proto.hexagonal else Lattice.tetragonal(a, a * proto.c_over_a)
    placeholders = list(_PLACEHOLDERS[: len(proto.sites)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conventional = Structure.from_spacegroup(proto.spacegroup, lattice, placeholders, [s[1] for s in proto.sites])
        primitive = conventional.get_primitive_structure()
    return Structure(primitive.lattice.matrix / a, primitive.species, primitive.frac_coords)


def build_prototype(proto: Prototype, elements: list[str], scale: float = 1.0) -> Structure:
    """A primitive cell of `proto` with the given elements; `a` set by their atomic radii x scale."""
    i, j, ratio = proto.bond
    a = (_radius(elements[i]) + _radius(elements[j])) * scale / ratio
    template = _template(proto)
    species = [elements[_PLACEHOLDERS.index(site.species_string)] for site in template]
    return Structure(template.lattice.matrix * a, species, template.frac_coords)


def _demo_choices(count: int, seed: int) -> Iterator[tuple[int, Prototype, list[str], float]]:
    """(index, prototype, elements, scale) per demo crystal: cheap draws, no structure built."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        proto = PROTOTYPES[k % len(PROTOTYPES)]
        elements: list[str] = []
        for pool, _ in proto.sites:
            choices = [e for e in pool if e not in elements] or list(pool)
            elements.append(str(rng.choice(choices)))
        yield k, proto, elements, float(rng.uniform(0.95, 1.05))


def _demo_id(k: int, proto: Prototype, formula: str) -> str:
    return f"demo-{k:04d}-{proto.name}-{formula}"


def demo_ids(count: int = 300, seed: int = 0) -> Iterator[str]:
    """The ids of `demo_structures(count, seed)`, without building the crystals."""
    for k, proto, elements, _ in _demo_choices(count, seed):
        species = [elements[_PLACEHOLDERS.index(site.species_string)] for site in _template(proto)]
        yield _demo_id(k, proto, Composition(Counter(species)).reduced_formula)


def demo_structures(count: int = 300, seed: int = 0, start: int = 0) -> list[tuple[str, Structure]]:
    """Crystals `start`..`count - 1` of the deterministic demo set for a seed; ids say prototype and formula."""
    result = []
    for k, proto, elements, scale in _demo_choices(count, seed):
        if k >= start:
            structure = build_prototype(proto, elements, scale=scale)
            result.append((_demo_id(k, proto, structure.composition.reduced_formula), structure))
    return result
