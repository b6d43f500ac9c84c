"""Sweep configuration: a YAML file checked against typed dataclasses before Ray starts.

    name: demo
    data: {source: demo:160, grid: 16}           # VoxelConfig fields + split fractions
    search_space:                                # each key: a ModelConfig, TrainConfig or `sigma` field
      latent_dim: {type: categorical, values: [16, 32, 64]}
      sigma: {type: uniform, low: 0.4, high: 0.8}
      depth: {type: int, low: 1, high: 2}
      lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
    objective: {metric: val_score, mode: max}   # default: match rate + species/count tie-breakers
    budget: {trials: 4, epochs: 3, time_budget_s: 900}
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    max_concurrent: 2
    search: {algorithm: tpe, scheduler: asha, grace_period: 1, seed: 0}
    train: {batch_size: 8}                        # fixed TrainConfig values
    model: {seg_depth: 1}                         # fixed ModelConfig values
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from crystalae.config import VoxelConfig
from crystalae.models import ModelConfig
from crystalae.training import TrainConfig

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DISTRIBUTIONS = {"categorical", "uniform", "loguniform", "int"}
VOXEL_PARAMS = {"sigma", "element_sigma", "label_radius"}
MODEL_PARAMS = {f.name for f in fields(ModelConfig)} - {"grid", "periodic", "species", "n_classes", "lattice_head"}
TRAIN_PARAMS = {f.name for f in fields(TrainConfig)} - {"epochs", "workers", "use_gpu", "threads"}


class SweepConfigError(ValueError):
    """The sweep YAML is invalid (the message names the key and the reason)."""


def check_name(name: str, what: str = "name") -> str:
    """Names become folder names: letters, digits, '_', '-', '.' only, no path traversal."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise SweepConfigError(f"invalid {what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
                               "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None

    def to_tune(self):
        from ray import tune

        if self.type == "categorical":
            return tune.choice(list(self.values))
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high) + 1)  # inclusive upper bound, as written


@dataclass(frozen=True)
class SweepConfig:
    name: str
    data: dict[str, Any]
    search_space: tuple[Param, ...]
    # val_score (match rate, species and atom-count tie-breakers) compares trials of any sigma; val_loss does not
    objective_metric: str = "val_score"
    objective_mode: str = "max"
    trials: int = 4
    epochs: int = 3
    time_budget_s: float | None = None
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    max_concurrent: int = 2
    algorithm: str = "tpe"
    scheduler: str = "asha"
    grace_period: int = 1
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 2

    def voxel_config(self, sigma_overrides: dict[str, Any] | None = None) -> VoxelConfig:
        return VoxelConfig.from_dict({**_voxel_values(self.data), **(sigma_overrides or {})})

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["search_space"] = [dataclasses.asdict(p) for p in self.search_space]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepConfig":
        """Inverse of `as_dict` (the already-validated, flat form stored in sweep.json)."""
        space = tuple(Param(**{**p, "values": tuple(p["values"])}) for p in data["search_space"])
        return cls(**{**data, "search_space": space})


_SECTIONS = {
    "name": None, "data": None, "search_space": None, "train": None, "model": None, "max_concurrent": None,
    "objective": {"metric", "mode"},
    "budget": {"trials", "epochs", "time_budget_s"},
    "resources": {"workers_per_trial", "cpus_per_worker", "gpus_per_worker"},
    "search": {"algorithm", "scheduler", "grace_period", "seed", "max_failures"},
}


def load_sweep_config(path: str | Path, name: str | None = None) -> SweepConfig:
    import yaml

    path = Path(path)
    if not path.exists():
        raise SweepConfigError(f"sweep config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"{path}: not valid YAML: {exc}") from None
    if name is not None:
        raw["name"] = name
    return parse_sweep_config(raw, str(path))


def parse_sweep_config(raw: dict[str, Any], where: str = "sweep config") -> SweepConfig:
    def fail(message: str):
        raise SweepConfigError(f"{where}: {message}")

    if not isinstance(raw, dict):
        fail("top level must be a mapping")
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        fail(f"unknown keys {sorted(unknown)} (allowed: {sorted(_SECTIONS)})")
    flat: dict[str, Any] = {}
    for section, keys in _SECTIONS.items():
        if keys is None or section not in raw:
            continue
        value = raw[section] or {}
        if not isinstance(value, dict):
            fail(f"{section} must be a mapping")
        bad = set(value) - keys
        if bad:
            fail(f"unknown keys in {section}: {sorted(bad)} (allowed: {sorted(keys)})")
        flat.update({("objective_" + k if section == "objective" else k): v for k, v in value.items()})

    check_name(raw.get("name", ""), "sweep name") if "name" in raw else fail("missing `name`")
    data = dict(raw.get("data") or {})
    if "source" not in data:
        fail("data.source is required (a structure source such as demo:160 or a CSV path)")
    try:
        grid = VoxelConfig.from_dict(_voxel_values(data)).grid
    except (TypeError, ValueError) as exc:
        fail(f"data: {exc}")

    space = []
    for pname, spec in (raw.get("search_space") or {}).items():
        space.append(_param(pname, spec, fail))
    if not space:
        fail("search_space is empty")
    for section, allowed, cls in (("train", TRAIN_PARAMS, TrainConfig), ("model", MODEL_PARAMS, ModelConfig)):
        bad = set(raw.get(section) or {}) - allowed
        if bad:
            fail(f"unknown keys in {section}: {sorted(bad)} (see {cls.__name__})")
    for p in space:  # a depth the grid cannot halve that often would only fail inside a trial
        if p.name in ("depth", "seg_depth"):
            deepest = int(max(p.values) if p.type == "categorical" else p.high)
            if grid % 2**deepest:
                fail(f"search_space.{p.name}: depth {deepest} needs the grid ({grid}) divisible by {2**deepest}")
    for name in ("depth", "seg_depth"):
        fixed = (raw.get("model") or {}).get(name)
        if isinstance(fixed, int) and grid % 2**fixed:
            fail(f"model.{name}: depth {fixed} needs the grid ({grid}) divisible by {2**fixed}")
    config = SweepConfig(name=raw["name"], data=data, search_space=tuple(space),
                         train=dict(raw.get("train") or {}), model=dict(raw.get("model") or {}),
                         max_concurrent=int(raw.get("max_concurrent", 2)), **flat)
    if config.objective_mode not in ("min", "max"):
        fail(f"objective.mode must be min or max, got {config.objective_mode!r}")
    if config.algorithm not in ("tpe", "random"):
        fail(f"search.algorithm must be tpe or random, got {config.algorithm!r}")
    if config.scheduler not in ("asha", "fifo"):
        fail(f"search.scheduler must be asha or fifo, got {config.scheduler!r}")
    for key in ("trials", "epochs", "workers_per_trial", "cpus_per_worker", "max_concurrent", "grace_period"):
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
            fail(f"{key} must be a positive integer, got {getattr(config, key)!r}")
    return config


def _voxel_values(data: dict[str, Any]) -> dict[str, Any]:
    """The VoxelConfig fields of a `data` section (the rest names the source and the split)."""
    return {k: v for k, v in data.items() if k not in ("source", "val_fraction", "test_fraction")}


def _param(pname: str, spec: Any, fail) -> Param:
    if pname not in VOXEL_PARAMS | MODEL_PARAMS | TRAIN_PARAMS:
        fail(f"search_space.{pname}: not a tunable field (voxel: {sorted(VOXEL_PARAMS)}; "
             f"model: {sorted(MODEL_PARAMS)}; train: {sorted(TRAIN_PARAMS)})")
    if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
        fail(f"search_space.{pname}: needs `type` in {sorted(DISTRIBUTIONS)}")
    kind = spec["type"]
    extra = set(spec) - ({"type", "values"} if kind == "categorical" else {"type", "low", "high"})
    if extra:
        fail(f"search_space.{pname}: unexpected keys {sorted(extra)} for type {kind}")
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            fail(f"search_space.{pname}: categorical needs a non-empty `values` list")
        return Param(pname, kind, values=tuple(values))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        fail(f"search_space.{pname}: {kind} needs numeric `low` and `high`")
    if not low < high:
        fail(f"search_space.{pname}: low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        fail(f"search_space.{pname}: loguniform needs low > 0, got {low}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        fail(f"search_space.{pname}: int range needs integer bounds")
    return Param(pname, kind, low=float(low), high=float(high))
