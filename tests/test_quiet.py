"""Quiet by default: the libraries crystalae drives log to the run's ray.log, not to the console; -v adds
crystalae's own debug lines."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest
from conftest import generated

from crystalae.library_logs import library_logs_to


def test_library_logs_and_warnings_go_to_the_log_file_and_with_v_to_the_console_too(tmp_path, capfd, recwarn,
                                                                                    monkeypatch):
    pytest.importorskip("optuna")
    import sys

    import optuna

    # Optuna's console handler keeps the stream that was sys.stderr when it was made, which, after an
    # earlier test used Optuna, is that test's capture: point it at this test's stderr
    for handler in logging.getLogger("optuna").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's capture handlers (subclasses)
            monkeypatch.setattr(handler, "stream", sys.stderr)

    log = tmp_path / "ray.log"
    crystalae_logger = logging.getLogger("crystalae")
    level = crystalae_logger.level
    try:
        for debug in (False, True):
            crystalae_logger.setLevel(logging.DEBUG if debug else logging.INFO)
            with library_logs_to(log, ["optuna"]):
                logging.getLogger("optuna.storages").warning("a new study %s", debug)
                warnings.warn_explicit(f"deprecated {debug}", FutureWarning, optuna.__file__, 1)
            shown = capfd.readouterr().err + " ".join(str(w.message) for w in recwarn)  # pytest keeps warnings
            recwarn.clear()
            assert ("a new study True" in shown and "deprecated True" in shown) if debug else \
                ("a new study" not in shown and "deprecated" not in shown), shown
    finally:
        crystalae_logger.setLevel(level)
    text = log.read_text()
    assert "a new study False" in text and "FutureWarning: deprecated False" in text
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("optuna").handlers)  # put back


QUIET_START = """
import logging, sys
from pathlib import Path
import ray
from crystalae.cli import configure_logging
from crystalae.search.config import load_sweep_config
from crystalae.search.console import ray_output_to
from crystalae.search.searcher import persistent_searcher
from crystalae.search.sweep import start_local_ray
configure_logging(0)
root = Path(sys.argv[1])
root.mkdir()
(root / "q.yaml").write_text("name: q\\ndata: {source: 'demo:8', grid: 16}\\nbudget: {trials: 1, epochs: 1}\\n"
                             "search_space: {lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}}\\n")
sweep = load_sweep_config(root / "q.yaml")
with ray_output_to(root / "ray.log", ("ray", "optuna", "mlflow")):
    start_local_ray(sweep)                  # Ray's start-up notices (token authentication...)
    persistent_searcher(sweep, root)        # Optuna's study
    from mlflow.tracking import MlflowClient
    MlflowClient(f"sqlite:///{root}/mlflow.db").create_experiment("q")  # MLflow/alembic database set-up lines
    ray.shutdown()
print("done")
"""


def test_a_sweep_start_prints_nothing_of_ray_optuna_or_mlflow(tmp_path):
    """The noisy part of a sweep (Ray, its Optuna study, an MLflow tracking database) on the console:
    only the script's own line; the libraries' lines are in ray.log."""
    pytest.importorskip("optuna")
    pytest.importorskip("mlflow")
    # a user's shell: an earlier in-process ray.init sets RAY_AUTH_MODE=token in os.environ, and with it
    # Ray skips the start-up notice this test looks for
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    result = subprocess.run([sys.executable, "-c", QUIET_START, str(tmp_path / "s")], capture_output=True,
                            text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "done" and result.stderr.strip() == "", result.stderr[-3000:]
    log = (tmp_path / "s" / "ray.log").read_text()
    assert "Token authentication" in log and "mlflow" in log


def test_v_adds_crystalaes_debug_lines_to_generate(tmp_path, capsys, tiny_checkpoint):
    from crystalae.cli import main

    command = ["generate", "--checkpoint", str(tiny_checkpoint), "--sample", "1", "--prior", "normal"]
    try:
        generated(main([*command, "--out", str(tmp_path / "a"), "-v"]), tmp_path / "a", 1)  # exit 1 if none decoded
        verbose = capsys.readouterr().err
    finally:
        main(["models", "--registry", str(tmp_path / "none")])  # back to the default verbosity
    assert "crystalae: debug: model" in verbose and "grid 8^3" in verbose and "decoded 1 crystals" in verbose
    capsys.readouterr()
    main([*command, "--out", str(tmp_path / "b")])
    assert "crystalae: debug:" not in capsys.readouterr().err


NOTEBOOK = """
import sys, types, warnings
caught = warnings.catch_warnings(record=True)
seen = caught.__enter__()
warnings.simplefilter("always")
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")  # tqdm.auto: "inside a Jupyter kernel"
shell = type("ZMQInteractiveShell", (), {})()
sys.modules["IPython"] = types.SimpleNamespace(get_ipython=lambda: shell)
SKIP_CRYSTALAE = len(sys.argv) > 1
if not SKIP_CRYSTALAE:
    import crystalae
    import crystalae.api  # every module's `from tqdm.auto import tqdm`
from tqdm.auto import tqdm
print(sum("IProgress not found" in str(w.message) for w in seen))
"""


def test_progress_bars_in_a_notebook_without_ipywidgets_come_without_a_warning():
    from crystalae.extras import available

    if available("ipywidgets"):
        pytest.skip("ipywidgets is installed: tqdm draws its notebook widget")
    bare = subprocess.run([sys.executable, "-c", NOTEBOOK, "bare"], capture_output=True, text=True, timeout=120)
    assert bare.stdout.strip() == "1", bare.stderr[-2000:]  # tqdm.auto alone warns in this kernel
    result = subprocess.run([sys.executable, "-c", NOTEBOOK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr[-2000:]


def test_structure_like_is_a_type_naming_what_the_api_takes():
    import typing
    from pathlib import Path

    from pymatgen.core import Structure

    import crystalae

    members = typing.get_args(crystalae.StructureLike)
    assert {Structure, str, Path} <= set(members) and typing.ForwardRef("Atoms") in members
