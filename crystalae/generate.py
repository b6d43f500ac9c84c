"""Use a trained model: sample from the prior, interpolate, alter, and write the crystals with their checks.

Every generated crystal is checked as in CDVAE: structural validity (all interatomic distances
> 0.5 Å) and composition validity (SMACT); a batch can be scored against reference crystals with
CDVAE's coverage and distribution distances (`crystalae.coverage`).
"""
from __future__ import annotations

import csv
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.core import Structure
from tqdm.auto import tqdm

from crystalae.checkpoint import LoadedModel
from crystalae.config import GENERATE_DEFAULTS as DEFAULTS
from crystalae.coverage import COVERAGE_CUTOFFS
from crystalae.files import write_json, write_text
from crystalae.metrics import structure_matcher
from crystalae.prior import sample_latents
from crystalae.readout import check_decodable, decode_latents, decoding_options, outputs_to_structures
from crystalae.sources import StructureError, list_entries, load_structure, reduce_cell
from crystalae.symmetry import spacegroup, symmetrize
from crystalae.units import density_scale
from crystalae.validity import smact_valid, structure_valid
from crystalae.voxelize import VoxelizeError, rotation_matrix, voxelize

__all__ = [
    "GenerationInterrupted", "TrainingSet", "alter", "check_generate_folder", "decode_to_structures", "encode",
    "interpolate", "reference_structures", "sample", "triage",
    "validity", "voxelized_source", "write_generated",
]

log = logging.getLogger(__name__)


def validity(structure: Structure | None, min_distance: float = 0.5) -> dict[str, bool | None]:
    """CDVAE's checks of a generated crystal: structural (every interatomic distance > `min_distance`
    Å) and `smact_valid`, the field's composition validity (None without SMACT installed); plus
    `composition_valid`, pymatgen finding a charge-neutral oxidation-state assignment (stricter)."""
    if structure is None or len(structure) == 0:
        return {"structural_valid": False, "composition_valid": False, "smact_valid": False}
    structural = structure_valid(structure, min_distance)
    if len(structure.composition.elements) == 1:
        composition = True  # elemental crystals are neutral (CDVAE counts them valid)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            composition = bool(structure.composition.oxi_state_guesses(max_sites=-20))
    return {"structural_valid": structural, "composition_valid": composition,
            "smact_valid": smact_valid(structure.composition)}


def voxelized_source(loaded: LoadedModel, source: str | Path, ids: list[str] | None = None,
                     limit: int | None = None) -> list[dict[str, Any]]:
    """Structures of a source voxelized with the model's own config (rejects keep their reason)."""
    voxel = loaded.voxel
    entries = list_entries(source, limit=limit)
    if ids is not None:
        found: dict[str, Any] = {}
        for e in entries:  # the first, kept row of an id; later duplicates are rejected rows
            found.setdefault(e.material_id, e)
        missing = [i for i in ids if i not in found]
        if missing:
            raise StructureError(f"ids not found in {source}: {missing}")
        entries = [found[i] for i in ids]
    items = []
    for e in tqdm(entries, desc="voxelize", unit="crystal", disable=None if len(entries) > 64 else True):
        item: dict[str, Any] = {"material_id": e.material_id}
        try:
            item["structure"] = reduce_cell(load_structure(e), voxel.reduce)
            item["density"] = voxelize(item["structure"], voxel, rotation_matrix(voxel, e.material_id, 0))
        except (StructureError, VoxelizeError) as exc:
            item["error"] = str(exc)
        items.append(item)
    return items


def _device(loaded: LoadedModel) -> torch.device:
    return next(loaded.model.parameters()).device


@torch.no_grad()
def encode(loaded: LoadedModel, densities: list) -> torch.Tensor:
    """Posterior means (B, latent_dim) of physical density grids."""
    x = torch.from_numpy(np.stack([d.values for d in densities])).unsqueeze(1).to(_device(loaded))
    return loaded.model.vae.encode(x * density_scale(loaded.voxel))[0]


def decode_to_structures(loaded: LoadedModel, z: torch.Tensor, densities: list | None = None,
                         batch_size: int = 64, reconstructing: bool = False) -> list[Structure | None]:
    """Latents -> crystals; box models borrow lattice and origin from the input densities. Decoded in
    batches, so memory does not grow with the number of latents. `reconstructing`: the latents are
    encodings of `densities` (see `crystalae.readout.decoding_options` for what that changes)."""
    check_decodable(loaded, densities)  # before any decoding
    structures: list[Structure | None] = []
    with tqdm(total=len(z), desc="decode", unit="crystal", disable=None if len(z) > batch_size else True) as bar:
        try:
            for start in range(0, len(z), batch_size):
                outputs = decode_latents(loaded.model, loaded.voxel, z[start : start + batch_size])
                part = None if densities is None else densities[start : start + batch_size]
                structures += outputs_to_structures(loaded.model, loaded.voxel, outputs,
                                                    **decoding_options(loaded, part, reconstructing))
                bar.update(len(outputs["density"]))
        except KeyboardInterrupt:
            raise GenerationInterrupted(structures) from None
    return structures


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C while decoding a batch of latents; `structures` holds the crystals decoded until then."""

    def __init__(self, structures: list[Structure | None]):
        super().__init__(f"interrupted after {len(structures)} crystals")
        self.structures = structures


def sample(loaded: LoadedModel, count: int, seed: int = DEFAULTS.seed, prior: str = "auto",
           temperature: float | None = None) -> list[Structure | None]:
    """`count` new crystals from the latent prior (the fitted one when the checkpoint has it)."""
    return decode_to_structures(loaded, sample_latents(loaded, count, seed, prior, temperature))


def interpolate(loaded: LoadedModel, density_a, density_b, steps: int = DEFAULTS.interpolate_steps
                ) -> list[Structure | None]:
    """`steps` crystals decoded along the straight line between the two densities' latents, ends included."""
    z = encode(loaded, [density_a, density_b])
    t = torch.linspace(0, 1, steps, device=z.device)[:, None]
    return decode_to_structures(loaded, (1 - t) * z[0] + t * z[1])


def alter(loaded: LoadedModel, density, scale: float = DEFAULTS.alter_scale, count: int = DEFAULTS.alter_count,
          seed: int = DEFAULTS.seed) -> list[Structure | None]:
    """Decode the crystal's latent moved by `scale` x unit Gaussian noise (count variants)."""
    z = encode(loaded, [density])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, z.shape[1], generator=generator).to(z.device)
    return decode_to_structures(loaded, z + scale * noise)


def check_generate_folder(out: str | Path, overwrite: bool = False) -> Path:
    """`out` must be new or empty, unless `overwrite` (then an earlier run's files there are replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the generated crystals")
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # found now, not after the sampling
        raise ValueError(f"--out {out}: {blocked} is a file, so the folder cannot be created there")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty (an earlier run's crystals?); choose another folder "
                         "or pass --overwrite to replace them")
    return out


def _earlier_run_files(out: Path) -> list[Path]:
    """The files an earlier generate run wrote in `out`: those its summary.csv names, and the summaries;
    anything else in the folder is not ours to delete."""
    summary = out / "summary.csv"
    if not summary.is_file():
        return []
    with open(summary, newline="", encoding="utf-8", errors="replace") as handle:
        names = [row.get(column) or "" for row in csv.DictReader(handle) for column in ("cif", "symmetrized_cif")]
    cifs = [out / name for name in names if name.endswith(".cif") and Path(name).name == name]  # no paths
    return [*cifs, summary, out / "summary.json"]


def reference_structures(source: str | Path, limit: int | None = None) -> list[Structure]:
    """The crystals of a reference source, as they are (entries that cannot be read are left out)."""
    structures, problems = [], []
    for entry in list_entries(source, limit=limit):
        try:
            structures.append(load_structure(entry))
        except StructureError as exc:
            problems.append(str(exc) if entry.material_id in str(exc) else f"{entry.material_id}: {exc}")
    if not structures:
        why = f" ({len(problems)} unreadable, the first: {problems[0]})" if problems else " (it holds no entries)"
        raise StructureError(f"reference {source}: no readable crystal{why}")
    if problems:
        log.warning("reference %s: left out %d unreadable entries (the first: %s)", source, len(problems), problems[0])
    return structures


SYMPREC = 0.1  # Å: spglib's tolerance for a decoded crystal's space group (decoded positions are good to ~0.1 Å)


def _symmetrized_cif(structure: Structure, path: Path) -> str:
    """Write the ideal crystal of `structure`'s space group (within SYMPREC) to `path`, a CIF with its
    symmetry operations; returns the file's name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_text(path, symmetrize(structure, SYMPREC).to(fmt="cif", symprec=SYMPREC))
    return path.name


def _first_of_kind(structures: list[Structure | None]) -> list[bool | None]:
    """For each crystal, whether it is the first of its kind in the batch (StructureMatcher with CDVAE's
    settings); None where nothing was decoded. The batch's uniqueness is the share of True."""
    decoded = [s for s in structures if s is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = structure_matcher().group_structures(decoded) if decoded else []
    first = {id(group[0]) for group in groups}
    return [None if s is None else id(s) in first for s in structures]


@dataclass
class TrainingSet:
    """The crystals a model was trained on (its dataset's train split), kept as CIFs by reduced formula and
    read only where a sample has that formula; `cifs` is None where they could not be found, and `note`
    says where they came from or why not (summary.json records it)."""

    cifs: dict[str, list[str]] | None
    note: str
    _read: dict[str, list[Structure]] = field(default_factory=dict, repr=False)

    def novel(self, structures: list[Structure | None]) -> list[bool | None]:
        """For each crystal, whether no training crystal matches it (CDVAE's StructureMatcher; a match needs
        the same reduced formula); None where nothing was decoded or the training crystals are not known."""
        if self.cifs is None:
            return [None] * len(structures)
        matcher, found = structure_matcher(), []
        for s in structures:
            if s is None:
                found.append(None)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found.append(not any(matcher.fit(s, t) for t in self._same_formula(s.composition.reduced_formula)))
        return found

    def _same_formula(self, formula: str) -> list[Structure]:
        if formula not in self._read:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pymatgen's CIF parser warns on rounded occupancies
                self._read[formula] = [Structure.from_str(c, fmt="cif") for c in self.cifs.get(formula, [])]
        return self._read[formula]


def triage(structures: list[Structure | None], training: TrainingSet | None = None) -> list[dict[str, Any]]:
    """What a user sorts generated crystals by, one mapping per crystal: its space group (spglib within
    SYMPREC: symbol, number; '' where none), whether it is the first of its kind in the batch (`unique`) and
    whether it is `novel` against the model's training set (None where unknown)."""
    novel = (training or TrainingSet(None, "")).novel(structures)
    rows = []
    for structure, unique, new in zip(structures, _first_of_kind(structures), novel):
        found = spacegroup(structure, SYMPREC) if structure is not None else None
        rows.append({"spacegroup": found[0] if found else "", "spacegroup_number": found[1] if found else "",
                     "unique": unique, "novel": new})
    return rows


# relax's per-crystal record and its summary.csv column: prefixed, since generate has --steps of its own
RELAXED_COLUMNS = {"energy_per_atom": "relaxed_energy_per_atom", "initial_energy_per_atom": "initial_energy_per_atom",
                   "steps": "relax_steps", "converged": "relax_converged"}


def relaxed_columns(relaxation: dict[str, list] | None, count: int) -> list[dict[str, Any]]:
    """Per crystal, its relaxation as summary.csv columns: CHGNet energy after and before (eV/atom, to
    0.1 meV), FIRE steps taken, converged; None (an empty cell) where not relaxed or it failed to relax."""
    rows: list[dict[str, Any]] = [dict.fromkeys(RELAXED_COLUMNS.values()) for _ in range(count)]
    for key, column in RELAXED_COLUMNS.items():
        for row, value in zip(rows, (relaxation or {}).get(key, [])):
            row[column] = round(value, 4) if isinstance(value, float) else value
    return rows


def write_generated(out: str | Path, named: list[tuple[str, Structure | None]], *, overwrite: bool = False,
                    reference: list[Structure] | None = None,
                    cutoffs: tuple[float, float] = COVERAGE_CUTOFFS["perov_5"],
                    provenance: dict[str, Any] | None = None, training: TrainingSet | None = None,
                    relaxation: dict[str, list] | None = None) -> dict[str, Any]:
    """One CIF per crystal plus summary.csv (per crystal: validity, `triage`'s space group, uniqueness and
    novelty against `training`, `relaxed_columns`, the symmetrized CIF) and summary.json (the batch's rates),
    in a new or empty folder; with `overwrite`, the CIFs and summaries of an earlier run there are removed first.
    `relaxation` is `crystalae.relax.relax`'s record["per_crystal"] for these crystals (None: not relaxed).

    With `reference` crystals, the summary adds CDVAE's distribution metrics of the batch against
    them (`crystalae.coverage`: COV-R, COV-P, d_ρ, d_elem; needs `crystalae[metrics]`).
    `provenance` (how the crystals were made, e.g. a relaxation record) is stored in the summary.
    """
    out = check_generate_folder(out, overwrite)
    for stale in _earlier_run_files(out):
        stale.unlink(missing_ok=True)
    rows = []
    relaxed = relaxed_columns(relaxation, len(named))
    for (name, structure), sorted_by, energies in zip(named, triage([s for _, s in named], training), relaxed):
        row = {"name": name, "formula": "", "n_atoms": 0, **validity(structure), **sorted_by, **energies, "cif": "",
               "symmetrized_cif": ""}
        if structure is not None:
            row.update(formula=structure.composition.reduced_formula, n_atoms=len(structure),
                       cif=f"{name}.cif")
            write_text(out / row["cif"], structure.to(fmt="cif"))
            if row["spacegroup"]:
                row["symmetrized_cif"] = _symmetrized_cif(structure, out / f"{name}.sym.cif")
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "summary.csv", buffer.getvalue())
    n = max(len(rows), 1)
    summary = {"count": len(rows), "decoded": sum(1 for r in rows if r["cif"]),
               "structural_validity": sum(r["structural_valid"] for r in rows) / n,
               "composition_validity": sum(r["composition_valid"] for r in rows) / n,
               "uniqueness": sum(r["unique"] is True for r in rows) / n,  # distinct crystals among all samples
               # samples unlike every training crystal, among all samples (None: the training set is not known)
               "novelty": None if training is None or training.cifs is None else sum(r["novel"] is True for r in rows) / n,
               "novelty_note": "no training set given" if training is None else training.note,
               # the field's figure (CDVAE's SMACT check); None where SMACT is not installed
               "composition_validity_smact": None if any(r["smact_valid"] is None for r in rows)
               else sum(r["smact_valid"] for r in rows) / n, **(provenance or {})}
    if reference is not None:
        from crystalae.coverage import distribution_metrics, fingerprints

        summary["distribution"] = distribution_metrics(fingerprints([s for _, s in named], desc="fingerprint samples"),
                                                       fingerprints(reference, desc="fingerprint reference"), cutoffs)
    write_json(out / "summary.json", summary)
    return summary
