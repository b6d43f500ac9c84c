"""Reading a prepared dataset (`crystalae.shards` writes it): the manifest, the Parquet shards as
Arrow tables and numpy arrays, and the torch batches training and evaluation consume.

torch is imported only where batches are made, so reading a manifest or a table stays light (the
dataset preparation, the sweep results reader and the dashboard import this module too).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crystalae import uri_fs
from crystalae.config import VoxelConfig
from crystalae.files import sha256_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT", "MANIFEST", "DatasetError", "WorkerShare", "column_numpy", "config_of", "dataset_species",
    "local_dataset", "prefetched", "read_manifest", "read_table", "table_batches",
]

FORMAT = "crystalae-shards/2"  # 2: per-atom `sites` column
MANIFEST = "manifest.json"  # written last: a dataset folder is finished iff it holds this
BATCH_COLUMNS = ("density", "labels", "lattice", "sites")  # what a training batch holds


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or was built with other settings."""


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = uri_fs.join(folder, MANIFEST)
    if not uri_fs.exists(path):
        raise DatasetError(f"{folder} has no manifest.json: not a finished crystalae dataset "
                           "(run `crystalae data prepare` first, or rerun it to finish)")
    manifest = uri_fs.read_json(path)
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def config_of(folder: str | Path) -> VoxelConfig:
    return VoxelConfig.from_dict(read_manifest(folder)["config"])


def local_dataset(folder: str | Path) -> Path:
    """A local folder holding the dataset: the folder itself, or for an object-storage URI a cached
    copy (downloaded once per machine; each shard is checked against the manifest's sha256)."""
    if not uri_fs.is_remote(folder):
        return Path(folder)
    manifest = read_manifest(folder)
    wanted = {MANIFEST, *(s["file"] for s in manifest["shards"])}
    local = uri_fs.download(folder, uri_fs.cache_for(folder), include=lambda name: name in wanted)
    for shard in manifest["shards"]:
        path = local / shard["file"]
        stat = path.stat()
        seen = (str(path), stat.st_size, stat.st_mtime_ns, shard["sha256"])
        if seen in _VERIFIED:  # a training start reads one dataset several times: hash each file once
            continue
        if sha256_file(path) != shard["sha256"]:
            raise DatasetError(f"{folder}/{shard['file']}: its sha256 differs from the manifest's "
                               "(changed after the dataset was published?)")
        _VERIFIED.add(seen)
    return local


_VERIFIED: set[tuple[str, int, int, str]] = set()  # cached shards this process has checked, as they were


def _shard_paths(folder: str | Path) -> list[Path]:
    folder = local_dataset(folder)
    return [folder / s["file"] for s in read_manifest(folder)["shards"]]


def read_table(folder: str | Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All rows of a dataset (optionally one split) as one Arrow table."""
    needed = None if columns is None else list(dict.fromkeys([*columns, *(["split"] if split else [])]))
    table = pa.concat_tables([pq.read_table(p, columns=needed) for p in _shard_paths(folder)])
    if split is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("split"), split))
    return table if columns is None else table.select(columns)


def column_numpy(table: pa.Table, name: str) -> np.ndarray:
    """One column as a writable numpy array: tensor columns (density, labels, sites) keep their shape, list
    columns (lattice, origin) become float64 rows."""
    column = table.column(name).combine_chunks()
    if name in ("density", "labels", "sites"):
        # a copy: Arrow's buffer is read-only, and torch.from_numpy warns on (and must not write to) one
        return np.array(column.to_numpy_ndarray())
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float64)


def dataset_species(data: str | Path) -> tuple[int, ...]:
    """Sorted atomic numbers present anywhere in a prepared dataset (the segmenter's classes)."""
    from pymatgen.core import Composition

    formulas = set(read_table(data, columns=["composition"]).column("composition").to_pylist())
    return tuple(sorted({el.Z for f in formulas for el in Composition(f).elements}))


def table_batches(table: pa.Table, batch_size: int, columns=BATCH_COLUMNS) -> Iterator[dict[str, torch.Tensor]]:
    """Torch batches from an Arrow table (the plain, non-Ray data path)."""
    import torch

    if table.num_rows == 0:  # e.g. eval_limit 0: nothing to stack
        return
    arrays = {c: column_numpy(table, c) for c in columns if c in table.column_names}
    for start in range(0, table.num_rows, batch_size):
        yield {c: torch.from_numpy(a[start : start + batch_size]) for c, a in arrays.items()}


class WorkerShare:
    """One data-parallel worker's share of the train split, read straight from the Parquet shards.

    Row i of the split (in shard order) belongs to worker i % world, and every worker keeps the same
    number of rows, so all of them take the same number of steps (DDP all-reduces every step). Each
    epoch visits the shard files in a seeded order and shuffles rows within them; batches carry over
    file boundaries, so only the epoch's last batch is short. Only the worker's own rows are decoded,
    one file at a time (all of them kept in memory when `keep` is set).
    """

    def __init__(self, data: str | Path, rank: int, world: int, batch_size: int, keep: bool, seed: int = 0):
        self.files, self.rank, self.world = _shard_paths(data), rank, world
        self.batch_size, self.keep, self.seed = batch_size, keep, seed
        splits = [pq.read_table(f, columns=["split"]).column("split").to_numpy(zero_copy_only=False) for f in self.files]
        self.train_rows = [np.flatnonzero(s == "train") for s in splits]
        self.rows = sum(len(r) for r in self.train_rows) // world
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def _file_arrays(self, k: int, start: int) -> dict[str, np.ndarray]:
        """This worker's rows of shard file k, whose first train row has split index `start`."""
        if k in self._cache:
            return self._cache[k]
        mine = self.train_rows[k][(start + np.arange(len(self.train_rows[k]))) % self.world == self.rank]
        if not len(mine):
            return {}
        table = pq.read_table(self.files[k], columns=list(BATCH_COLUMNS)).take(mine)
        arrays = {c: column_numpy(table, c) for c in BATCH_COLUMNS if c in table.column_names}
        if self.keep:
            self._cache[k] = arrays
        return arrays

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        rng = np.random.default_rng([self.seed, self.rank, epoch])
        starts = np.concatenate([[0], np.cumsum([len(r) for r in self.train_rows])])
        left, pending = self.rows, None  # pending: fewer than batch_size rows carried to the next file
        for k in rng.permutation(len(self.files)):
            arrays = self._file_arrays(int(k), int(starts[k]))
            if not arrays or not left:
                continue
            rows = len(arrays["density"])
            order = rng.permutation(rows)[:min(left, rows)]
            left -= len(order)
            arrays = {c: a[order] for c, a in arrays.items()}
            if pending is not None:
                arrays = {c: np.concatenate([pending[c], a]) for c, a in arrays.items()}
            full = len(arrays["density"]) // self.batch_size * self.batch_size
            for begin in range(0, full, self.batch_size):
                yield {c: torch.from_numpy(a[begin:begin + self.batch_size]) for c, a in arrays.items()}
            pending = {c: a[full:] for c, a in arrays.items()}
        if pending is not None and len(pending["density"]):
            yield {c: torch.from_numpy(a) for c, a in pending.items()}


def prefetched(batches: Iterable[dict], prepare: Callable[[dict], dict] | None = None, background: bool = False,
               depth: int = 2) -> Iterator[dict]:
    """`batches` passed through `prepare` (augmentation). With `background` (on a GPU) a thread reads,
    augments and pins the next `depth` batches while the GPU computes, so the copies can overlap;
    on the CPU the work would only compete with the model for the same cores, so it stays in line."""
    if not background:
        for batch in batches:
            yield prepare(batch) if prepare is not None else batch
        return
    import queue
    import threading

    import torch

    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    pin = torch.cuda.is_available()

    def offer(item) -> bool:
        """Queue `item` unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                batch = prepare(batch) if prepare is not None else batch
                if not offer({k: v.pin_memory() for k, v in batch.items()} if pin else batch):
                    return
            offer(None)
        except BaseException as exc:  # raised again in the consumer, where the training loop sees it
            offer(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early (error or break): let the producer end
