"""Reconstruct crystals: each encoded and decoded again, in memory (`reconstruct_densities`) or from a
structure source to a folder of CIFs and scores (`reconstruct`, the `crystalae reconstruct` command)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pymatgen.core import Structure
from tqdm.auto import tqdm

from crystalae.checkpoint import LoadedModel
from crystalae.generate import decode_to_structures, encode, voxelized_source
from crystalae.metrics import compare, summarize
from crystalae.provenance import provenance
from crystalae.roundtrip import first_rejection, write_results

__all__ = ["reconstruct", "reconstruct_densities", "unknown_elements"]

log = logging.getLogger(__name__)


def reconstruct(loaded: LoadedModel, source: str | Path, out: str | Path, *, limit: int | None = None,
                batch_size: int = 32, model_ref: str | None = None) -> dict[str, Any]:
    """Encode -> decode -> atoms -> species for every structure; same outputs as `roundtrip`.
    `model_ref` (how the model was named) is recorded in the metrics' provenance."""
    started = time.perf_counter()
    items = voxelized_source(loaded, source, limit=limit)
    good = [it for it in items if "density" in it]
    _warn_unknown_elements(loaded, [it["structure"] for it in good])
    for it, predicted in zip(good, reconstruct_densities(loaded, [it["density"] for it in good], batch_size)):
        it.update(compare(predicted, it["structure"]))
        it["cif"] = predicted.to(fmt="cif") if predicted is not None else ""
        it["error"] = "" if predicted is not None else "no atoms decoded"
    rows = [{"cif": "", "error": "", **it} for it in items]
    valid = [r for r in rows if "density" in r]  # read and voxelized; the rest are rejected inputs
    metrics = {"source": str(source), "entries": len(rows), "rejected_inputs": len(rows) - len(valid),
               "first_rejection": first_rejection(rows),
               "decode_failures": sum(1 for r in valid if r["error"]), **summarize(valid),
               "seconds": round(time.perf_counter() - started, 2), "provenance": provenance(model_ref)}
    write_results(Path(out), rows, metrics)
    return metrics


def reconstruct_densities(loaded: LoadedModel, densities: list, batch_size: int = 32) -> list[Structure | None]:
    """Each density encoded and decoded again, in batches (the input's lattice serves box models)."""
    out: list[Structure | None] = []
    with tqdm(total=len(densities), desc="reconstruct", unit="crystal", disable=None) as bar:
        for start in range(0, len(densities), batch_size):
            part = densities[start : start + batch_size]
            out += decode_to_structures(loaded, encode(loaded, part), part, reconstructing=True)
            bar.update(len(part))
    return out


def unknown_elements(loaded: LoadedModel, structure: Structure) -> list[str]:
    """Symbols of the elements of `structure` the model was never trained on (none for a model that
    records no species)."""
    known = set(loaded.model_config.species)
    return sorted(el.symbol for el in structure.composition.elements if known and el.Z not in known)


def _warn_unknown_elements(loaded: LoadedModel, structures: list[Structure]) -> None:
    """Say so when crystals hold elements the model never saw: their reconstructions cannot match."""
    foreign = [unknown_elements(loaded, s) for s in structures]
    if any(foreign):
        elements = sorted({symbol for found in foreign for symbol in found})
        log.warning("%d of %d crystals hold elements this model was never trained on (%s%s); their "
                    "reconstructions cannot match", sum(map(bool, foreign)), len(structures), ", ".join(elements[:8]),
                    " ..." if len(elements) > 8 else "")
