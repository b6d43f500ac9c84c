"""Configuration as data: `VoxelConfig` (stored in every shard manifest and checkpoint), `TrainConfig`, the
generation defaults, and `StrictConfig`, the frozen dataclasses that check themselves (with the renamed fields
still read)."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeVar

__all__ = [
    "GENERATE_DEFAULTS", "GenerateDefaults", "RENAMED_FIELDS", "TrainConfig", "current_names", "ConfigError",
    "MAX_Z", "NAME", "Objective", "StrictConfig", "VoxelConfig", "blank_problem", "check_finite", "check_name",
    "check_whole", "field_names", "grid_problem", "in_range", "is_score", "searchable", "set_by",
]

log = logging.getLogger(__name__)

#: configuration fields that were renamed: old name -> new name. The old names are still read (with a
#: one-line deprecation message where a user wrote them) until crystalae 1.0.
RENAMED_FIELDS = {"seg_weight": "species_weight"}

Representation = Literal["cell", "box"]
BoxMode = Literal["unit_cell", "lattice"]
Reduction = Literal["niggli", "lll", "none"]


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # whole name (fullmatch: `$` would allow "x\n")
MAX_Z = 103  # highest Z with a tabulated atomic radius; labels are stored as uint8
MAX_GRID = 128  # voxels per edge; one float32 grid of 128^3 is 8 MiB, a batch of them far more


def searchable(default: Any) -> Any:
    """A field a sweep may search over (listed in a sweep's `search_space`)."""
    return dataclasses.field(default=default, metadata={"searchable": True})


def set_by(default: Any, owner: str) -> Any:
    """A field filled in by `owner` (the dataset, the sweep budget, ...), never by a user's override."""
    return dataclasses.field(default=default, metadata={"set_by": owner})


def field_names(cls: Any, searchable: bool | None = None, settable: bool | None = None) -> set[str]:
    """Field names of a config class, filtered by the roles above."""
    return {f.name for f in fields(cls)
            if (searchable is None or bool(f.metadata.get("searchable")) == searchable)
            and (settable is None or ("set_by" not in f.metadata) == settable)}


class ConfigError(ValueError):
    """A configuration value has the wrong type or is out of range (the message names the field)."""


def check_name(name: Any, what: str = "name") -> str:
    """Names become folder names: letters, digits, '_', '-', '.' only, no path traversal."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"invalid {what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
                          "starting with a letter or digit")
    return name


def check_whole(value: Any, what: str, low: int, high: int) -> int:
    """`value` as a whole number in [low, high] (not a bool, not 2.5), for the Python API's counts and
    seeds, whose CLI options are bounded the same way; else a ValueError naming `what`."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{what} must be a whole number in {low:,}..{high:,}, got {value!r}")
    return int(value)


def check_finite(value: Any, what: str, low: float, high: float) -> float:
    """`value` as a real number in [low, high] (NaN and inf refused); else a ValueError naming `what`."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise ValueError(f"{what} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def blank_problem(value: Any, what: str, example: str = "sqlite:///mlflow.db") -> str | None:
    """A problem message when an optional text setting is given but empty (`--mlflow ''`, `mlflow: ''`):
    left as is, an empty tracking URI would turn tracking off without a word."""
    if isinstance(value, str) and not value.strip():
        return f"{what} is empty: give a value (e.g. {example}) or leave it out"
    return None


_T = TypeVar("_T")


def is_score(value: Any) -> bool:
    """A metric value that can rank checkpoints: a real number (not a bool), and not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass(frozen=True)
class Objective:
    """A metric to rank checkpoints by, and whether lower ("min") or higher ("max") is better."""
    metric: str
    mode: str  # "min" or "max"

    def best(self, items: Iterable[_T], value: Callable[[_T], Any]) -> _T | None:
        """The item whose `value(item)` is best: the one rule for "best" (the checkpoints of a training run,
        of a trial, of a sweep). A value that is not a number (missing, None, NaN) never counts; of equal
        values the item listed first wins, so callers list items in the order they reached their value.

        Returns:
            The best item, or None when no item has a numeric value.
        """
        scored = [item for item in items if is_score(value(item))]
        return (min if self.mode == "min" else max)(scored, key=value) if scored else None

    def at_least_as_good(self, a: float, b: float) -> bool:
        return a <= b if self.mode == "min" else a >= b

    @classmethod
    def parse(cls, text: str, known: list[Objective]) -> Objective:
        """`METRIC[:MODE]`; the mode may be left out for one of the `known` objectives' metrics.

        Raises:
            ValueError: no mode given, and `known` has no objective on that metric.
        """
        metric, _, mode = text.partition(":")
        if not mode:
            mode = next((o.mode for o in known if o.metric == metric), "")
        if mode not in ("min", "max"):
            raise ValueError(f"{text!r}: give the mode as METRIC:min or METRIC:max")
        return cls(metric, mode)


def grid_problem(grid: int) -> str | None:
    """Why a grid size is refused, from what one batch of such grids would cost in memory."""
    if grid < 4:
        return f"grid must be >= 4, got {grid}"
    if grid > MAX_GRID:
        gib = 16 * 5 * grid**3 / 2**30  # a batch of 16 density (float32) + label (uint8) grids
        return (f"grid {grid} is above the limit of {MAX_GRID} voxels per edge "
                f"(a batch of 16 such grids alone needs {gib:,.1f} GiB)")
    return None


def current_names(data: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """`data` with renamed fields (`RENAMED_FIELDS`) under their new names. `where` (a file or section a
    user wrote) gets one deprecation line per old name; records crystalae wrote itself are read silently."""
    old = [k for k in data if k in RENAMED_FIELDS]
    for key in old:
        if RENAMED_FIELDS[key] in data:
            raise ConfigError(f"{where or 'config'}: {key!r} and {RENAMED_FIELDS[key]!r} are one field; give only "
                              f"{RENAMED_FIELDS[key]!r}")
        if where is not None:
            log.warning("%s: %r is now called %r (the old name is read until crystalae 1.0)", where, key,
                        RENAMED_FIELDS[key])
    return {RENAMED_FIELDS.get(k, k): v for k, v in data.items()} if old else data


class StrictConfig:
    """Frozen config dataclasses that check themselves: field types (from the annotations), then the
    ranges in `problems()`; `as_dict` / strict `from_dict` (unknown keys raise)."""

    def __post_init__(self) -> None:
        problems = _type_problems(self)
        if not problems:
            problems = [p for p in self.problems() if p]
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> list[str | None]:
        """Range and consistency problems (types are already checked)."""
        return []

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any):
        """Strict: unknown keys raise, so a typo never silently falls back to a default."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} must be a mapping of field: value, got {type(data).__name__}")
        data = current_names(data)  # checkpoints and sweep records written before a rename
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {sorted(map(str, unknown))}")
        return cls(**data)


def in_range(config: Any, name: str, low: float | None = None, high: float | None = None,
             low_open: bool = False) -> str | None:
    """A problem message when `config.name` is outside [low, high] ((low, high] with `low_open`)."""
    value = getattr(config, name)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lower = "" if low is None else f"{'>' if low_open else '>='} {low}"
        upper = "" if high is None else f"<= {high}"
        return f"{name} must be {' and '.join(b for b in (lower, upper) if b)}, got {value}"
    return None


def _type_problems(config: Any) -> list[str]:
    """Check (and normalise: int -> float, list -> tuple) every field against its annotation."""
    hints = typing.get_type_hints(type(config))
    problems = []
    for f in fields(config):
        ok, value = _conform(getattr(config, f.name), hints[f.name])
        if ok:
            object.__setattr__(config, f.name, value)
        else:
            problems.append(f"{f.name} must be {_describe(hints[f.name])}, got {getattr(config, f.name)!r}")
    return problems


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args and type(value) in {type(a) for a in args}, value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, conformed = _conform(value, option)
            if ok:
                return True, conformed
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        parts = [_conform(v, args[0]) for v in value]
        return all(ok for ok, _ in parts), tuple(v for _, v in parts)
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value), float(value) if number else value
    if hint is str:
        return isinstance(value, str), value
    return True, value  # dicts and other free-form fields are checked by their owner


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}s"
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


@dataclass(frozen=True)
class VoxelConfig(StrictConfig):
    """How a crystal becomes a density grid.

    `cell` grids the unit cell in fractional coordinates (periodic, lattice kept alongside): the
    representation that makes exact recovery possible. `box` is the paper's fixed Cartesian cube.
    """

    representation: Representation = "cell"
    grid: int = 32  # voxels per edge
    # Å. The paper used 1.0 in a 10 Å box; 0.5 keeps C-C bonds (1.4 Å = 2.8 sigma) as separate peaks.
    sigma: float = searchable(0.5)
    element_sigma: bool = searchable(False)  # scale sigma by the element's atomic radius relative to carbon's
    box_size: float = 10.0  # Å, edge of the `box` cube
    box_mode: BoxMode = "unit_cell"  # one centred unit cell, or the repeating lattice filling the box
    rotations: int = 0  # random rotations per crystal (box only); 0 keeps the crystal unrotated
    label_radius: float = searchable(0.65)  # Å, voxels this close to an atom carry its atomic number (paper)
    cutoff_sigmas: float = 5.0  # Gaussians are summed out to this many sigma (exp(-12.5) ~ 4e-6)
    reduce: Reduction = "niggli"  # cell reduction applied before voxelizing
    seed: int = 0  # rotations are drawn from (seed, material_id, rotation index)
    # Crystals with more atoms are rejected (with the reason): bounds decode memory, and the stored
    # per-atom table (`sites`: fractional position + Z, zero-padded) has this fixed length.
    max_atoms: int = 64

    def problems(self) -> list[str | None]:
        return [
            grid_problem(self.grid),
            in_range(self, "sigma", 0, 5, low_open=True),
            in_range(self, "box_size", 0, 200, low_open=True),
            in_range(self, "rotations", 0, 1000),
            in_range(self, "label_radius", 0, 5, low_open=True),
            in_range(self, "max_atoms", 1, 1024),
            in_range(self, "cutoff_sigmas", 2, 10),
            in_range(self, "seed", 0),
        ]


@dataclass(frozen=True)
class TrainConfig(StrictConfig):
    """Optimisation and loss weights; model architecture lives in ModelConfig."""

    epochs: int = set_by(20, "sweep budget")  # (in a sweep; `crystalae train` takes it directly)
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    beta: float = 1e-3  # KL weight (KL is averaged over latent dims, reconstruction over voxels)
    species_weight: float = 1.0  # lambda: species cross-entropy (segmenter voxels or site-head atoms)
    lattice_weight: float = 1.0
    count_weight: float = 1.0  # cross-entropy of the atom-count head (models with count_head)
    # Divide the reconstruction MSE by the batch's mean squared density, so its weight against the KL,
    # species and lattice terms does not depend on the elements (carbon peaks are ~10x lower than Pb's).
    recon_normalize: bool = True
    background_weight: float = 0.1  # class weight of empty voxels in the cross-entropy
    workers: int = set_by(1, "sweep resources")  # Ray Train workers (data parallel)
    use_gpu: bool = set_by(False, "sweep resources")
    amp: bool = True  # mixed precision (bf16) when on GPU; ignored on CPU
    # torch threads (= CPUs Ray reserves) per worker; 0: the machine's cores / workers
    threads: int = set_by(0, "sweep resources")
    seed: int = 0
    keep_checkpoints: int = 2  # best k by the score metric
    # Clip the gradients' global norm to this before each step (None: no clipping). A carbon_24 retrain
    # at a peak lr of 1.8e-3 blew up in one epoch (every loss term x10-30) and never came back.
    grad_clip: float | None = None
    eval_limit: int = 64  # validation crystals decoded end to end per epoch (StructureMatcher is slow)
    # learning rate: "cosine" (linear warm-up, cosine decay to min_lr) or "constant"
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.5
    min_lr: float = 1e-5
    # Augmentation of training batches (cell grids): a random whole-voxel periodic shift, which is
    # exact, and, with probability `substitute`, each element replaced by a dataset element sharing an
    # oxidation state, re-voxelized, so species are read from peak heights, not recalled from combinations.
    shift: bool = True
    substitute: float = 0.5
    # Each training crystal described with its lattice vectors in a random order (the grid's axes
    # permuted to match): the same crystal, so six views of every cell for heads that overfit a few
    # thousand cells (carbon_24's lattice and count heads).
    permute_axes: bool = False
    negatives: int = 8  # random empty positions per crystal that teach the site head "no atom here"
    # Site-head targets spread over elements of nearby Z (Gaussian, this many Z units; 0 = one-hot), so
    # rare elements learn from their neighbours; plus a Z regression term of this weight.
    species_smoothing: float = 1.5
    z_weight: float = 1.0
    # Keep each worker's decoded share of the training shards in memory after the first epoch: without
    # it every epoch re-reads the Parquet files (one at a time). Turn off when a share exceeds memory.
    cache_dataset: bool = True
    # Start from a trained model (a checkpoint path or a shipped or registry name): its architecture and
    # every weight whose name and shape fit. With `reader_only` a new species reader (segmenter or site
    # head) learns on the model's VAE, which stays fixed, so two readers can be compared on one VAE.
    init_from: str | None = None
    reader_only: bool = False

    def problems(self) -> list[str | None]:
        positive = {"epochs": 100_000, "batch_size": 4096, "workers": 1024, "keep_checkpoints": 1000}
        non_negative = {"weight_decay": 1.0, "beta": None, "species_weight": None, "lattice_weight": None,
                        "count_weight": None, "background_weight": None, "threads": 1024, "seed": None,
                        "eval_limit": 100_000, "warmup_epochs": None, "min_lr": None, "negatives": 1024,
                        "species_smoothing": 100.0, "z_weight": None}
        return [
            None if self.grad_clip is None else in_range(self, "grad_clip", 0, low_open=True),
            *(in_range(self, k, 1, high) for k, high in positive.items()),
            *(in_range(self, k, 0, high) for k, high in non_negative.items()),
            in_range(self, "lr", 0, 10, low_open=True),
            in_range(self, "substitute", 0, 1),
            None if self.init_from or not self.reader_only else
            "reader_only needs init_from: the trained model whose VAE the new reader reads",
        ]

    def resolved(self) -> TrainConfig:
        """`threads` 0 made concrete: this machine's cores shared among the workers."""
        if self.threads:
            return self
        return replace(self, threads=max(1, (os.cpu_count() or 1) // self.workers))


@dataclass(frozen=True)
class GenerateDefaults:
    """The defaults of `crystalae generate`, the API's `CrystalModel` methods and the dashboard's Generate
    page: one set, so the same call gives the same crystals everywhere."""

    seed: int = 0  # fixed, not fresh: a rerun reproduces its crystals
    interpolate_steps: int = 5  # crystals along an interpolation, both ends included
    alter_scale: float = 0.5  # latent noise (in units of the unit Gaussian) of an altered crystal
    alter_count: int = 4  # variants of an altered crystal


GENERATE_DEFAULTS = GenerateDefaults()
