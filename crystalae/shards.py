"""Preparing voxelized datasets: sharded Parquet (Arrow fixed-shape tensor columns) with a manifest.
`crystalae.dataset` reads what this writes.

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
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crystalae import uri_fs
from crystalae.config import StrictConfig, VoxelConfig, in_range
from crystalae.dataset import FORMAT, MANIFEST, DatasetError
from crystalae.parallel import default_workers, map_chunks
from crystalae.sources import Chunk, Entry, StructureError, load_structure, plan_chunks, read_chunk, reduce_cell
from crystalae.voxelize import VoxelizeError, rotation_matrix, voxelize

__all__ = ["PrepareOptions", "ShardTask", "build_shard", "prepare_dataset", "site_table", "split_of"]

PLAN = "prepare.json"
SHARDS_DIR = "shards"


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


def _schema(grid: int, max_atoms: int) -> pa.Schema:
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


def _voxelize_entries(indexed: list[tuple[int, Entry]], config: VoxelConfig, options: PrepareOptions
                      ) -> tuple[pa.Table, list[dict]]:
    """Voxelize one shard's entries; bad entries become reject records instead of errors."""
    from pymatgen.io.cif import CifWriter

    rows: dict[str, list] = {name: [] for name in _schema(config.grid, config.max_atoms).names}
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
        return _schema(config.grid, config.max_atoms).empty_table(), rejects
    rows["density"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(densities))
    rows["labels"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(labels))
    rows["sites"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(sites))
    return pa.Table.from_pydict(rows, schema=_schema(config.grid, config.max_atoms)), rejects


@dataclass(frozen=True)
class ShardTask:
    """Everything one process (or Ray task, on any node) needs to build shard `index` by itself."""

    index: int
    chunk: Chunk
    config: dict[str, Any]
    options: PrepareOptions
    out: str


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Read the chunk from its source, voxelize it, write the shard and then its record; returns the
    record. The same bytes come out wherever it runs."""
    table, rejects = _voxelize_entries(read_chunk(task.chunk), VoxelConfig.from_dict(task.config), task.options)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue().to_pybytes()
    name = f"shard-{task.index:05d}.parquet"
    uri_fs.write_bytes(uri_fs.join(task.out, SHARDS_DIR, name), data)
    record = {"file": name, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(),
              "rejects": rejects, "splits": dict(Counter(table.column("split").to_pylist()))}
    uri_fs.write_json(uri_fs.join(task.out, SHARDS_DIR, name.replace(".parquet", ".json")), record)
    return record


def prepare_dataset(
    source: str | Path | list,
    out: str | Path,
    config: VoxelConfig = VoxelConfig(),
    options: PrepareOptions = PrepareOptions(),
    *,
    workers: int | None = None,
    overwrite: bool = False,
    executor: Callable[[list[ShardTask]], Iterable[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Voxelize every structure of `source` into Parquet shards under `out` (a folder or an object
    storage URI).

    The source is streamed: one pass records where each shard's entries are, and each worker reads
    only its own shard's entries, so memory stays bounded by the shard size. `executor` builds the
    shard tasks instead of local worker processes, into the same bytes (e.g.
    `crystalae.ray_shards.on_ray(address)`: Ray Data tasks across a cluster). Resumes an interrupted
    run with the same settings; refuses a folder built with other settings unless `overwrite`.
    Structures that cannot be read or voxelized are rejected, not errors: `rejects.csv` names them.

    Args:
        source: a CSV, a folder of structure files, a structure file, `demo[:N]`, an object-storage URI
            of one of these, or a list of them (read as one source).
        out: the dataset folder or URI; `manifest.json` is written last, so a dataset is whole iff it has one.
        config: the voxelization settings.
        options: shard size, split fractions and entry limit.
        workers: local worker processes (default: all cores); unused with `executor`.
        overwrite: replace a dataset built with other settings.
        executor: builds the shard tasks elsewhere (see above).

    Returns:
        The manifest (also `out/manifest.json`): format, source, config, options, counts (entries,
        skipped, rejected, crystals, rows, splits), shards (file, rows, sha256) and the dataset hash.

    Raises:
        SourceError: no source given, a missing one, a folder without structure files, or a file that is
            not a source crystalae reads (an unknown format, a CSV without a `cif` column).
        DatasetError: one shard would not fit in memory (lower `shard_size`), or `out` holds another
            dataset (without `overwrite`) or other files.
    """
    _check_shard_memory(config, options)
    if not uri_fs.is_remote(out) and Path(out).exists() and not Path(out).is_dir():
        raise DatasetError(f"--out {out} is a file; give a folder for the dataset")
    try:  # before the source is read: a write would fail only after it, deep in the store's client
        uri_fs.check_bucket(out, "--out")
    except FileNotFoundError as missing:
        raise DatasetError(missing.strerror) from None
    chunks, kept, listed = plan_chunks(source, options.shard_size, options.limit)
    plan = {"format": FORMAT, "source": [str(p) for p in source] if isinstance(source, (list, tuple)) else str(source),
            "entries": kept, "skipped": listed - kept,
            "config": config.as_dict(), "options": options.as_dict()}
    _claim_folder(out, plan, overwrite)
    if not uri_fs.is_remote(out):
        for stale in (Path(out) / SHARDS_DIR).glob(".shard-*.tmp"):  # left by a run killed mid-write
            stale.unlink()
    records = _shard_records(out, len(chunks))
    # an absolute folder: Ray tasks on other nodes do not share this process's working directory
    where = str(uri_fs.absolute(out))
    tasks = [ShardTask(k, chunks[k], config.as_dict(), options, where) for k in records if records[k] is None]
    sizes = [sum(piece.count for piece in task.chunk) for task in tasks]
    if executor is not None:
        built = executor(tasks)
    else:
        built = map_chunks(build_shard, tasks, workers or default_workers(), "voxelize", sizes=sizes)
    for task, record in zip(tasks, built):
        records[task.index] = record
    return _finish(out, plan, [records[k] for k in range(len(chunks))])


MAX_SHARD_BYTES = 2 * 2**30  # a shard is built in memory before it is written


def _check_shard_memory(config: VoxelConfig, options: PrepareOptions) -> None:
    """Refuse settings whose shards would not fit in memory, naming the options that set the size."""
    rows = options.shard_size * (max(1, config.rotations) if config.representation == "box" else 1)
    size = rows * config.grid**3 * 5  # float32 density + uint8 labels per voxel
    if size > MAX_SHARD_BYTES:
        raise DatasetError(f"one shard would hold {rows} grids of {config.grid}^3 voxels ({size / 2**30:.1f} GiB "
                           f"in memory, limit {MAX_SHARD_BYTES / 2**30:.0f} GiB): lower --shard-size"
                           + (", --rotations" if config.representation == "box" else "") + " or --grid")


def _claim_folder(out: str | Path, plan: dict, overwrite: bool) -> None:
    plan_path = uri_fs.join(out, PLAN)
    if uri_fs.exists(plan_path):
        previous = uri_fs.read_json(plan_path)
        previous.setdefault("skipped", 0)  # folders prepared before the --limit count was recorded
        if previous == plan:
            return
        if not overwrite:
            raise DatasetError(f"{out} holds a dataset built with other settings "
                               f"(see {plan_path}); choose another --out or pass --overwrite")
        for name in (SHARDS_DIR, MANIFEST, "rejects.csv", PLAN):  # the dataset's own files, nothing else
            uri_fs.remove_tree(uri_fs.join(out, name))
    elif uri_fs.list_files(out) and not overwrite:
        raise DatasetError(f"{out} is not empty and holds no crystalae dataset; choose another --out")
    uri_fs.write_json(plan_path, plan)


def _shard_records(out: str | Path, count: int) -> dict[int, dict | None]:
    """Each shard's record, None where the shard is unfinished (its record is written after its Parquet
    file, so a shard is done iff both exist); one listing, not a request per shard."""
    present = {name for name, _ in uri_fs.list_files(uri_fs.join(out, SHARDS_DIR))}
    records: dict[int, dict | None] = {}
    for k in range(count):
        done = {f"shard-{k:05d}.json", f"shard-{k:05d}.parquet"} <= present
        records[k] = uri_fs.read_json(uri_fs.join(out, SHARDS_DIR, f"shard-{k:05d}.json")) if done else None
    return records


def _finish(out: str | Path, plan: dict, records: list[dict]) -> dict[str, Any]:
    rejects = [r for rec in records for r in rec["rejects"]]
    splits: Counter[str] = Counter()
    for rec in records:
        if "splits" in rec:
            splits.update(rec["splits"])
        else:  # shards built before records counted their splits
            splits.update(pq.read_table(uri_fs.join(out, SHARDS_DIR, rec["file"]), columns=["split"])
                          .column("split").to_pylist())
    shards = [{"file": f"{SHARDS_DIR}/{rec['file']}", "rows": rec["rows"], "sha256": rec["sha256"]} for rec in records]
    manifest = {
        **plan,
        "counts": {"entries": plan["entries"], "skipped": plan["skipped"], "rejected": len(rejects),
                   "crystals": plan["entries"] - len(rejects),
                   "rows": sum(rec["rows"] for rec in records), "splits": dict(splits)},
        "shards": shards,
        "dataset_hash": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["index", "material_id", "reason"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rejects, key=lambda r: r["index"]))
    uri_fs.write_text(uri_fs.join(out, "rejects.csv"), buffer.getvalue())
    uri_fs.write_json(uri_fs.join(out, MANIFEST), manifest)  # last: its presence means the dataset is whole
    return manifest
