"""Where structures come from: CDVAE-style CSV, a folder of CIF/POSCAR/JSON files, one file, or `demo`.

Listing is cheap and parses nothing: `list_entries` returns raw entries (id + text), so a bad CIF fails
later, in `load_structure`, with a reason that lands in the rejects table instead of stopping the run.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Structure
from pymatgen.core.periodic_table import DummySpecies

STRUCTURE_SUFFIXES = {".cif": "cif", ".json": "json", ".vasp": "poscar", ".poscar": "poscar"}


class SourceError(ValueError):
    """The source itself cannot be read (missing path, wrong columns, unknown format)."""


class StructureError(ValueError):
    """One entry cannot become a usable crystal (the message says why)."""


@dataclass(frozen=True)
class Entry:
    """One raw input: an id, its text and format (cif, poscar, json), or an in-memory Structure."""

    material_id: str
    fmt: str
    text: str = ""
    structure: Structure | None = None
    duplicate_of: int | None = None  # position of the first entry with this id
    error: str | None = None  # why the raw input could not even be read (it is rejected with this reason)


DEMO_DEFAULT, DEMO_MAX = 300, 1_000_000


def demo_count(source: str | Path) -> int | None:
    """How many crystals a built-in `demo` / `demo:N` source holds; None for any other source."""
    text = str(source)
    if text == "demo":
        return DEMO_DEFAULT
    if not text.startswith("demo:"):
        return None
    count = text.partition(":")[2]
    if not count.isdigit() or not 1 <= int(count) <= DEMO_MAX:
        raise SourceError(f"source {text!r}: use demo or demo:N with N in 1..{DEMO_MAX}")
    return int(count)


def list_entries(source: str | Path | list | tuple, limit: int | None = None) -> list[Entry]:
    """All entries of a source, in a stable order. `demo` or `demo:N` is the built-in set; a list of
    sources is read in turn, as one (ids must then be unique across them)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise SourceError("no source given")
        entries = [e for part in source for e in list_entries(part)]
    elif (count := demo_count(source)) is not None:
        from crystalae.demo import demo_structures

        entries = [Entry(mid, "structure", structure=s) for mid, s in demo_structures(count)]
    else:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"source {source!s} does not exist")
        if path.is_dir():
            entries = _folder_entries(path)
        elif path.suffix.lower() == ".csv":
            entries = _csv_entries(path)
        else:
            entries = [_file_entry(path)]
    if limit is not None:
        entries = entries[:limit]
    return _mark_duplicates(entries)


def _csv_entries(path: Path) -> list[Entry]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"{path}: not a readable CSV ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if "cif" not in frame.columns:
        raise SourceError(f"{path}: CSV needs a 'cif' column, found {list(frame.columns)}")
    ids = frame["material_id"] if "material_id" in frame.columns else frame.index.astype(str)
    return [Entry(str(mid), "cif", cif) for mid, cif in zip(ids, frame["cif"])]


def _folder_entries(path: Path) -> list[Entry]:
    files = sorted(p for p in path.iterdir() if p.is_file() and _format_of(p) is not None)
    if not files:
        raise SourceError(f"{path}: no .cif, .json, .vasp or POSCAR files in the folder")
    return [_file_entry(p) for p in files]


def _format_of(path: Path) -> str | None:
    if path.name.upper().startswith(("POSCAR", "CONTCAR")):
        return "poscar"
    return STRUCTURE_SUFFIXES.get(path.suffix.lower())


def _file_entry(path: Path) -> Entry:
    fmt = _format_of(path)
    if fmt is None:
        raise SourceError(f"{path}: unknown structure format (use .cif, .json, .vasp or POSCAR)")
    name = path.stem if fmt != "poscar" or path.suffix else path.name
    try:
        return Entry(name, fmt, path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:  # binary or latin-1: this file is rejected, the others still load
        return Entry(name, fmt, error=f"{path.name} is not UTF-8 text (byte {exc.start}: {exc.reason})")
    except OSError as exc:
        return Entry(name, fmt, error=f"{path.name} cannot be read ({exc.strerror or type(exc).__name__})")


def _mark_duplicates(entries: list[Entry]) -> list[Entry]:
    first: dict[str, int] = {}
    marked = []
    for i, e in enumerate(entries):
        if e.material_id in first:
            e = dataclasses.replace(e, duplicate_of=first[e.material_id])
        else:
            first[e.material_id] = i
        marked.append(e)
    return marked


def load_structure(entry: Entry) -> Structure:
    """Parse and check one entry; raises StructureError with the reason."""
    if entry.error is not None:
        raise StructureError(entry.error)
    if entry.duplicate_of is not None:
        raise StructureError(f"duplicate material_id (first at entry {entry.duplicate_of})")
    if entry.structure is not None:
        structure = entry.structure
    else:
        structure = _parse(entry)
    check_structure(structure)
    return structure


def _parse(entry: Entry) -> Structure:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if entry.fmt == "json":
                return Structure.from_dict(json.loads(entry.text))
            if entry.fmt == "cif":
                from pymatgen.io.cif import CifParser

                parsed = CifParser.from_str(entry.text).parse_structures(primitive=False, on_error="raise")
                if not parsed:
                    raise ValueError("no structure in CIF")
                return parsed[0]
            return Structure.from_str(entry.text, fmt=entry.fmt)
    except Exception as exc:  # pymatgen raises many types for malformed text
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StructureError(f"unparsable {entry.fmt}: {message}") from None


def check_structure(structure: Structure, min_distance: float = 0.5) -> None:
    """Reject what the voxelizer cannot represent faithfully."""
    if len(structure) == 0:
        raise StructureError("structure has no atoms")
    if not structure.is_ordered:
        raise StructureError("structure is disordered (partial occupancies)")
    for site in structure:
        if isinstance(site.specie, DummySpecies) or getattr(site.specie, "Z", 0) < 1:  # e.g. 'Xx' in a CIF
            raise StructureError(f"unknown element {site.species_string!r}")
    if not np.isfinite(structure.lattice.matrix).all() or not np.isfinite(structure.frac_coords).all():
        raise StructureError("NaN or infinite coordinates or lattice")
    if structure.volume < 1e-3:
        raise StructureError(f"degenerate lattice (volume {structure.volume:.3g} Å^3)")
    if len(structure) > 1:
        d = structure.distance_matrix
        np.fill_diagonal(d, np.inf)
        if d.min() < min_distance:
            raise StructureError(f"atoms closer than {min_distance} Å ({d.min():.3f} Å)")
    elif min(structure.lattice.abc) < min_distance:
        raise StructureError(f"atom closer than {min_distance} Å to its own image")


def reduce_cell(structure: Structure, method: str) -> Structure:
    """Niggli- or LLL-reduced copy (same crystal, most compact cell); `none` returns it unchanged."""
    if method == "none":
        return structure
    try:
        return structure.get_reduced_structure(reduction_algo=method)
    except Exception:  # Niggli can fail to converge on near-degenerate cells; LLL always terminates
        return structure.get_reduced_structure(reduction_algo="LLL")
