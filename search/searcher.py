"""The sweep's searcher: Ray Tune's OptunaSearch over a study kept in the sweep's `optuna.db`.

Imported only when a sweep runs (it imports Ray and Optuna).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from crystalae.config import Objective
from crystalae.search.config import SweepConfig
from crystalae.search.console import epochs_done
from crystalae.search.layout import study_path
from crystalae.search.results import ended_status

__all__ = ["PersistentOptunaSearch", "persistent_searcher"]


class PersistentOptunaSearch(OptunaSearch):
    """OptunaSearch that records trials as crystalae reads them, over a study that may be ahead of Tune.

    The study names its objectives (optuna-dashboard shows "Objective 0" otherwise); a trial's values are
    those of its best epoch on the first objective (the checkpoint `promote` takes), not its last epoch's;
    a trial stopped before the epoch budget (ASHA, the time budget) is PRUNED, not COMPLETE.

    After the driver is killed, Tune restores its state from its last save, which can predate the
    SQLite study: a trial Optuna already closed is then reported again. Those late reports are dropped
    (the study keeps the first, complete record) instead of failing the resumed sweep.
    """

    def __init__(self, *args: Any, objectives: list[Objective], epochs: int, **kwargs: Any):
        # set before OptunaSearch.__init__, which creates the study when it is given the metrics
        self._objectives, self._epochs = list(objectives), epochs
        self._best_results: dict[str, dict[str, Any]] = {}  # each trial's best report so far
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        with warnings.catch_warnings():  # set_metric_names is marked experimental; it is what the dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names([o.metric for o in self._objectives])

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self._closed_in_study(trial_id):
            return
        primary, earlier = self._objectives[0], self._best_results.get(trial_id)
        # of equal values the earlier epoch stays best, as crystalae's reader ranks checkpoints
        self._best_results[trial_id] = primary.best([r for r in (earlier, result) if r is not None],
                                                    lambda r: r.get(primary.metric)) or result
        # the step Optuna's pruning sees is the trial's epoch count, which survives a resume
        super().on_trial_result(trial_id, {**result, "training_iteration": epochs_done(result)})

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._closed_in_study(trial_id):
            self._completed_trials.add(trial_id)
            return
        best = self._best_results.pop(trial_id, None)
        if result and best is not None:
            result = {**result, **{o.metric: best.get(o.metric) for o in self._objectives}}
        if result and ended_status(error, epochs_done(result), self._epochs) == "early-stopped":
            self._close_pruned(trial_id, [result.get(o.metric) for o in self._objectives])
            return
        super().on_trial_complete(trial_id, result, error)

    def _close_pruned(self, trial_id: str, values: list[Any]) -> None:
        """Close a trial as PRUNED with its best values. Optuna's `tell` takes no values for a pruned trial
        (it keeps the last intermediate one, and a multi-objective trial has none), so this does what
        `tell` does, through the study's storage, with the values."""
        study, trial = self._ot_study, self._ot_trials[trial_id]
        finite = all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf") for v in values)
        values = [float(v) for v in values] if finite else None
        study.sampler.after_trial(study, study._storage.get_trial(trial._trial_id), optuna.trial.TrialState.PRUNED,
                                  values)
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.PRUNED, values)
        self._completed_trials.add(trial_id)

    def _closed_in_study(self, trial_id: str) -> bool:
        """Whether the study already holds a final record for this Tune trial."""
        trial = self._ot_trials.get(trial_id)
        if trial is None:
            return False
        closed = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                    optuna.trial.TrialState.PRUNED,
                                                                    optuna.trial.TrialState.FAIL))
        return any(t.number == trial.number for t in closed)


def persistent_searcher(sweep: SweepConfig, root: str | Path, points: list[dict[str, Any]] | None = None,
                        run: int = 0) -> PersistentOptunaSearch:
    """The searcher of run `run` of a sweep's trials; every run loads the same study, so the sampler
    learns from every earlier trial. `points` are evaluated first (warm start)."""
    # a later run of trials on the same study (an extension) gets its own seed: with the sweep's seed
    # the sampler's random draws would start over and repeat the first run's configurations
    seed = sweep.seed + 1000 * run
    # multivariate: lr and beta act together; constant_liar: concurrent trials get different proposals
    sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.startup_trials, multivariate=True,
                                          constant_liar=True) if sweep.algorithm == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    # several objectives: Optuna's multi-objective TPE keeps a Pareto front (no per-epoch pruning reports)
    several = sweep.multi_objective
    objectives = [Objective(m, o) for m, o in zip(sweep.objective_metrics(), sweep.objective_modes())]
    return PersistentOptunaSearch(sampler=sampler, study_name=sweep.name, points_to_evaluate=points or None,
                                  objectives=objectives, epochs=sweep.epochs,
                                  metric=list(sweep.objective_metrics()) if several else None,
                                  mode=list(sweep.objective_modes()) if several else None,
                                  storage=optuna.storages.RDBStorage(f"sqlite:///{study_path(root)}"))
