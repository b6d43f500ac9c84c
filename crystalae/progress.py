"""One line per finished epoch of a training run, read from the run's newest checkpoint as it lands.

Ray Train reports from its workers and its controller, not from the process that started the run,
so the driver follows the run folder instead: each epoch writes a checkpoint whose `config.json`
carries the history of every epoch so far. Nothing is missed when epochs finish faster than a poll.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EpochLines"]

log = logging.getLogger(__name__)


def _epoch_line(entry: dict[str, Any], epochs: int) -> str:
    """`epoch 12/100 | loss 0.188 (val 0.201) | val match 56.2% | 12.3 s` from one history entry."""
    def number(key: str, fmt: str) -> str | None:
        value = entry.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) and value == value else None

    parts = [f"epoch {int(entry['epoch']) + 1}/{epochs}"]
    loss, val_loss = number("train_loss", ".4g"), number("val_loss", ".4g")
    if loss:
        parts.append(f"loss {loss}" + (f" (val {val_loss})" if val_loss else ""))
    match = number("val_match_rate", ".1%")
    if match:
        parts.append(f"val match {match}")
    seconds = sum(v for k in ("epoch_seconds", "eval_seconds") if isinstance(v := entry.get(k), (int, float)))
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


class EpochLines:
    """While a run trains into `run_dir`, log each new epoch of its history (a context manager)."""

    def __init__(self, run_dir: str | Path, epochs: int, every: float = 2.0,
                 sinks: list[Callable[[dict[str, Any]], None]] | None = None):
        """`sinks` also receive each new epoch's history entry (e.g. `crystalae.tracking.MlflowRun`)."""
        self.run_dir, self.epochs, self.every, self.sinks = Path(run_dir), epochs, every, list(sinks or [])
        self.shown = self._last_epoch()  # a resumed run shows only what it trains now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> EpochLines:
        if self.shown >= 0:  # a resumed run: where it picks up, before its first new epoch line
            log.info("resuming from epoch %d/%d (the newest checkpoint in %s)", self.shown + 1, self.epochs,
                     self.run_dir)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._show()  # the last epochs, if they landed between two polls

    def _history(self) -> list[dict[str, Any]]:
        newest = sorted(self.run_dir.glob("checkpoint_*/config.json"))[-1:]
        try:
            return json.loads(newest[0].read_text()).get("history") or [] if newest else []
        except (OSError, ValueError):
            return []  # being written or already rotated out: the next poll reads the next one

    def _last_epoch(self) -> int:
        history = self._history()
        return int(history[-1]["epoch"]) if history else -1

    def _show(self) -> None:
        for entry in self._history():
            if isinstance(entry.get("epoch"), int) and entry["epoch"] > self.shown:
                log.info(_epoch_line(entry, self.epochs))
                for sink in self.sinks:
                    sink(entry)
                self.shown = entry["epoch"]

    def _follow(self) -> None:
        while not self._stop.wait(self.every):
            self._show()
