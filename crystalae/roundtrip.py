"""crystal -> density -> crystal with no learning: how much of a dataset the representation keeps."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from crystalae.config import VoxelConfig
from crystalae.decode import SPECIES_SOURCES, DecodeError, decode
from crystalae.files import write_json, write_text
from crystalae.metrics import compare, summarize
from crystalae.parallel import default_workers, map_chunks
from crystalae.provenance import provenance
from crystalae.sources import Entry, StructureError, list_entries, load_structure, reduce_cell
from crystalae.voxelize import VoxelizeError, rotation_matrix, voxelize

__all__ = ["details_path", "first_rejection", "metrics_path", "roundtrip", "write_results"]


def _roundtrip_chunk(task: tuple[list[tuple[int, Entry]], dict, str]) -> list[dict[str, Any]]:
    """Voxelize, decode and score each entry of a chunk; failures become rows with a reason."""
    indexed, config_dict, species = task
    config = VoxelConfig.from_dict(config_dict)
    rows = []
    for index, entry in indexed:
        row: dict[str, Any] = {"index": index, "material_id": entry.material_id, "cif": "", "error": ""}
        try:
            true = reduce_cell(load_structure(entry), config.reduce)
            density = voxelize(true, config, rotation_matrix(config, entry.material_id, 0))
        except (StructureError, VoxelizeError) as exc:
            rows.append({**row, "error": f"input rejected: {exc}", "valid_input": False})
            continue
        predicted = None
        try:
            predicted = decode(density, species_source=species, composition=true.composition)
            row["cif"] = predicted.to(fmt="cif")
        except DecodeError as exc:
            row["error"] = str(exc)
        rows.append({**row, **compare(predicted, true), "valid_input": True})
    return rows


def roundtrip(
    source: str | Path,
    out: str | Path,
    config: VoxelConfig = VoxelConfig(),
    *,
    species: str = "labels",
    workers: int | None = None,
    limit: int | None = None,
    chunk_size: int = 64,
) -> dict[str, Any]:
    """Write OUT (material_id,cif), OUT.details.csv and OUT.metrics.json; return the metrics."""
    if species not in SPECIES_SOURCES:
        raise ValueError(f"species must be one of {SPECIES_SOURCES}, got {species!r}")
    out = Path(out)
    started = time.perf_counter()
    indexed = list(enumerate(list_entries(source, limit=limit)))
    chunks = [(indexed[i : i + chunk_size], config.as_dict(), species) for i in range(0, len(indexed), chunk_size)]
    rows = [row for chunk_rows in map_chunks(_roundtrip_chunk, chunks, workers or default_workers(),
                                              "roundtrip", sizes=[len(c[0]) for c in chunks])
            for row in chunk_rows]
    valid = [r for r in rows if r["valid_input"]]
    metrics = {
        "source": str(source), "config": config.as_dict(), "species": species,
        "entries": len(rows), "rejected_inputs": len(rows) - len(valid), "first_rejection": first_rejection(rows),
        "decode_failures": sum(1 for r in valid if r["error"]),
        **summarize(valid), "seconds": round(time.perf_counter() - started, 2), "provenance": provenance(),
    }
    write_results(out, rows, metrics)
    return metrics


def first_rejection(rows: list[dict[str, Any]]) -> str | None:
    """"ID: reason" of the first input that was refused before scoring (rows without a density, or
    marked invalid), or None."""
    rejected = (r for r in rows if not r.get("valid_input", "density" in r))
    return next((f"{r['material_id']}: {r['error']}" for r in rejected), None)


def write_results(out: Path, rows: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """OUT (material_id,cif; empty cif where decoding failed), OUT.details.csv, OUT.metrics.json."""
    write_text(out, _csv(rows, ["material_id", "cif"]))
    write_text(details_path(out), _csv(rows, ["material_id", "match", "rms", "composition_ok", "count_ok", "error"]))
    write_json(metrics_path(out), metrics)


def details_path(out: Path) -> Path:
    return out.with_name(out.stem + ".details.csv")


def metrics_path(out: Path) -> Path:
    return out.with_name(out.stem + ".metrics.json")


def _csv(rows: list[dict], fields: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
