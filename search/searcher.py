"""The sweep's searcher: Ray Tune's OptunaSearch over a study kept in the sweep's `optuna.db`.

Imported only when a sweep runs (it imports Ray and Optuna).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from crystalae.search.config import SweepConfig
from crystalae.search.console import epochs_done
from crystalae.search.results import study_path

__all__ = ["PersistentOptunaSearch", "persistent_searcher"]


class PersistentOptunaSearch(OptunaSearch):
    """OptunaSearch tolerant of a study that is ahead of Tune.

    After the driver is killed, Tune restores its state from its last save, which can predate the
    SQLite study: a trial Optuna already closed is then reported again. Those late reports are dropped
    (the study keeps the first, complete record) instead of failing the resumed sweep.
    """

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self._closed_in_study(trial_id):
            return
        # the step Optuna's pruning sees is the trial's epoch count, which survives a resume
        super().on_trial_result(trial_id, {**result, "training_iteration": epochs_done(result)})

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._closed_in_study(trial_id):
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

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
    return PersistentOptunaSearch(sampler=sampler, study_name=sweep.name, points_to_evaluate=points or None,
                                  metric=list(sweep.objective_metrics()) if several else None,
                                  mode=list(sweep.objective_modes()) if several else None,
                                  storage=optuna.storages.RDBStorage(f"sqlite:///{study_path(root)}"))
