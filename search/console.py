"""A sweep's live console: one line per trial event, with the best value so far, elapsed time and an
estimate of the time left. Ray Tune's own tables (printed to stdout) and logs go to `ray.log` in the
sweep folder.

Imported only inside `run_sweep`, so Ray stays a lazy import.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from crystalae.library_logs import library_logs_to

__all__ = ["FreeDeadRuns", "PublishOnTrialEnd", "SweepConsole", "epochs_done", "ray_output_to"]

_console: list[TextIO] = []  # the terminal while Ray's stdout goes to the log (innermost last)


def epochs_done(result: dict[str, Any]) -> int:
    """Epochs a trial has trained in all, from its reported metrics. Tune's `training_iteration` counts
    reports since the trial's process started, so it restarts after a resume; `epochs_done` does not.
    Checkpoints written before `epochs_done` existed fall back to `epoch` (0-based), then Tune's count."""
    if "epochs_done" in result:
        return int(result["epochs_done"])
    if isinstance(result.get("epoch"), (int, float)):
        return int(result["epoch"]) + 1
    return int(result.get("training_iteration", 0))


class SweepConsole(Callback):
    """Prints `[elapsed] trial event | best so far | progress, time left` for every trial event."""

    def __init__(self, metric: str, mode: str, trials: int, epochs: int):
        # no stream is held: the callback is pickled with the sweep state
        self.metric, self.mode, self.trials, self.epochs = metric, mode, trials, epochs
        self.started = time.monotonic()
        self.rate_from: tuple[float, int] | None = None  # (time, epochs done) at the first result
        self.best: tuple[float, str] | None = None
        self.done_epochs: dict[str, int] = {}
        self.ended: set[str] = set()
        self.nodes: dict[str, str] = {}  # trial -> node of its last result (its rank-0 Train worker)
        self.interrupted: dict[str, tuple[str, int]] = {}  # trial -> (node, epochs done) when it failed

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()  # also on a resumed sweep
        self.rate_from = None

    def _say(self, text: str) -> None:
        stream = _console[-1] if _console else sys.stdout
        print(f"[{_clock(time.monotonic() - self.started)}] {text}", file=stream, flush=True)

    def _status(self) -> str:
        best = "–" if self.best is None else f"{self.best[0]:.4g} ({self.best[1]})"
        spent = sum(self.done_epochs.values())
        # Unfinished trials may still train to the full budget; ASHA usually stops some, so this is an upper bound.
        left = sum(self.epochs - n for t, n in self.done_epochs.items() if t not in self.ended)
        left += (self.trials - len(self.done_epochs)) * self.epochs
        # The pace is measured from the first result on: the time before it (preparing the data, starting
        # worker groups) is paid once, and counting it against one epoch gave a first estimate 10x too long.
        now = time.monotonic()
        if self.rate_from is None and spent:
            self.rate_from = (now, spent)
        since, at = self.rate_from or (now, spent)
        eta = "–" if spent <= at else _clock((now - since) / (spent - at) * left)
        return f"best {self.metric} {best} | trials {len(self.ended)}/{self.trials} done | ≤{eta} left"

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if trial.trial_id in self.interrupted:
            self._say(f"{trial.trial_id} restarted")
            return
        self.done_epochs.setdefault(trial.trial_id, 0)
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        self._say(f"{trial.trial_id} started: {params}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        """Tune restarts a failed trial (its process died with its node, or it raised): say where it was."""
        node = self.nodes.get(trial.trial_id, "?")
        epochs = self.done_epochs.get(trial.trial_id, 0)
        self.interrupted[trial.trial_id] = (node, epochs)
        why = "its node was lost" if node != "?" and not _node_alive(node) else "it failed (details in ray.log)"
        self._say(f"{trial.trial_id} interrupted after epoch {epochs}/{self.epochs} on {node}: {why}; "
                  f"Ray restarts it from its last checkpoint")

    def _resumed(self, trial_id: str, node: str, epochs: int) -> None:
        """The first result of a trial after it lost its node (a Tune restart, or Ray Train replacing its
        workers, which Tune never sees): one line with the lost node and the epoch it went on from."""
        lost, done = self.interrupted.pop(trial_id, (self.nodes.get(trial_id), self.done_epochs.get(trial_id, 0)))
        if lost in (None, "?") or _node_alive(lost):
            return  # an ordinary failure, or a move between live nodes
        start = epochs - 1  # epochs its checkpoint held
        if start >= done:
            what = f"from its epoch-{start} checkpoint, nothing lost"
        elif start == 0:
            what = f"from epoch 0: no checkpoint of it in the sweep's storage, its {done} epochs are lost"
        else:
            what = f"from its epoch-{start} checkpoint: epochs {start + 1}-{done} are lost and retrained"
        self._say(f"{trial_id} lost node {lost} after epoch {done}/{self.epochs}; resumed on {node} {what}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        node = result.get("node_ip")
        if node and (trial.trial_id in self.interrupted or self.nodes.get(trial.trial_id, node) != node):
            self._resumed(trial.trial_id, node, epochs_done(result))
        if node:
            self.nodes[trial.trial_id] = node
        self.done_epochs[trial.trial_id] = epochs_done(result)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and value == value:
            if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
                self.best = (float(value), trial.trial_id)
            shown = f"{value:.4g}"
        else:
            shown = "n/a"
        self._say(f"{trial.trial_id} epoch {self.done_epochs[trial.trial_id]}/{self.epochs} "
                  f"{self.metric} {shown} | {self._status()}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.ended.add(trial.trial_id)
        epochs = self.done_epochs.get(trial.trial_id, 0)
        how = "finished" if epochs >= self.epochs else f"stopped early after {epochs} epochs"
        self._say(f"{trial.trial_id} {how} | {self._status()}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._say(f"{trial.trial_id} failed (Ray retries it up to max_failures; details in ray.log) | {self._status()}")


@contextmanager
def ray_output_to(log_file: Path, libraries: Iterable[str] = ("ray", "optuna")):
    """Send the Python loggers of Ray and the other `libraries` (`crystalae.library_logs`) and everything
    Ray prints to `log_file` (appending) while a sweep runs; `SweepConsole` keeps writing to the terminal.
    Yields the function that routes the loggers again after `ray.init` (see `library_logs_to`)."""
    _console.append(sys.stdout)
    try:
        with library_logs_to(log_file, libraries) as route, open(log_file, "a", encoding="utf-8") as printed, \
                redirect_stdout(printed):
            yield route
    finally:
        _console.pop()


def _node_alive(ip: str) -> bool:
    """Whether a live Ray node has address `ip` (a lost node is marked dead within seconds)."""
    import ray

    return any(n["Alive"] and n["NodeManagerAddress"] == ip for n in ray.nodes())


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class PublishOnTrialEnd(Callback):
    """Calls `publish(*args)` whenever a trial ends, so a sweep on object storage shows progress."""

    def __init__(self, publish, *args: Any):
        self.publish, self.args = publish, args

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.publish(*self.args)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.publish(*self.args)


class FreeDeadRuns(Callback):
    """Every `every` seconds of the sweep, and once at its end, frees what killed Ray Train runs still
    hold (`crystalae.ray_env.free_dead_runs`): the CPUs of trials ASHA stopped and of trials whose node
    was lost. Without it, on a cluster with no dashboard, those CPUs stay reserved until the sweep
    hangs with trials that never start."""

    def __init__(self, every: float = 2.0):
        self.every, self.last = every, 0.0
        self.freed = 0  # placement groups removed

    def setup(self, **info: Any) -> None:
        self.last = 0.0  # a restored sweep unpickles another process's monotonic clock

    def _free(self) -> None:
        from crystalae.ray_env import free_dead_runs

        self.last = time.monotonic()
        groups, cleaners = free_dead_runs()
        if groups or cleaners:
            self.freed += len(groups)
            logging.getLogger("ray.tune").info("freed %d placement groups and %d cleaner actors of ended Train runs",
                                               len(groups), len(cleaners))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last >= self.every:
            self._free()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._free()
