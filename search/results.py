"""Reading sweep results (no Ray needed): the trial and summary types, and `collect_trials`, which reads
them from a sweep folder (`crystalae.search.layout`). The CLI, the dashboard and the benchmarks read
sweeps only through here.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from crystalae.config import Objective, current_names, is_score
from crystalae.search.layout import (
    CHECKPOINT_GLOB,
    PARAMS_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    TRIALS_DIR,
    local_root,
)
from crystalae.uri_fs import DamagedFileError, is_file, name_of, read_json
from crystalae.uri_fs import join as storage_join

log = logging.getLogger(__name__)

__all__ = [
    "Budget", "CheckpointRecord", "EpochRecord", "Objective", "RungRanking", "SweepSummary", "Trial",
    "best_params", "collect_trials", "ended_runs", "ended_status", "read_trial", "recorded_statuses",
    "resolve_checkpoint", "spearman", "sweep_config",
]


@dataclass(frozen=True)
class CheckpointRecord:
    path: str  # relative to the sweep folder
    epoch: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Trial:
    trial_id: str
    params: dict[str, Any]
    status: str  # running, finished, early-stopped, error, unknown
    epochs: int
    history: list[dict[str, Any]]  # per-epoch metrics
    checkpoints: list[CheckpointRecord]  # kept checkpoints, by epoch
    best_value: float | None  # the objective at the best kept checkpoint
    best_checkpoint_path: str | None  # its path, relative to the sweep folder

    @property
    def best_record(self) -> CheckpointRecord | None:
        """The kept checkpoint at `best_checkpoint_path` (None before the trial has one)."""
        return next((c for c in self.checkpoints if c.path == self.best_checkpoint_path), None)

    @property
    def best_epoch(self) -> int | None:
        return self.best_record.epoch if self.best_record else None

    def first_reached(self, metric: str, value: Any) -> dict[str, Any] | None:
        """The first epoch's metrics (history is in epoch order) at `value` of `metric`: kept checkpoints may
        all be later epochs that only equal it."""
        return next((h for h in self.history if value is not None and h.get(metric) == value), None)


@dataclass(frozen=True)
class EpochRecord:
    """One trained epoch of one trial, in the order the sweep spent its compute."""
    trial_id: str
    epoch: int
    seconds: float  # training + validation
    value: float | None  # the objective after this epoch


@dataclass(frozen=True)
class Budget:
    """What a sweep spent: in total, and before its best trial reached its best value."""
    trials: int
    epochs: int
    trial_seconds: float
    epochs_to_best: int | None
    seconds_to_best: float | None


@dataclass(frozen=True)
class RungRanking:
    """How well a metric after an early epoch (a pruning rung) ranks trials by where they ended."""
    rung: int  # epochs trained at the rung (1 = after the first epoch)
    metric: str  # the metric read at the rung (the objective)
    final: str  # the metric the trials are ranked by at the end (their best value)
    points: list[tuple[str, float, float]]  # (trial_id, value at the rung, final best value)
    spearman: float | None  # rank correlation over `points`; None for fewer than 3 or a constant side


@dataclass(frozen=True)
class SweepSummary:
    name: str
    objective: Objective
    trials: list[Trial]
    secondary: tuple[Objective, ...] = ()  # further objectives of a multi-objective sweep

    @property
    def objectives(self) -> list[Objective]:
        return [self.objective, *self.secondary]

    def scored(self) -> list[tuple[Trial, CheckpointRecord]]:
        """Each trial's best kept checkpoint, where it has a value for every objective."""
        pairs = []
        for t in self.trials:
            record = t.best_record
            if record is not None and all(is_score(record.metrics.get(o.metric)) for o in self.objectives):
                pairs.append((t, record))
        return pairs

    def pareto_front(self) -> list[tuple[Trial, CheckpointRecord]]:
        """The scored trials no other trial dominates (as good on every objective, better on one)."""
        points = self.scored()

        def dominates(a: CheckpointRecord, b: CheckpointRecord) -> bool:
            values = [(a.metrics[o.metric], b.metrics[o.metric], o) for o in self.objectives]
            return all(o.at_least_as_good(x, y) for x, y, o in values) and any(x != y for x, y, _ in values)

        return [(t, c) for t, c in points if not any(dominates(other, c) for _, other in points)]

    def pick(self, within: float, prefer: Objective | None = None) -> tuple[Trial, CheckpointRecord]:
        """Among trials whose objective is within `within` of the best, the one best on `prefer`
        (default: the sweep's second objective), e.g. the smallest model within 0.01 of the best score."""
        prefer = prefer or (self.secondary[0] if self.secondary else None)
        if prefer is None:
            raise ValueError(f"sweep {self.name} has one objective: name the metric to prefer (METRIC:min|max)")
        metric = self.objective.metric
        pairs = sorted(((t, c) for t, c in self.scored() if is_score(c.metrics.get(prefer.metric))),
                       key=lambda p: _reached_at(*p, metric))
        if not pairs:
            raise ValueError(f"no checkpoint of sweep {self.name} has both {metric!r} and {prefer.metric!r}")
        best = self.objective.best(pairs, lambda p: p[1].metrics[metric])[1].metrics[metric]
        close = [p for p in pairs if abs(p[1].metrics[metric] - best) <= within]
        return prefer.best(close, lambda p: p[1].metrics[prefer.metric])

    def best_trial(self) -> Trial | None:
        """The trial holding the sweep's best checkpoint (`best_checkpoint`'s rule, on the objective).

        Returns:
            The trial whose best kept checkpoint scores best on the objective; of equal values, the first to
            reach it (as the live console reports it). None while no trial has a scored checkpoint.
        """
        ranked = self.ranked_trials()
        return ranked[0] if ranked else None

    def ranked_trials(self) -> list[Trial]:
        """The scored trials, best first by the objective; of equal values, the first to reach it first."""
        by_time = sorted((t for t in self.trials if t.best_value is not None),
                         key=lambda t: _reached_at(t, t.best_record, self.objective.metric))
        return sorted(by_time, key=lambda t: t.best_value, reverse=self.objective.mode == "max")  # stable

    def best_checkpoint(self, metric: str | None = None, mode: str | None = None) -> tuple[Trial, CheckpointRecord]:
        """The best kept checkpoint of the whole sweep on `metric` (default: the objective), by the one rule
        for "best" (`Objective.best`): numbers only; of equal values, the one whose trial reached the value
        first, as the live console reports it. Each `Trial.best_checkpoint_path` follows the same rule.

        Args:
            metric: the metric to rank by; default, the sweep's objective.
            mode: "min" or "max"; default, the objective's mode.

        Returns:
            (trial, checkpoint): the checkpoint's record and the trial that holds it.

        Raises:
            ValueError: no kept checkpoint has a numeric value of `metric`.
        """
        objective = Objective(metric or self.objective.metric, mode or self.objective.mode)
        found = _best_of(self.trials, objective)
        if found is None:
            raise ValueError(f"no checkpoint of sweep {self.name} has metric {objective.metric!r}")
        return found

    def timeline(self) -> list[EpochRecord]:
        """Every trained epoch in the order it finished (epoch order within a trial; histories from
        before `finished_at` was recorded fall back to trial order)."""
        rows = []
        for order, t in enumerate(self.trials):
            for h in t.history:
                value = h.get(self.objective.metric)
                seconds = float(h.get("epoch_seconds") or 0.0) + float(h.get("eval_seconds") or 0.0)
                key = (float(h.get("finished_at") or 0.0), order, int(h.get("epoch", 0)))
                rows.append((key, EpochRecord(t.trial_id, int(h.get("epoch", 0)), seconds,
                                              float(value) if is_score(value) else None)))
        return [record for _, record in sorted(rows, key=lambda r: r[0])]

    def rung_ranking(self, rung: int, final: str = "val_match_rate", full_only: bool = True) -> RungRanking:
        """The objective after `rung` epochs against each trial's best `final` value over its history.

        With `full_only`, trials ASHA stopped early are left out (their final value never had the
        budget); in a FIFO sweep every trial counts. This is what tells whether early cuts are sound.
        """
        metric, points = self.objective.metric, []
        for t in self.trials:
            if (full_only and t.status in ("early-stopped", "error")) or len(t.history) < max(rung, 1):
                continue
            early = t.history[rung - 1].get(metric)
            ends = [h.get(final) for h in t.history if is_score(h.get(final))]
            if is_score(early) and ends:
                points.append((t.trial_id, float(early), float(max(ends))))
        return RungRanking(rung, metric, final, points, spearman([p[1] for p in points], [p[2] for p in points]))

    def budget(self) -> Budget:
        """Total compute, and the compute spent until the best trial had first reached its best value."""
        timeline = self.timeline()
        best = self.best_trial()
        best_epoch = None
        if best is not None:
            first = best.first_reached(self.objective.metric, best.best_value)
            best_epoch = int(first.get("epoch", 0)) if first else best.best_epoch
        spent_epochs, spent_seconds, at_best = 0, 0.0, None
        for record in timeline:
            spent_epochs, spent_seconds = spent_epochs + 1, spent_seconds + record.seconds
            if at_best is None and best is not None and (record.trial_id, record.epoch) == (best.trial_id, best_epoch):
                at_best = (spent_epochs, spent_seconds)
        return Budget(trials=len(self.trials), epochs=spent_epochs, trial_seconds=round(spent_seconds, 3),
                      epochs_to_best=at_best[0] if at_best else None,
                      seconds_to_best=round(at_best[1], 3) if at_best else None)

    def only(self, trial_id: str) -> SweepSummary:
        return replace(self, trials=[t for t in self.trials if t.trial_id == trial_id])

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to summary.json (with the compute it spent)."""
        return {**asdict(self), "budget": asdict(self.budget())}


def _read_json(root: str | Path, name: str) -> Any:
    path = storage_join(root, name)
    return read_json(path) if is_file(path) else None


def ended_runs(root: str | Path) -> int:
    """How many Tune experiments of this sweep ran to the end (summary.json records it)."""
    summary = _read_json(root, SUMMARY_FILE)
    return 0 if summary is None else int(summary["tune_runs"])


def sweep_config(root: str | Path) -> dict[str, Any]:
    return _read_json(root, SWEEP_FILE) or {}


def collect_trials(root: str | Path, statuses: dict[str, str] | None = None) -> SweepSummary:
    """Read every trial of a sweep from disk (works while it runs, and with Ray down).

    A trial's status comes from summary.json once the sweep has ended; before that it is "running".
    """
    name = name_of(root)
    root = local_root(root)
    sweep = sweep_config(root)
    if statuses is None and (root / SUMMARY_FILE).exists():
        statuses = recorded_statuses(root)
    objective, *secondary = _sweep_objectives(sweep)
    folders = sorted(p for p in (root / TRIALS_DIR).glob("*") if p.is_dir()) if (root / TRIALS_DIR).exists() else []
    trials = []
    for folder in folders:  # a loop, not a comprehension: the warnings' stacklevel names the caller
        trials.append(_read_trial(root, folder, objective, statuses, sweep.get("epochs")))
    return SweepSummary(sweep.get("name", name), objective, trials, tuple(secondary))


def _sweep_objectives(sweep: dict[str, Any]) -> list[Objective]:
    """The objectives of a sweep config (sweep.json's form), the primary one first."""
    return [Objective(sweep.get("objective_metric", "val_score"), sweep.get("objective_mode", "max")),
            *(Objective(m, o) for m, o in zip(sweep.get("secondary_metrics", ()), sweep.get("secondary_modes", ())))]


def read_trial(root: str | Path, trial_id: str) -> Trial:
    """One trial of a sweep, read as `collect_trials` reads each, while the sweep runs (status "running")."""
    local = local_root(root)
    return _read_trial(local, local / TRIALS_DIR / trial_id, _sweep_objectives(sweep_config(local))[0], None, None)


def _read_trial(root: Path, folder: Path, objective: Objective, statuses: dict[str, str] | None,
                budget: int | None) -> Trial:
    """One trial folder: its params, kept checkpoints (by epoch), history and best checkpoint."""
    found = []
    for config_file in folder.glob(f"{CHECKPOINT_GLOB}/config.json"):
        try:
            config = read_json(config_file)
        except DamagedFileError as exc:  # one damaged checkpoint must not hide the sweep
            warnings.warn(f"skipped a checkpoint: {exc}", stacklevel=3)
            continue
        found.append((CheckpointRecord(str(config_file.parent.relative_to(root)), config["epoch"], config["metrics"]),
                      config.get("history", [])))
    found.sort(key=lambda f: f[0].epoch)
    history = found[-1][1] if found else []  # the newest checkpoint carries the whole curve
    params_file, params = folder / PARAMS_FILE, {}
    try:
        params = read_json(params_file) if params_file.exists() else {}
    except DamagedFileError as exc:  # nor a damaged params.json (a trial killed mid-write by an old version)
        warnings.warn(f"trial {folder.name} shown without its params: {exc}", stacklevel=3)
    if not isinstance(params, dict):
        warnings.warn(f"trial {folder.name} shown without its params: {params_file} holds no mapping", stacklevel=3)
        params = {}
    trial = Trial(trial_id=folder.name, params=params,
                  status=_status(statuses, folder.name, len(history), budget), epochs=len(history),
                  history=history, checkpoints=[record for record, _ in found], best_value=None, best_checkpoint_path=None)
    best = _best_of([trial], objective)
    if best is None:
        return trial
    return replace(trial, best_value=best[1].metrics[objective.metric], best_checkpoint_path=best[1].path)


def _best_of(trials: list[Trial], objective: Objective) -> tuple[Trial, CheckpointRecord] | None:
    """The one rule for the best kept checkpoint, of one trial or of a sweep: `objective.best` over the
    checkpoints listed in the order their values were first reached (a tie goes to the first to reach it)."""
    pairs = sorted(((t, c) for t in trials for c in t.checkpoints), key=lambda p: _reached_at(*p, objective.metric))
    return objective.best(pairs, lambda p: p[1].metrics.get(objective.metric))


def recorded_statuses(root: str | Path) -> dict[str, str]:
    """Trial statuses from summary.json ({} before the sweep first ended)."""
    summary = _read_json(root, SUMMARY_FILE)
    return {t["trial_id"]: t["status"] for t in summary["trials"]} if summary is not None else {}


def best_params(root: str | Path) -> list[dict[str, Any]]:
    """The params of a sweep's scored trials, best first by its own objective (under today's field names,
    as a warm start feeds them to a new sweep)."""
    return [current_names(t.params) for t in collect_trials(root).ranked_trials()]


def resolve_checkpoint(summary: SweepSummary, trial: str | None = None, *, metric: str | None = None,
                       mode: str | None = None, within: float | None = None,
                       prefer: str | None = None) -> tuple[Trial, CheckpointRecord]:
    """The checkpoint a promote names: the best kept checkpoint (`SweepSummary.best_checkpoint`) of
    `trial`, or of the whole sweep; with `within`, the one `SweepSummary.pick` chooses.

    Args:
        summary: the sweep (`collect_trials`).
        trial: a trial id; default, every trial of the sweep.
        metric, mode: what ranks the checkpoints; default, the sweep objective.
        within: choose among trials within this distance of the best objective value...
        prefer: ...the one best on this `METRIC[:MODE]` (default: the sweep's second objective).

    Returns:
        (trial, checkpoint record).

    Raises:
        ValueError: the sweep has no trial `trial`, or no checkpoint has the metric(s) to rank by.
    """
    if trial is not None:
        if not any(t.trial_id == trial for t in summary.trials):
            raise ValueError(f"sweep {summary.name} has no trial {trial!r}")
        summary = summary.only(trial)
    if within is None:
        return summary.best_checkpoint(metric, mode)
    return summary.pick(within, Objective.parse(prefer, summary.objectives) if prefer else None)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None where it is undefined."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def _status(statuses: dict[str, str] | None, trial_id: str, epochs: int, budget: int | None) -> str:
    if statuses is None:
        return "running"  # the sweep has not ended (or its driver was killed)
    status = statuses.get(trial_id, "unknown")
    return ended_status(False, epochs, budget) if status == "finished" else status


def ended_status(failed: bool, epochs: int, budget: int | None) -> str:
    """How a trial that has ended is shown: "error", "early-stopped" (it ended before the epoch budget:
    ASHA or the sweep's time budget stopped it) or "finished"."""
    if failed:
        return "error"
    return "early-stopped" if budget is not None and epochs < budget else "finished"


def _reached_at(trial: Trial, record: CheckpointRecord | None, metric: str) -> tuple[float, float]:
    """When `trial` first reached `record`'s value of `metric`, then when the checkpoint itself finished:
    equal values go to who got there first, as the live console reports them (infinite where a time was
    not recorded)."""
    def time_of(metrics: dict[str, Any] | None) -> float:
        value = metrics.get("finished_at") if metrics else None
        return float(value) if is_score(value) else math.inf

    own = time_of(record.metrics if record else None)
    first = time_of(trial.first_reached(metric, record.metrics.get(metric))) if record else math.inf
    return min(first, own), own
