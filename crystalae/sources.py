"""Where structures come from: CDVAE-style CSV, a folder of CIF/POSCAR/JSON files, one file, or `demo`.

Listing is cheap and parses nothing: `list_entries` returns raw entries (id + text), so a bad CIF fails
later, in `load_structure`, with a reason that lands in the rejects table instead of stopping the run.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure
from pymatgen.core.periodic_table import DummySpecies
from tqdm.auto import tqdm

from crystalae import uri_fs
from crystalae.voxelize import cell_problem

__all__ = [
    "Chunk", "Entry", "READABLE", "SourceError", "SourceSlice", "StructureError", "check_structure",
    "demo_count", "format_of", "list_entries", "load_structure", "plan_chunks", "read_chunk", "reduce_cell",
]

STRUCTURE_SUFFIXES = {".cif": "cif", ".json": "json", ".vasp": "poscar", ".poscar": "poscar",
                      ".extxyz": "extxyz", ".xsf": "xsf"}  # the last two are read by ASE (optional)
ASE_FORMATS = ("extxyz", "xsf")
READABLE = ".cif, .cif.gz, .json, .vasp, POSCAR, .extxyz or .xsf"

log = logging.getLogger(__name__)


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
# A CIF of the largest crystal crystalae reads (MAX_PARSED_ATOMS sites) is a few hundred KB; a longer
# field is rejected as its row, and the CSV reader accepts fields up to MAX_CSV_FIELD (Python's own
# limit, 128 KB, would make the whole file unreadable).
MAX_CIF_TEXT = 1 << 20
MAX_CSV_FIELD = 1 << 24


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
    chunks, _, _ = plan_chunks(source, size=None, limit=limit)
    return [entry for chunk in chunks for _, entry in read_chunk(chunk)]


@dataclass(frozen=True)
class SourceSlice:
    """Consecutive entries of one source, small enough to send to any process or node, which reads
    them there (so no process ever holds the whole source)."""

    source: str
    first: int  # position of the first entry among all entries of the (possibly multi-part) source
    count: int
    start: int = 0  # position of the first entry within this part (demo index, CSV row number)
    offset: int = 0  # CSV: byte offset where the first row begins
    columns: tuple[int, int] = (-1, -1)  # CSV: indices of the id column (-1: ids are row numbers) and cif column
    files: tuple[str, ...] = ()  # folder: this slice's file names
    duplicates: tuple[tuple[int, int], ...] = ()  # (position, position of the first entry with that id)


Chunk = tuple[SourceSlice, ...]  # one shard's entries; it may span the end of one source and the next


def plan_chunks(source: str | Path | list | tuple, size: int | None, limit: int | None = None
                ) -> tuple[list[Chunk], int, int]:
    """Cut a source into chunks of `size` entries (None: one chunk) by one streamed pass that keeps
    only ids and offsets; returns (chunks, entries kept, entries listed)."""
    parts = list(source) if isinstance(source, (list, tuple)) else [source]
    if not parts:
        raise SourceError("no source given")
    first_of: dict[str, int] = {}
    chunks: list[Chunk] = []
    current: list[SourceSlice] = []
    position = listed = 0
    progress = tqdm(desc="listing", unit=" entries", disable=None if size is not None else True)
    for part in parts:
        for material_id, locator, static in _scan(part):
            listed += 1
            progress.update()
            if limit is not None and position >= limit:
                continue
            if size is not None and position and position % size == 0:
                chunks.append(tuple(current))
                current = []
            duplicate = first_of.setdefault(material_id, position)
            last = current[-1] if current else None
            if last is None or last.source != static["source"]:
                last = SourceSlice(first=position, count=0, **static, **_locate(static, locator, start=True))
                current.append(last)
            extra = _locate(static, locator, start=False)
            current[-1] = dataclasses.replace(
                last, count=last.count + 1, files=last.files + extra.get("files", ()),
                duplicates=last.duplicates + (((position, duplicate),) if duplicate != position else ()))
            position += 1
    progress.close()
    if current:
        chunks.append(tuple(current))
    return chunks, position, listed


def _locate(static: dict, locator: Any, start: bool) -> dict[str, Any]:
    """The SourceSlice fields that say where an entry is: the first entry sets where a CSV slice or a
    demo slice begins; each folder entry adds its file."""
    if "files" in static:  # folder sources
        return {} if start else {"files": (locator,)}
    return {"offset": locator[0], "start": locator[1]} if start and locator is not None else {}


def _scan(part: str | Path) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(id, locator, fixed slice fields) per entry of one source, streamed."""
    if (count := demo_count(part)) is not None:
        from crystalae.demo import demo_ids

        for k, material_id in enumerate(demo_ids(count)):
            yield material_id, (0, k), {"source": str(part)}
        return
    path = _local_source(part)
    if not path.exists():
        raise SourceError(f"source {part!s} does not exist")
    # chunks are read in other processes, maybe on other nodes: a URI as given, a local path made absolute
    where = str(uri_fs.absolute(part))
    if path.is_dir():
        yield from _scan_folder(path, where)
    elif path.suffix.lower() == ".csv":
        yield from _scan_csv(path, where)
    else:
        if format_of(path) is None:
            raise SourceError(f"{path}: unknown structure format (crystalae reads {READABLE})")
        yield _entry_name(path), None, {"source": where}


def _scan_folder(path: Path, where: str) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Every visible file of a folder; those in no format crystalae reads become rejected entries."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(format_of(f) is not None for f in files):
        raise SourceError(f"{path}: no structure files in the folder (crystalae reads {READABLE})")
    skipped = [f.name for f in files if format_of(f) is None]
    if skipped:  # each is also a rejected entry, with this reason
        log.warning("%s: %d files are not in a format crystalae reads and are skipped: %s%s", path, len(skipped),
                    ", ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
    for f in files:
        yield _entry_name(f), f.name, {"source": where, "files": ()}


def _scan_csv(path: Path, where: str) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """One entry per row of a CDVAE-style CSV, located by its byte offset."""
    columns, rows = None, 0
    for row_number, (offset, row) in enumerate(_csv_rows(path)):
        if columns is None:
            columns = _csv_columns(path, row)
            continue
        material_id = row[columns[0]] if 0 <= columns[0] < len(row) else str(row_number - 1)
        rows += 1
        yield material_id, (offset, row_number - 1), {"source": where, "columns": columns}
    if columns is None:
        raise SourceError(f"{path}: not a readable CSV (EmptyDataError: no header row)")
    if not rows:  # a run over it would do nothing and say it worked
        raise SourceError(f"{path}: the CSV has a header and no rows: no structures to read")


def _local_source(part: str | Path) -> Path:
    """A source on this machine: the path itself, or for an object-storage URI (s3://bucket/mp.csv, or a
    folder of structure files) a copy in the local cache, fetched once per machine and kept while unchanged."""
    if not uri_fs.is_remote(part):
        return Path(part)
    if uri_fs.is_file(part):
        return uri_fs.download_file(part, uri_fs.cache_for(part))
    if not uri_fs.list_files(part):
        raise SourceError(f"source {part} does not exist")
    return uri_fs.download(part)


def _csv_columns(path: Path, header: list[str]) -> tuple[int, int]:
    if "cif" not in header:
        raise SourceError(f"{path}: CSV needs a 'cif' column, found {header}")
    return (header.index("material_id") if "material_id" in header else -1), header.index("cif")


def _csv_rows(path: Path, offset: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(byte offset where the row begins, fields) per CSV row from `offset`; a row may span lines
    (CIF text in quotes), and the reader pulls lines only as a row needs them."""
    position = offset

    def lines(handle) -> Iterator[str]:
        nonlocal position
        for line_number, raw in enumerate(handle, 1):
            position += len(raw)
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SourceError(f"{path}: not a readable CSV (UnicodeDecodeError at line {line_number} "
                                  f"after byte {offset}: {exc.reason})") from None

    csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_FIELD))  # Python's default is 128 KB
    with open(path, "rb") as handle:
        handle.seek(offset)
        reader = csv.reader(lines(handle))
        begin = position
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise SourceError(f"{path}: not a readable CSV (Error: {exc})") from None
            if row:  # blank lines are not rows (as in pandas)
                yield begin, row
            begin = position


def read_chunk(chunk: Chunk) -> list[tuple[int, Entry]]:
    """The entries of a chunk with their positions, read from the source itself."""
    return [item for piece in chunk for item in _read_slice(piece)]


def _read_slice(piece: SourceSlice) -> list[tuple[int, Entry]]:
    if demo_count(piece.source) is not None:
        from crystalae.demo import demo_structures

        entries = [Entry(mid, "structure", structure=s)
                   for mid, s in demo_structures(piece.start + piece.count, start=piece.start)]
    elif piece.files:
        entries = [_file_entry(_local_source(piece.source) / name, in_folder=True) for name in piece.files]
    elif piece.columns != (-1, -1):
        entries = []
        id_column, cif_column = piece.columns
        for k, (_, row) in zip(range(piece.count), _csv_rows(_local_source(piece.source), piece.offset)):
            material_id = row[id_column] if 0 <= id_column < len(row) else str(piece.start + k)
            text = row[cif_column] if cif_column < len(row) else ""
            entries.append(Entry(material_id, "cif", text) if len(text) <= MAX_CIF_TEXT else
                           Entry(material_id, "cif", error=f"CIF text of {len(text):,} characters, over the "
                                                           f"{MAX_CIF_TEXT:,} crystalae reads"))
    else:
        entries = [_file_entry(_local_source(piece.source))]
    duplicates = dict(piece.duplicates)
    return [(piece.first + k, dataclasses.replace(e, duplicate_of=duplicates[piece.first + k])
             if piece.first + k in duplicates else e) for k, e in enumerate(entries)]


def format_of(path: Path) -> str | None:
    if path.name.upper().startswith(("POSCAR", "CONTCAR")):
        return "poscar"
    if path.name.lower().endswith(".cif.gz"):
        return "cif"
    return STRUCTURE_SUFFIXES.get(path.suffix.lower())


def _entry_name(path: Path) -> str:
    if path.name.lower().endswith(".cif.gz"):
        return path.name[:-7]
    return path.stem if format_of(path) != "poscar" or path.suffix else path.name


def _file_entry(path: Path, in_folder: bool = False) -> Entry:
    """One file as an entry; a file of an unknown format in a folder is a rejected entry (saying so)."""
    fmt = format_of(path)
    name = _entry_name(path)
    if in_folder and path.is_symlink() and not path.resolve().is_relative_to(path.parent.resolve()):
        # a folder source reads what is in the folder: a link elsewhere is not read (nor its content echoed)
        return Entry(name, fmt or "unknown", error=f"{path.name}: a link to a file outside the folder, not read")
    if fmt is None:
        if in_folder:
            return Entry(path.name, "unknown", error=f"{path.name}: not a format crystalae reads ({READABLE})")
        raise SourceError(f"{path}: unknown structure format (crystalae reads {READABLE})")
    try:
        return Entry(name, fmt, _read_text(path))
    except UnicodeDecodeError as exc:  # binary or latin-1: this file is rejected, the others still load
        return Entry(name, fmt, error=f"{path.name} is not UTF-8 text (byte {exc.start}: {exc.reason})")
    except (OSError, EOFError) as exc:
        return Entry(name, fmt, error=f"{path.name} cannot be read ({getattr(exc, 'strerror', None) or exc})")
    except StructureError as exc:
        return Entry(name, fmt, error=f"{path.name}: {exc}")


def _read_text(path: Path) -> str:
    """A structure file's text; a gzipped one decompressed, at most MAX_CIF_TEXT bytes (a gzip bomb
    stops there)."""
    if path.suffix.lower() != ".gz":
        return path.read_bytes().decode("utf-8")
    import gzip

    with gzip.open(path, "rb") as handle:
        data = handle.read(MAX_CIF_TEXT + 1)
    if len(data) > MAX_CIF_TEXT:
        raise StructureError(f"decompresses to over the {MAX_CIF_TEXT:,} bytes crystalae reads")
    return data.decode("utf-8")


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
            if entry.fmt in ASE_FORMATS:
                return _parse_with_ase(entry)
            if entry.fmt == "cif":
                from pymatgen.io.cif import CifParser

                _check_cif_tables(entry.text)
                parsed = CifParser.from_str(entry.text).parse_structures(primitive=False, on_error="raise")
                if not parsed:
                    raise ValueError("no structure in CIF")
                return parsed[0]
            return Structure.from_str(entry.text, fmt=entry.fmt)
    except Exception as exc:  # pymatgen raises many types for malformed text
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StructureError(f"unparsable {entry.fmt}: {message}") from None


def _parse_with_ase(entry: Entry) -> Structure:
    try:
        import ase.io
    except ImportError:
        raise StructureError(f"reading .{entry.fmt} files needs ASE: pip install ase") from None
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = ase.io.read(io.StringIO(entry.text), format=entry.fmt)
    if len(atoms) > MAX_PARSED_ATOMS:
        raise StructureError(f"{len(atoms)} atoms, over the {MAX_PARSED_ATOMS} crystalae reads")
    if not atoms.pbc.all():
        raise StructureError("not a periodic crystal (the file gives no 3-D cell)")
    return AseAtomsAdaptor.get_structure(atoms)


# More atoms than any crystal crystalae can voxelize (max_atoms is at most a few hundred): a CIF whose
# symmetry operations would expand it past this is refused before pymatgen builds it (a 5.5 KB CIF of
# 52 sites in Fm-3m expands to ~10,000 atoms and an N^2 distance matrix).
MAX_PARSED_ATOMS = 4096
_SYMOP_KEYS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz",
               "_space_group_symop.operation_xyz", "_symmetry_equiv.pos_as_xyz")


def _check_cif_tables(text: str) -> None:
    """Refuse, from the CIF's tables and before pymatgen builds the structure: sites times symmetry
    operations over MAX_PARSED_ATOMS (an upper bound on the atoms it expands to); an occupancy outside
    (0, 1] (pymatgen drops such a site without a word: another crystal); a fractional coordinate far
    outside the cell (wrapping 1e300 into the cell keeps no position)."""
    from pymatgen.io.cif import CifFile

    for block in CifFile.from_str(text).data.values():
        data = block.data
        sites = data.get("_atom_site_fract_x", data.get("_atom_site_Cartn_x", []))
        n_sites = len(sites) if isinstance(sites, list) else 1
        ops = next((data[k] for k in _SYMOP_KEYS if k in data), None)
        n_ops = (len(ops) if isinstance(ops, list) else 1) if ops is not None else 192  # unlisted: the most any group has
        if n_sites * n_ops > MAX_PARSED_ATOMS:
            raise ValueError(f"{n_sites} sites x {n_ops} symmetry operations could expand to {n_sites * n_ops} atoms, "
                             f"over the {MAX_PARSED_ATOMS} crystalae reads")
        for value in _cif_numbers(data.get("_atom_site_occupancy", [])):
            if not 0 < value <= 1:
                raise ValueError(f"_atom_site_occupancy {value:g} is not in (0, 1]")
        for axis in "xyz":
            for value in _cif_numbers(data.get(f"_atom_site_fract_{axis}", [])):
                if not abs(value) <= MAX_FRACTION:
                    raise ValueError(f"_atom_site_fract_{axis} {value:g} is not within ±{MAX_FRACTION:g}")


MAX_FRACTION = 1000.0  # fractional coordinates a CIF may give (an atom a thousand cells away is no typo we fix)


def _cif_numbers(values: Any) -> Iterator[float]:
    """The numbers of a CIF column, uncertainties ("0.25(3)") dropped; unknown ("?", ".") and text skipped."""
    for value in values if isinstance(values, list) else [values]:
        try:
            yield float(str(value).split("(")[0])
        except ValueError:
            continue


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
    problem = cell_problem(structure.lattice.matrix)  # size first: reducing a 1e8 Å cell takes GBs
    if problem is not None:
        raise StructureError(problem)
    if len(structure) > MAX_PARSED_ATOMS:  # before the N^2 distance matrix
        raise StructureError(f"{len(structure)} atoms, over the {MAX_PARSED_ATOMS} crystalae reads")
    shortest = _shortest_lattice_vector(structure.lattice.matrix)
    if shortest < min_distance:  # a near-flat cell: every atom sits on its own image (and reducing it is slow)
        raise StructureError(f"atom closer than {min_distance} Å to its own image ({shortest:.3g} Å: "
                             f"lattice lengths {np.round(structure.lattice.abc, 3).tolist()} Å)")
    if len(structure) > 1:
        d = structure.distance_matrix
        np.fill_diagonal(d, np.inf)
        if d.min() < min_distance:
            raise StructureError(f"atoms closer than {min_distance} Å ({d.min():.3f} Å)")


def _shortest_lattice_vector(matrix: np.ndarray) -> float:
    """Length (Å) of the shortest lattice vector: the shortest of the LLL-reduced basis's small sums."""
    from pymatgen.core import Lattice

    basis = Lattice(matrix).get_lll_reduced_lattice().matrix
    combos = np.array([c for c in itertools.product((-1, 0, 1), repeat=3) if any(c)])
    return float(np.linalg.norm(combos @ basis, axis=1).min())


def reduce_cell(structure: Structure, method: str) -> Structure:
    """Niggli- or LLL-reduced copy (same crystal, most compact cell); `none` returns it unchanged."""
    if method == "none":
        return structure
    try:
        return structure.get_reduced_structure(reduction_algo=method)
    except Exception:  # Niggli can fail to converge on near-degenerate cells; LLL always terminates
        return structure.get_reduced_structure(reduction_algo="LLL")
