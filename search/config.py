"""Sweep configuration: a YAML file checked against typed dataclasses before Ray starts.

    name: demo
    data: {source: demo:160, grid: 16}           # VoxelConfig fields + split fractions
    search_space:                                # each key: a ModelConfig, TrainConfig or `sigma` field
      latent_dim: {type: categorical, values: [16, 32, 64]}
      sigma: {type: uniform, low: 0.4, high: 0.8}
      depth: {type: int, low: 1, high: 2}
      lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
    objective: {metric: val_recovery, mode: max}  # default: atoms recovered x lattice term (ranks early);
                                                # val_score: match rate + species/count tie-breakers
                                                # (a list of such mappings: a multi-objective sweep)
    budget: {trials: 4, epochs: 3, time_budget_s: 900}
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    max_concurrent: 2
    search: {algorithm: tpe, scheduler: asha, grace_period: 2, seed: 0, warm_start: runs/sweeps/old}
    tracking: {mlflow: sqlite:///mlflow.db}    # optional: trials as MLflow runs (or wandb_project: NAME);
                                               # mlflow_checkpoint: true logs each trial's best weights too
            # defaults: grace_period an eighth of the epochs (at least 3), reduction_factor 2, startup_trials 8
    train: {batch_size: 8}                        # fixed TrainConfig values
    model: {seg_depth: 1}                         # fixed ModelConfig values
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from crystalae.config import (
    RENAMED_FIELDS,
    ConfigError,
    StrictConfig,
    TrainConfig,
    VoxelConfig,
    blank_problem,
    check_name,
    current_names,
    field_names,
    in_range,
)
from crystalae.files import load_yaml
from crystalae.loading import find_model
from crystalae.models import CrystalAE, ModelConfig, model_config_for
from crystalae.search.layout import SWEEP_FILE, is_sweep
from crystalae.shards import PrepareOptions
from crystalae.sources import READABLE, SourceError, demo_count, format_of
from crystalae.training import REPORTED_METRICS

__all__ = [
    "MODEL_PARAMS", "NOT_IDENTITY", "Param", "SAMPLER_ONLY", "SCHEDULER_ONLY", "SweepConfig",
    "SweepConfigError", "load_sweep_config", "parse_sweep_config", "split_options", "trial_overrides",
]

DISTRIBUTIONS = {"categorical", "uniform", "loguniform", "int"}
# Which keys route where comes from the config classes' own field roles (see crystalae.config.set_by)
VOXEL_PARAMS = field_names(VoxelConfig, searchable=True)
MODEL_PARAMS = field_names(ModelConfig, settable=True)
TRAIN_PARAMS = field_names(TrainConfig, settable=True)


class SweepConfigError(ValueError):
    """The sweep YAML is invalid (the message names the key and the reason)."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None

    def extremes(self) -> tuple:
        """The values a trial can be given at the edges of this distribution."""
        if self.type == "categorical":
            return self.values
        return (int(self.low), int(self.high)) if self.type == "int" else (self.low, self.high)

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this distribution can produce (used to reuse earlier trials' params)."""
        if self.type == "categorical":
            return value in self.values
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        return self.low <= value <= self.high and (self.type != "int" or float(value).is_integer())

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
class SweepConfig(StrictConfig):
    name: str
    data: dict[str, Any]
    search_space: tuple[Param, ...]
    # val_recovery (share of atoms recovered with their species, times a lattice term) compares trials of any
    # sigma, like val_score (the match rate with tie-breakers), but rises from the first epoch, so ASHA's
    # early cuts rank trials by more than chance; val_loss changes scale with sigma
    objective_metric: str = "val_recovery"
    objective_mode: Literal["min", "max"] = "max"
    # further objectives of a multi-objective sweep (e.g. parameters, min): Optuna keeps the Pareto front;
    # ASHA and "best" use the first objective
    secondary_metrics: tuple[str, ...] = ()
    secondary_modes: tuple[Literal["min", "max"], ...] = ()
    trials: int = 4
    epochs: int = 3
    time_budget_s: float | None = None
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    max_concurrent: int = 2
    algorithm: Literal["tpe", "random"] = "tpe"
    scheduler: Literal["asha", "fifo"] = "asha"
    # ASHA's first cut, in epochs. None: an eighth of the epoch budget, at least 3 (at most all of it).
    # Epoch 1 ranks trials poorly (val_recovery's rank correlation with a trial's final value, median of 6
    # seeds: 0.37 after epoch 1 of 30, 0.53 after epoch 3; bench/search_efficiency.py), and replaying ASHA
    # over random search's full curves put the first cut at 3-5 epochs of 30 (bench/asha_replay.py).
    grace_period: int | None = None
    # ASHA keeps the best 1/reduction_factor of the trials at each rung (grace_period * rf^k epochs);
    # 2 keeps enough trials past the early, noisy rungs (the same replay: 3 or 4 lost random's best)
    reduction_factor: float = 2.0
    # TPE's random trials before it models the results; Optuna's 10 is a third of a 32-trial sweep
    startup_trials: int = 8
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 2
    # An earlier sweep folder whose best `warm_start_trials` configurations (those inside this search
    # space) run first, before the sampler proposes its own.
    warm_start: str | None = None
    warm_start_trials: int = 4
    # Configurations (every searched parameter, each a value the space can produce) that the sweep's
    # first run evaluates before any other, e.g. a known hand-tuned recipe the search should have to beat.
    points: tuple[dict[str, Any], ...] = ()
    # Experiment trackers (the `tracking` section): each trial becomes an MLflow run (params, every
    # epoch's metrics) in experiment `mlflow_experiment` (default: the sweep name) at tracking URI
    # `mlflow` (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000), and/or a W&B run in `wandb_project`.
    mlflow: str | None = None
    mlflow_experiment: str | None = None
    # a trial's MLflow artifacts: its best checkpoint's config.json (configs, metrics, history) and, with
    # this, the checkpoint's weights too (optimizer state included: tens of MB a trial for the larger models)
    mlflow_checkpoint: bool = False
    wandb_project: str | None = None

    def problems(self) -> list[str | None]:
        limits = {"trials": 100_000, "epochs": 100_000, "workers_per_trial": 1024, "cpus_per_worker": 1024,
                  "max_concurrent": 1024, **({} if self.grace_period is None else {"grace_period": self.epochs})}
        return [
            *(in_range(self, key, 1, high) for key, high in limits.items()),
            in_range(self, "gpus_per_worker", 0, 64),
            in_range(self, "max_failures", 0, 1000),
            in_range(self, "seed", 0),
            in_range(self, "reduction_factor", 1, 100, low_open=True),
            in_range(self, "startup_trials", 0, 100_000),
            in_range(self, "warm_start_trials", 1, 1000),
            None if self.time_budget_s is None or self.time_budget_s > 0 else
            f"time_budget_s must be > 0 (or left out), got {self.time_budget_s}",
            *(None if metric in REPORTED_METRICS else
              f"objective metric {metric!r} is not reported by training (choose from {list(REPORTED_METRICS)})"
              for metric in self.objective_metrics()),
            None if len(set(self.objective_metrics())) == len(self.objective_metrics()) else
            f"objectives name a metric twice: {list(self.objective_metrics())}",
            None if len(self.secondary_metrics) == len(self.secondary_modes) else
            "secondary_metrics and secondary_modes must have the same length",
            *(blank_problem(getattr(self, key), f"tracking.{key}", example) for key, example in (
                ("mlflow", "sqlite:///mlflow.db"), ("mlflow_experiment", "the sweep's name"),
                ("wandb_project", "crystalae"))),
        ]

    def asha_grace_period(self) -> int:
        """The epochs every trial trains before ASHA may stop it."""
        return self.grace_period if self.grace_period is not None else min(self.epochs, max(3, self.epochs // 8))

    def objective_metrics(self) -> tuple[str, ...]:
        return (self.objective_metric, *self.secondary_metrics)

    def objective_modes(self) -> tuple[str, ...]:
        return (self.objective_mode, *self.secondary_modes)

    @property
    def multi_objective(self) -> bool:
        return bool(self.secondary_metrics)

    def voxel_config(self, sigma_overrides: dict[str, Any] | None = None) -> VoxelConfig:
        return VoxelConfig.from_dict({**_voxel_values(self.data), **(sigma_overrides or {})})

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["search_space"] = [dataclasses.asdict(p) for p in self.search_space]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        """Inverse of `as_dict` (the already-validated, flat form stored in sweep.json)."""
        data = _current_names(data)  # a sweep recorded before a field was renamed
        space = tuple(Param(**{**p, "values": tuple(p["values"])}) for p in data["search_space"])
        return cls(**{**data, "search_space": space})


_SECTIONS = {
    "name": None, "data": None, "search_space": None, "train": None, "model": None, "max_concurrent": None,
    "objective": {"metric", "mode"},
    "budget": {"trials", "epochs", "time_budget_s"},
    "resources": {"workers_per_trial", "cpus_per_worker", "gpus_per_worker"},
    "search": {"algorithm", "scheduler", "grace_period", "reduction_factor", "startup_trials", "seed", "max_failures",
               "warm_start", "warm_start_trials", "points"},
    "tracking": {"mlflow", "mlflow_experiment", "mlflow_checkpoint", "wandb_project"},
}
#: fields that do not change what a sweep searches (a resumed sweep may change them)
NOT_IDENTITY = ("trials", *_SECTIONS["tracking"])
#: fields that only the ASHA scheduler / the TPE sampler read: not part of the identity of a sweep without it
SCHEDULER_ONLY = ("grace_period", "reduction_factor")
SAMPLER_ONLY = ("startup_trials",)


def load_sweep_config(path: str | Path, name: str | None = None) -> SweepConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep config {path} does not exist or is not a file")
    try:
        raw = load_yaml(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise SweepConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise SweepConfigError(f"{path}: top level must be a mapping of sections, found a {type(raw).__name__}")
    if name is not None:
        raw["name"] = name
    return parse_sweep_config(raw, str(path))


def parse_sweep_config(raw: dict[str, Any], where: str = "sweep config") -> SweepConfig:
    """Validate every section against the typed configs a trial will build, before Ray starts."""
    def fail(message: str):
        raise SweepConfigError(f"{where}: {message}")

    if not isinstance(raw, dict):
        fail(f"top level must be a mapping of sections, found a {type(raw).__name__}")
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        fail(f"unknown keys {sorted(map(str, unknown))} (allowed: {sorted(_SECTIONS)})")
    try:
        raw = _current_names(raw, where)
    except ConfigError as exc:
        fail(str(exc).removeprefix(f"{where}: "))
    flat = _flat_sections(raw, fail)
    if "name" not in raw:
        fail("missing `name`")
    try:
        check_name(raw["name"], "sweep name")
    except ConfigError as exc:
        fail(str(exc))

    data = dict(raw.get("data") or {})
    _check_source(data.get("source"), fail)
    fixed_train, fixed_model = dict(raw.get("train") or {}), dict(raw.get("model") or {})
    for section, allowed, cls in (("train", TRAIN_PARAMS, TrainConfig), ("model", MODEL_PARAMS, ModelConfig)):
        bad = set(raw.get(section) or {}) - allowed
        if bad:
            fail(f"unknown keys in {section}: {sorted(map(str, bad))} (see {cls.__name__})")
    _check_base_model(fixed_train.get("init_from"), fail)
    space = tuple(_param(pname, spec, fail) for pname, spec in (raw.get("search_space") or {}).items())
    if not space:
        fail("search_space is empty")
    try:
        config = SweepConfig(name=raw["name"], data=data, search_space=space, train=fixed_train,
                             model=fixed_model, max_concurrent=raw.get("max_concurrent", 2), **flat)
    except ConfigError as exc:
        fail(str(exc))
    _check_first_points(config, fail)
    try:
        split_options(data)
    except ConfigError as exc:
        fail(f"data: {exc}")
    _check_extremes(config, fail)
    return config


def _check_base_model(ref: Any, fail) -> None:
    """A sweep that starts every trial from a trained model (`train.init_from`) needs it to exist: a
    missing one fails here, not in every trial."""
    if ref:
        try:
            find_model(ref)
        except (ValueError, LookupError) as exc:
            fail(f"train.init_from: {exc}")


def _current_names(raw: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """A sweep config (its YAML sections, or the flat form of sweep.json) with renamed fields under their
    new names in `train`, `search_space` and the first points; `where` (a file the user wrote) gets the
    deprecation lines (`crystalae.config.current_names`)."""
    raw = dict(raw)
    if isinstance(raw.get("train"), dict):
        raw["train"] = current_names(raw["train"], where and f"{where}: train")
    space = raw.get("search_space")
    if isinstance(space, dict):
        raw["search_space"] = current_names(space, where and f"{where}: search_space")
    elif isinstance(space, list):  # sweep.json: a list of Param dicts
        raw["search_space"] = [{**p, "name": RENAMED_FIELDS.get(p.get("name"), p.get("name"))} for p in space]
    if isinstance(raw.get("search"), dict):  # the YAML's search section (sweep.json holds `points` flat)
        raw["search"] = holder = dict(raw["search"])
    else:
        holder = raw
    if isinstance(holder.get("points"), (list, tuple)):
        holder["points"] = [current_names(p) if isinstance(p, dict) else p for p in holder["points"]]
    return raw


def _check_first_points(config: SweepConfig, fail) -> None:
    """The configurations a sweep evaluates first must exist: a warm-start sweep, points inside the space."""
    if config.warm_start is not None and not is_sweep(config.warm_start):
        fail(f"search.warm_start {config.warm_start} is not a sweep folder (it has no {SWEEP_FILE})")
    for index, point in enumerate(config.points):
        problem = point_problem(config.search_space, point)
        if problem:
            fail(f"search.points[{index}]: {problem}")


def point_problem(space: tuple[Param, ...], point: Any) -> str | None:
    """Why `point` is not a configuration this search space can produce (None when it is)."""
    if not isinstance(point, dict):
        return f"must be a mapping of parameter: value, got {point!r}"
    point = current_names(point)  # a trial sampled before a field was renamed
    names = {p.name: p for p in space}
    missing, extra = sorted(set(names) - set(point)), sorted(map(str, set(point) - set(names)))
    if missing or extra:
        return (f"must give every searched parameter and no other (missing {missing}, not searched {extra})")
    outside = [f"{k}={v!r}" for k, v in point.items() if not names[k].contains(v)]
    return f"values outside the search space: {', '.join(outside)}" if outside else None


def _flat_sections(raw: dict[str, Any], fail) -> dict[str, Any]:
    """The keyed sections (objective, budget, resources, search, tracking) as SweepConfig fields,
    refusing keys a section does not have; every section must be a mapping."""
    flat: dict[str, Any] = {}
    raw = {**raw, "objective": _objectives(raw.get("objective"), fail, flat)} if "objective" in raw else raw
    for section, keys in _SECTIONS.items():
        if section not in raw or section in ("name", "max_concurrent"):
            continue
        value = raw[section] if raw[section] is not None else {}
        if not isinstance(value, dict):
            fail(f"{section} must be a mapping, got {value!r}")
        if keys is None:  # data, search_space, train, model: checked against their own configs
            continue
        bad = set(value) - keys
        if bad:
            fail(f"unknown keys in {section}: {sorted(map(str, bad))} (allowed: {sorted(keys)})")
        flat.update({("objective_" + k if section == "objective" else k): v for k, v in value.items()})
    return flat


def _check_extremes(config: SweepConfig, fail) -> None:
    """Every extreme of the search space must make valid configs, or a trial would fail hours later."""
    for value_of in [{}] + [{p.name: v} for p in config.search_space for v in p.extremes()]:
        where_value = f"search_space.{next(iter(value_of))}={next(iter(value_of.values()))!r}: " if value_of else ""
        try:
            _, model_config, _ = _trial_configs(config, value_of)
            _build_on_meta(model_config)
        except (ConfigError, ValueError, RuntimeError) as exc:  # a network torch refuses to build, too
            fail(f"{where_value or 'data/model/train: '}{exc}")


def _build_on_meta(model_config: ModelConfig) -> None:
    """Build the trial's network on PyTorch's meta device (no memory): layer shapes torch refuses fail now."""
    import torch

    with torch.device("meta"):
        CrystalAE(model_config)


def _objectives(value: Any, fail, flat: dict[str, Any]) -> Any:
    """A list of objectives: the first stays the `objective` mapping, the rest become secondary ones."""
    if not isinstance(value, list):
        return value
    if not value or not all(isinstance(v, dict) and set(v) == {"metric", "mode"} for v in value):
        fail(f"objective: a list needs entries like {{metric: val_score, mode: max}}, got {value!r}")
    flat["secondary_metrics"] = [v["metric"] for v in value[1:]]
    flat["secondary_modes"] = [v["mode"] for v in value[1:]]
    return value[0]


def trial_overrides(sweep: SweepConfig, params: dict[str, Any]) -> tuple[dict, dict, dict]:
    """A trial's sampled `params` routed by field role, merged with the sweep's fixed values:
    (voxel overrides, model overrides, TrainConfig values)."""
    params = current_names(params)  # a trial sampled before a field was renamed
    voxel = {k: v for k, v in params.items() if k in VOXEL_PARAMS}
    model = {**sweep.model, **{k: v for k, v in params.items() if k in MODEL_PARAMS}}
    train = {**sweep.train, **{k: v for k, v in params.items() if k in TRAIN_PARAMS},
             "epochs": sweep.epochs, "workers": sweep.workers_per_trial,
             "threads": sweep.cpus_per_worker, "use_gpu": sweep.gpus_per_worker > 0}
    return voxel, model, train


def _trial_configs(sweep: SweepConfig, params: dict[str, Any]) -> tuple[VoxelConfig, ModelConfig, TrainConfig]:
    """The configs one trial builds from the sweep and its sampled `params` (species are the data's
    and are not known here, so a placeholder stands in)."""
    voxel, model, train = trial_overrides(sweep, params)
    voxel_config = sweep.voxel_config(voxel)
    return voxel_config, model_config_for(voxel_config, (6,), **model), TrainConfig.from_dict(train)


def _check_source(source: Any, fail) -> None:
    """`demo[:N]`, a URI, or a local path that exists (relative paths resolve from the current folder);
    or a list of them, read as one dataset (e.g. a data set's val.csv and extra.csv)."""
    if source is None:
        fail("data.source is required (a structure source such as demo:160 or a CSV path)")
    if isinstance(source, (list, tuple)):
        if not source:
            fail("data.source is an empty list; give at least one source")
        for part in source:
            _check_source(part, fail)
        return
    if not isinstance(source, str) or not source:
        fail(f"data.source must be a path or demo[:N], got {source!r}")
    try:
        demo = demo_count(source) is not None
    except SourceError as exc:
        fail(f"data.{exc}")
    if not demo and "://" not in source and not Path(source).exists():
        fail(f"data.source {source} does not exist")
    if not demo and Path(source).is_file() and Path(source).suffix.lower() != ".csv" and format_of(Path(source)) is None:
        fail(f"data.source {source}: unknown structure format (crystalae reads {READABLE})")  # not every trial, later


SPLIT_KEYS = ("val_fraction", "test_fraction")


def split_options(data: dict[str, Any]) -> PrepareOptions:
    """The split of a `data` section; unset fractions take PrepareOptions' defaults, as `data prepare` does."""
    return PrepareOptions(**{k: data[k] for k in SPLIT_KEYS if k in data})


def _voxel_values(data: dict[str, Any]) -> dict[str, Any]:
    """The VoxelConfig fields of a `data` section (the rest names the source and the split)."""
    return {k: v for k, v in data.items() if k not in ("source", *SPLIT_KEYS)}


def _param(pname: str, spec: Any, fail) -> Param:
    if pname not in VOXEL_PARAMS | MODEL_PARAMS | TRAIN_PARAMS:
        fail(f"search_space.{pname}: not a tunable field (voxel: {sorted(VOXEL_PARAMS)}; "
             f"model: {sorted(MODEL_PARAMS)}; train: {sorted(TRAIN_PARAMS)})")
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or spec["type"] not in DISTRIBUTIONS:
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
