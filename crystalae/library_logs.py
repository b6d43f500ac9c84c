"""The console noise of the libraries crystalae drives (Ray, Optuna, MLflow, W&B), kept at its source.

While crystalae drives them, their Python loggers and the warnings raised inside them go to a log file
beside the run (a sweep's or a training run's `ray.log`): Ray's token-authentication notice, Optuna's
"A new study created in RDB", MLflow's database set-up lines. The console keeps crystalae's own lines.
With -v (the `crystalae` logger at DEBUG) they reach the console as well.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from crystalae.extras import available

__all__ = ["library_logs_to", "verbose"]

# the loggers each library writes to; Ray sets handlers on some of its sub-loggers itself
LIBRARY_LOGGERS = {"ray": ("ray", "ray.tune", "ray.train", "ray.data"), "optuna": ("optuna",),
                   "mlflow": ("mlflow", "alembic"), "wandb": ("wandb",)}


def verbose() -> bool:
    """Whether the user asked for detail (`-v`: the `crystalae` logger at DEBUG)."""
    return logging.getLogger("crystalae").isEnabledFor(logging.DEBUG)


@contextmanager
def library_logs_to(log_file: Path, libraries: Iterable[str] = ("ray",)) -> Iterator[Callable[[], None]]:
    """While the block runs, send the loggers and warnings of `libraries` (keys of LIBRARY_LOGGERS) to
    `log_file` (appending); with -v to the console too. Their earlier handlers come back afterwards.

    Yields a function that routes the loggers again: `ray.init(configure_logging=False)` clears the `ray`
    logger's handlers, so call it after Ray starts (what Ray logs meanwhile, such as its token-authentication
    notice, reaches the file through Python's last-resort handler, which the block also routes).
    """
    libraries = [lib for lib in libraries if available(lib)]
    for lib in libraries:  # a library adds its own console handler when imported: import it first, so that
        importlib.import_module(lib)  # the handler set aside below is that one (and none arrives during the block)
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8", delay=True)  # no empty file when all is quiet
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    keep_console = verbose()
    names = [n for lib in libraries for n in LIBRARY_LOGGERS[lib]]
    saved = [(logger, list(logger.handlers), logger.propagate) for logger in map(logging.getLogger, names)]

    def route() -> None:
        for logger, handlers, _ in saved:
            logger.handlers = [handler, *(handlers if keep_console else [])]
            logger.propagate = False

    route()
    last_resort = logging.lastResort
    logging.lastResort = _LastResort(handler, last_resort, tuple(libraries), keep_console)
    show = warnings.showwarning
    inside = tuple(f"{os.sep}{lib}{os.sep}" for lib in libraries)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        ours = any(part in str(filename) for part in inside)
        if keep_console or not ours:
            show(message, category, filename, lineno, file, line)
        if ours:
            text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
            handler.emit(logging.makeLogRecord({"msg": text, "levelname": "WARNING", "levelno": logging.WARNING,
                                                "name": "py.warnings"}))

    warnings.showwarning = show_warning
    try:
        yield route
    finally:
        warnings.showwarning = show
        logging.lastResort = last_resort
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


class _LastResort(logging.Handler):
    """Python's last-resort handler (records no handler took) while `library_logs_to` runs: the libraries'
    records go to the log file (and with -v to the console), everyone else's to the usual last resort."""

    def __init__(self, file: logging.Handler, usual: logging.Handler | None, libraries: tuple[str, ...],
                 keep_console: bool):
        super().__init__(logging.WARNING)
        self.file, self.usual, self.libraries, self.keep_console = file, usual, libraries, keep_console

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name.split(".")[0] in self.libraries
        if ours:
            self.file.handle(record)
        if (self.keep_console or not ours) and self.usual is not None:
            self.usual.handle(record)
