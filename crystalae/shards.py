"""Voxelized datasets as sharded Parquet (Arrow fixed-shape tensor columns) with a manifest.

Layout of a dataset folder:
    prepare.json            what is being built (source, config, shard size); checked on resume
    shards/shard-NNNNN.parquet + shard-NNNNN.json   one unit of work; the .json (rows, sha256,
                            rejects) is written after the .parquet, so a shard is done iff both exist
    manifest.json, rejects.csv   written last, from the shard records
Every file is written atomically, so a killed run rerun picks up where it stopped and the shards come
out byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crystalae.config import StrictConfig, VoxelConfig, in_range
from crystalae.files import atomic_write, sha256_file, write_json, write_text
from crystalae.parallel import default_workers, map_chunks
from crystalae.sources import Entry, StructureError, list_entries, load_structure, reduce_cell
from crystalae.voxelize import VoxelizeError, rotation_matrix, voxelize

FORMAT = "crystalae-shards/2"  # 2: per-atom `sites` column
MANIFEST = "manifest.json"  # written last: a dataset folder is finished iff it holds this


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or was built with other settings."""


@dataclass(frozen=True)
class PrepareOptions(StrictConfig):
    shard_size: int = 256  # crystals per shard (box rotations multiply the rows)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    limit: int | None = None  # use only the first N entries of the source

    def problems(self) -> list[str | None]:
        return [
            in_range(self, "shard_size", 1, 100_000),
            in_range(self, "val_fraction", 0, 1),
            in_range(self, "test_fraction", 0, 1),
            None if self.val_fraction + self.test_fraction < 1 else
            f"val_fraction + test_fraction must leave a train split (< 1), got {self.val_fraction + self.test_fraction}",
            None if self.limit is None or self.limit >= 1 else f"limit must be >= 1, got {self.limit}",
        ]


def split_of(material_id: str, val_fraction: float, test_fraction: float) -> str:
    """Stable split from a hash of the id: the same crystal lands in the same split on every run."""
    u = int.from_bytes(hashlib.sha256(material_id.encode()).digest()[:8], "little") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def schema(grid: int, max_atoms: int) -> pa.Schema:
    shape = (grid, grid, grid)
    return pa.schema([
        ("material_id", pa.string()),
        ("rotation", pa.int16()),
        ("split", pa.string()),
        ("n_atoms", pa.int32()),
        ("composition", pa.string()),
        ("cif", pa.string()),
        ("lattice", pa.list_(pa.float64(), 9)),
        ("origin", pa.list_(pa.float64(), 3)),
        ("density", pa.fixed_shape_tensor(pa.float32(), shape)),
        ("labels", pa.fixed_shape_tensor(pa.uint8(), shape)),
        ("sites", pa.fixed_shape_tensor(pa.float32(), (max_atoms, 4))),
    ])


def site_table(structure, max_atoms: int) -> np.ndarray:
    """(max_atoms, 4) float32: fractional position in [0, 1) and Z per atom; rows past the atoms are 0."""
    table = np.zeros((max_atoms, 4), dtype=np.float32)
    table[: len(structure), :3] = np.mod(structure.frac_coords, 1.0)
    table[: len(structure), 3] = [site.specie.Z for site in structure]
    return table


def voxelize_chunk(task: tuple[list[tuple[int, Entry]], dict, PrepareOptions]) -> tuple[pa.Table, list[dict]]:
    """Voxelize one shard's entries; bad entries become reject records instead of errors."""
    from pymatgen.io.cif import CifWriter

    indexed, config_dict, options = task
    config = VoxelConfig.from_dict(config_dict)
    rows: dict[str, list] = {name: [] for name in schema(config.grid, config.max_atoms).names}
    densities, labels, sites, rejects = [], [], [], []
    for index, entry in indexed:
        try:
            structure = reduce_cell(load_structure(entry), config.reduce)
            count = max(1, config.rotations) if config.representation == "box" else 1
            grids = [voxelize(structure, config, rotation_matrix(config, entry.material_id, r)) for r in range(count)]
        except (StructureError, VoxelizeError) as exc:
            rejects.append({"index": index, "material_id": entry.material_id, "reason": str(exc)})
            continue
        except Exception as exc:  # one odd input must never cost the rest of the dataset
            rejects.append({"index": index, "material_id": entry.material_id,
                            "reason": f"unexpected {type(exc).__name__}" + (f": {exc}" if str(exc) else "")})
            continue
        cif = str(CifWriter(structure))
        for r, d in enumerate(grids):
            rows["material_id"].append(entry.material_id)
            rows["rotation"].append(r)
            rows["split"].append(split_of(entry.material_id, options.val_fraction, options.test_fraction))
            rows["n_atoms"].append(len(structure))
            rows["composition"].append(structure.composition.formula)
            rows["cif"].append(cif)
            rows["lattice"].append(d.lattice.ravel().tolist())
            rows["origin"].append(d.origin.tolist())
            densities.append(d.values)
            labels.append(d.labels)
            sites.append(site_table(structure, config.max_atoms))
    if not densities:
        return schema(config.grid, config.max_atoms).empty_table(), rejects
    rows["density"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(densities))
    rows["labels"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(labels))
    rows["sites"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(sites))
    return pa.Table.from_pydict(rows, schema=schema(config.grid, config.max_atoms)), rejects


def prepare_dataset(
    source: str | Path | list,
    out: str | Path,
    config: VoxelConfig = VoxelConfig(),
    options: PrepareOptions = PrepareOptions(),
    workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Voxelize every structure of `source` into Parquet shards under `out`; returns the manifest.

    Resumes an interrupted run with the same settings; refuses a folder built with other settings
    unless `overwrite`.
    """
    out = Path(out)
    check_shard_memory(config, options)
    entries = list_entries(source)
    listed = len(entries)
    entries = entries[: options.limit]  # None keeps all
    plan = {"format": FORMAT, "source": [str(p) for p in source] if isinstance(source, (list, tuple)) else str(source),
            "entries": len(entries), "skipped": listed - len(entries),
            "config": config.as_dict(), "options": options.as_dict()}
    _claim_folder(out, plan, overwrite)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob(".shard-*.tmp"):  # left by a run killed mid-write
        stale.unlink()

    indexed = list(enumerate(entries))
    chunks = [indexed[i : i + options.shard_size] for i in range(0, len(indexed), options.shard_size)]
    todo = [k for k in range(len(chunks)) if _shard_record(shard_dir, k) is None]
    tasks = [(chunks[k], config.as_dict(), options) for k in todo]
    results = map_chunks(voxelize_chunk, tasks, workers or default_workers(), "voxelize",
                         sizes=[len(chunks[k]) for k in todo])
    for k, (table, rejects) in zip(todo, results):
        path = shard_dir / f"shard-{k:05d}.parquet"
        atomic_write(path, lambda tmp, table=table: pq.write_table(table, tmp, compression="zstd"))
        write_json(path.with_suffix(".json"), {"file": path.name, "rows": table.num_rows,
                                               "sha256": sha256_file(path), "rejects": rejects})
    return _finish(out, plan, [_shard_record(shard_dir, k) for k in range(len(chunks))])


MAX_SHARD_BYTES = 2 * 2**30  # a shard is built in memory before it is written


def check_shard_memory(config: VoxelConfig, options: PrepareOptions) -> None:
    """Refuse settings whose shards would not fit in memory, naming the options that set the size."""
    rows = options.shard_size * (max(1, config.rotations) if config.representation == "box" else 1)
    size = rows * config.grid**3 * 5  # float32 density + uint8 labels per voxel
    if size > MAX_SHARD_BYTES:
        raise DatasetError(f"one shard would hold {rows} grids of {config.grid}^3 voxels ({size / 2**30:.1f} GiB "
                           f"in memory, limit {MAX_SHARD_BYTES / 2**30:.0f} GiB): lower --shard-size"
                           + (", --rotations" if config.representation == "box" else "") + " or --grid")


def _claim_folder(out: Path, plan: dict, overwrite: bool) -> None:
    plan_path = out / "prepare.json"
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        previous.setdefault("skipped", 0)  # folders prepared before the --limit count was recorded
        if previous == plan:
            return
        if not overwrite:
            raise DatasetError(f"{out} holds a dataset built with other settings "
                               f"(see {plan_path}); choose another --out or pass --overwrite")
        shutil.rmtree(out / "shards", ignore_errors=True)
        for name in (MANIFEST, "rejects.csv", "prepare.json"):
            (out / name).unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"{out} is not empty and holds no crystalae dataset; choose another --out")
    write_json(plan_path, plan)


def _shard_record(shard_dir: Path, k: int) -> dict | None:
    record_path = shard_dir / f"shard-{k:05d}.json"
    parquet_path = shard_dir / f"shard-{k:05d}.parquet"
    if not (record_path.exists() and parquet_path.exists()):
        return None
    return json.loads(record_path.read_text())


def _finish(out: Path, plan: dict, records: list[dict]) -> dict[str, Any]:
    rejects = [r for rec in records for r in rec["rejects"]]
    splits: dict[str, int] = {}
    for rec in records:
        table = pq.read_table(out / "shards" / rec["file"], columns=["split"])
        for name in table.column("split").to_pylist():
            splits[name] = splits.get(name, 0) + 1
    shards = [{"file": f"shards/{rec['file']}", "rows": rec["rows"], "sha256": rec["sha256"]} for rec in records]
    manifest = {
        **plan,
        "counts": {"entries": plan["entries"], "skipped": plan["skipped"], "rejected": len(rejects),
                   "crystals": plan["entries"] - len(rejects),
                   "rows": sum(rec["rows"] for rec in records), "splits": splits},
        "shards": shards,
        "dataset_hash": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["index", "material_id", "reason"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rejects, key=lambda r: r["index"]))
    write_text(out / "rejects.csv", buffer.getvalue())
    write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise DatasetError(f"{folder} has no manifest.json: not a finished crystalae dataset "
                           "(run `crystalae data prepare` first, or rerun it to finish)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def shard_paths(folder: str | Path) -> list[Path]:
    manifest = read_manifest(folder)
    return [Path(folder) / s["file"] for s in manifest["shards"]]


def read_table(folder: str | Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows of a dataset (optionally one split) as one Arrow table."""
    needed = None if columns is None else list(dict.fromkeys([*columns, *(["split"] if split else [])]))
    table = pa.concat_tables([pq.read_table(p, columns=needed) for p in shard_paths(folder)])
    if split is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("split"), split))
    return table if columns is None else table.select(columns)


def column_numpy(table: pa.Table, name: str) -> np.ndarray:
    """One column as a numpy array: tensor columns (density, labels, sites) keep their shape, list
    columns (lattice, origin) become float64 rows."""
    column = table.column(name).combine_chunks()
    if name in ("density", "labels", "sites"):
        return column.to_numpy_ndarray()
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float64)


def config_of(folder: str | Path) -> VoxelConfig:
    return VoxelConfig.from_dict(read_manifest(folder)["config"])
