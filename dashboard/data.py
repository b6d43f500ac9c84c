"""Loading for the dashboard pages: paths, sweeps, checkpoints, datasets and models, all cached.

Tables and summaries use `st.cache_data` (with a short TTL where a running sweep changes them);
loaded models use `st.cache_resource`, since torch modules should be shared, not copied per rerun.
Functions take plain strings so Streamlit can hash their arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import streamlit as st

from crystalae.checkpoint import (
    FILENAME,
    CheckpointError,
    LoadedModel,
)
from crystalae.coverage import fingerprints
from crystalae.dataset import column_numpy, read_table
from crystalae.generate import encode, reference_structures
from crystalae.loading import find_model
from crystalae.loading import load_model as load_model_at
from crystalae.locations import REGISTRY, SWEEPS
from crystalae.metrics import compare
from crystalae.pretrained import pretrained_models
from crystalae.readout import decode_latents, decoding_options, outputs_to_structures
from crystalae.registry import Registry, RegistryError
from crystalae.search import layout, results
from crystalae.search.config import SweepConfig
from crystalae.search.results import SweepSummary
from crystalae.sources import list_entries
from crystalae.uri_fs import absolute, is_remote, read_json
from crystalae.uri_fs import join as storage_join
from crystalae.voxelize import Density

if TYPE_CHECKING:  # pymatgen and matminer load only on the pages that score crystals
    from crystalae.coverage import Fingerprints

STORAGE_ENV = "CRYSTALAE_STORAGE"
REGISTRY_ENV = "CRYSTALAE_REGISTRY"
LIVE_TTL = 10  # seconds: sweep folders change while trials run
RECON_METRICS = ["val_score", "val_recovery", "val_match_rate", "val_rms", "val_atom_count_rate", "val_species_accuracy",
                 "val_density_mse"]
MISSING_ERRORS = (CheckpointError, RegistryError, OSError, ValueError)  # what a vanished file can raise


@dataclass(frozen=True)
class Paths:
    storage: Path  # sweeps, read locally: the folder itself, or a mirror of an object-storage URI
    registry: str | Path  # a folder or an object-storage URI (Registry keeps its own mirror)
    storage_location: str = ""  # what the user named, for display

    def registry_folder(self, ref: str, name: str, version: int) -> Path:
        """A version's folder on this machine (from object storage, downloaded on first use)."""
        registry = Registry(self.registry)
        return find_model(ref, self.registry) if registry.remote else registry.root / name / f"v{version}"


def app_paths(argv: list[str] | None = None) -> Paths:
    """`--storage` / `--registry` after `--` on the streamlit command line, else env vars, else defaults."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--storage")
    parser.add_argument("--registry")
    # parse_known_args: under pytest (AppTest) sys.argv holds pytest's own options
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    storage = args.storage or os.environ.get(STORAGE_ENV) or str(SWEEPS)
    registry = args.registry or os.environ.get(REGISTRY_ENV) or str(REGISTRY)
    return Paths(Path(mirror_storage(storage)) if is_remote(storage) else absolute(os.path.expanduser(storage)),
                 absolute(os.path.expanduser(registry)), storage)


@st.cache_data(ttl=LIVE_TTL, show_spinner="Reading sweeps from object storage…")
def mirror_storage(location: str) -> str:
    """A local copy of sweeps on object storage (all but Tune's state), refreshed every few seconds;
    unchanged files are not fetched again."""
    return str(layout.mirror_sweeps(location))


# ---- sweeps ---------------------------------------------------------------------------------------

@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def find_sweeps(storage: str) -> list[str]:
    """Sweep folders at most two levels below `storage`, sorted (strings, so Streamlit can hash them)."""
    return [str(p) for p in layout.find_sweeps(storage)]


def sweep_label(storage: Path, sweep_root: str) -> str:
    rel = Path(sweep_root).relative_to(storage) if Path(sweep_root).is_relative_to(storage) else Path(sweep_root)
    return str(rel) if str(rel) != "." else Path(sweep_root).name


@st.cache_data(ttl=LIVE_TTL, show_spinner="Reading sweep…")
def load_summary(sweep_root: str) -> SweepSummary:
    return results.collect_trials(sweep_root)


@st.cache_data(ttl=LIVE_TTL)
def first_rung(sweep_root: str) -> int:
    """The epoch of the sweep's first ASHA cut (its grace period); 1 where the sweep.json is unreadable."""
    try:
        return SweepConfig.from_dict(read_json(storage_join(sweep_root, layout.SWEEP_FILE))).asha_grace_period()
    except (OSError, ValueError, TypeError, KeyError):
        return 1


def trial_frame(summary: SweepSummary) -> pd.DataFrame:
    """One row per trial: id, status, epochs, best objective, params, then the last epoch's val metrics."""
    metric = summary.objective.metric
    rows = []
    for t in summary.trials:
        last = t.history[-1] if t.history else {}
        rows.append({"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs,
                     "checkpoints": len(t.checkpoints), f"best {metric}": t.best_value,
                     **{k: _scalar(v) for k, v in t.params.items()},
                     **{f"last {k}": last.get(k) for k in ["val_loss", *RECON_METRICS]}})
    return pd.DataFrame(rows)


def _scalar(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def history_metrics(summary: SweepSummary) -> list[str]:
    """Numeric per-epoch metrics seen in any trial's history, val_* first."""
    names = {k for t in summary.trials for h in t.history for k, v in h.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
    return sorted(names, key=lambda k: (not k.startswith("val_"), k))


@st.cache_data(ttl=LIVE_TTL, show_spinner="Computing parameter importance…")
def param_importance(sweep_root: str, study_name: str, min_trials: int = 3) -> tuple[dict[str, float] | None, str]:
    """(importances, note) from the sweep's Optuna study; None with the reason when it cannot be computed."""
    import warnings

    import optuna

    db = layout.study_path(sweep_root)
    if not db.exists():  # opening a missing sqlite file would create an empty one
        return None, f"No Optuna study at {db}."
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}")
    except Exception as exc:  # noqa: BLE001  KeyError for an unknown name, sqlalchemy errors for a locked db
        return None, f"Could not open Optuna study {study_name!r}: {exc}"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < min_trials:
        return None, (f"Parameter importance needs at least {min_trials} completed trials; "
                      f"the study has {len(complete)} so far.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                importances = optuna.importance.get_param_importances(study)
            except ImportError:  # the default fANOVA evaluator needs scikit-learn; PED-ANOVA does not
                importances = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (ValueError, RuntimeError) as exc:
            return None, f"Optuna could not compute importances: {exc}"
    note = f"From {len(complete)} completed trials; few trials make this a rough estimate."
    if any("equal" in str(w.message) for w in caught):
        note += " Optuna reports the trials cannot separate the parameters yet."
    return dict(importances), note


# ---- checkpoints and models -----------------------------------------------------------------------

@dataclass(frozen=True)
class ModelChoice:
    """A model the user can pick: a registry version or a trial's best checkpoint."""

    label: str
    path: str  # checkpoint folder
    ref: str = ""  # what `crystalae.load` and `--model` take for it: NAME@N, a shipped name, a checkpoint path
    sweep_root: str | None = None  # where to look for its dataset first
    origin: str | None = None  # registry versions: the checkpoint folder it was promoted from
    shipped: bool = False  # a shipped reference model (crystalae.pretrained)


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def registry_entries(registry: str) -> list[dict[str, Any]]:
    """Every registry version's manifest with its aliases (empty when the registry does not exist)."""
    return Registry(registry).entries()


def model_choices(paths: Paths) -> tuple[list[ModelChoice], list[str]]:
    """(choices, problems): registry versions first, then each trial's best checkpoint of every sweep, then
    the shipped reference models (`crystalae.pretrained`), which every install has."""
    choices, problems = [], []
    try:
        for e in registry_entries(str(paths.registry)):
            tags = f" [{', '.join(e['aliases'])}]" if e["aliases"] else ""
            choices.append(ModelChoice(f"{e['ref']}{tags} (registry)",
                                       str(paths.registry_folder(e["ref"], e["name"], e["version"])), e["ref"],
                                       origin=e.get("source", {}).get("checkpoint")))
    except (OSError, ValueError) as exc:
        problems.append(f"Registry {paths.registry} is unreadable: {exc}")
    for root in find_sweeps(str(paths.storage)):
        try:
            summary = load_summary(root)
        except (OSError, ValueError) as exc:
            problems.append(f"Sweep {root} is unreadable: {exc}")
            continue
        name = sweep_label(paths.storage, root)
        for t in summary.trials:
            if t.best_checkpoint_path:
                epoch = "?" if t.best_epoch is None else t.best_epoch
                folder = str(Path(root) / t.best_checkpoint_path)
                choices.append(ModelChoice(f"{name}/{t.trial_id} (best, epoch {epoch})", folder, folder,
                                           sweep_root=root))
    choices += [ModelChoice(f"{m['name']} (shipped)", str(m["path"]), m["name"], shipped=True)
                for m in pretrained_models()]
    return choices, problems


def distinct(choices: list[ModelChoice], count: int) -> list[ModelChoice]:
    """The first `count` choices that are different models (a registry copy of a trial checkpoint is not)."""
    picked: list[ModelChoice] = []
    for c in choices:
        seen = {p.path for p in picked} | {p.origin for p in picked if p.origin}
        if c.path not in seen and (c.origin is None or c.origin not in seen) and len(picked) < count:
            picked.append(c)
    return picked


@st.cache_data(show_spinner=False)
def checkpoint_info(path: str) -> dict[str, Any]:
    """config.json of a checkpoint folder (metrics, configs, epoch); CheckpointError if it is gone."""
    folder = Path(path)
    if not (folder / FILENAME).exists():
        raise CheckpointError(f"checkpoint {folder} is missing ({FILENAME} not found; was it deleted?)")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"checkpoint {folder} has no config.json (every checkpoint crystalae writes has one)")
    return json.loads((folder / "config.json").read_text())


@st.cache_resource(max_entries=6, show_spinner="Loading model…")
def load_model(path: str) -> LoadedModel:
    return load_model_at(path)  # the CLI's and the API's loader: same device choice and decoding settings


def metric_value(metrics: dict[str, Any], name: str) -> Any:
    """A metric under its own name or the `val_` prefixed one (confusion, per_element_accuracy, …)."""
    return metrics.get(name, metrics.get(f"val_{name}"))


def per_element_accuracy(metrics: dict[str, Any]) -> dict[str, float]:
    """{element symbol: accuracy} from the checkpoint's per-element accuracy (keys are atomic numbers)."""
    raw = metric_value(metrics, "per_element_accuracy") or {}
    return {element_symbol(int(z)): float(v) for z, v in sorted(raw.items(), key=lambda kv: int(kv[0]))
            if v is not None}


def element_symbol(z: int) -> str:
    from pymatgen.core import Element

    return "none" if z == 0 else Element.from_Z(z).symbol


SPECIES_PATHS = {"site": "site head", "segmenter": "segmenter (paper)", "density": "peak weight"}


def species_path(info: dict[str, Any]) -> str:
    """How a checkpoint's model assigns species, in words."""
    return SPECIES_PATHS.get((info.get("model_config") or {}).get("species_from"), "?")


def training_summary(info: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's run trained and how long an epoch took (the median of its recorded epochs,
    seconds): the cost side of comparing atom readers. A reader trained alone on another model's fixed
    VAE (`train.reader_only`) says so, since its epochs skip the VAE's backward pass."""
    seconds = [h["epoch_seconds"] for h in info.get("history") or []
               if isinstance(h.get("epoch_seconds"), (int, float)) and not isinstance(h.get("epoch_seconds"), bool)]
    train = info.get("train_config") or {}
    trained = (f"reader only, on {train.get('init_from')}'s fixed VAE" if train.get("reader_only")
               else "VAE and reader together")
    return {"trained": trained, "s / epoch": round(float(np.median(seconds)), 1) if seconds else None}


# ---- datasets -------------------------------------------------------------------------------------

@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def find_dataset(storage: str, voxel_config: dict[str, Any], prefer: str | None = None) -> str | None:
    """The prepared dataset whose manifest config equals `voxel_config` (the preferred sweep first)."""
    roots = ([prefer] if prefer else []) + [r for r in find_sweeps(storage) if r != prefer]
    for root in roots:
        from crystalae.dataset import read_manifest

        for folder in layout.dataset_folders(root):
            try:
                if read_manifest(folder).get("config") == voxel_config:
                    return str(folder)
            except (OSError, ValueError):
                continue
    return None


@st.cache_data(show_spinner="Reading validation ids…")
def validation_ids(dataset: str) -> list[str]:
    table = read_table(dataset, split="val", columns=["material_id", "split", "rotation"])
    return sorted({m for m, r in zip(table.column("material_id").to_pylist(), table.column("rotation").to_pylist())
                   if r == 0})


@st.cache_data(show_spinner=False)
def validation_item(dataset: str, material_id: str) -> dict[str, Any] | None:
    """The stored row of one validation crystal: cif, density, labels, lattice, origin (rotation 0)."""
    import pyarrow.compute as pc

    table = read_table(dataset, split="val")
    table = table.filter(pc.and_(pc.equal(table.column("material_id"), material_id),
                                 pc.equal(table.column("rotation"), 0)))
    if table.num_rows == 0:
        return None
    return {"material_id": material_id, "cif": table.column("cif")[0].as_py(),
            "density": column_numpy(table, "density")[0], "labels": column_numpy(table, "labels")[0],
            "lattice": column_numpy(table, "lattice")[0].reshape(3, 3), "origin": column_numpy(table, "origin")[0]}


@st.cache_data(show_spinner="Reconstructing…", max_entries=64)
def reconstruction(checkpoint: str, dataset: str, material_id: str) -> dict[str, Any]:
    """Encode -> decode one stored validation crystal: input/output grids, decoded CIF and match/RMS."""
    from pymatgen.core import Structure

    loaded = load_model(checkpoint)
    item = validation_item(dataset, material_id)
    if item is None:
        raise CheckpointError(f"{material_id} is not in the validation split of {dataset}")
    density = Density(item["density"], item["labels"], item["lattice"], item["origin"], loaded.voxel)
    z = encode(loaded, [density])
    outputs = decode_latents(loaded.model, loaded.voxel, z)  # decoded once: grid for the view, atoms below
    predicted = outputs_to_structures(loaded.model, loaded.voxel, outputs,
                                      **decoding_options(loaded, [density], reconstructing=True))[0]
    true = Structure.from_str(item["cif"], fmt="cif")
    return {"input": item["density"], "output": outputs["density"][0], "true_cif": item["cif"],
            "cif": predicted.to(fmt="cif") if predicted is not None else None, **compare(predicted, true)}


@st.cache_data(show_spinner=False)
def source_ids(source: str) -> list[str]:
    """Material ids of a structure source (demo:N, CSV, folder, file); SourceError if unreadable."""
    return [e.material_id for e in list_entries(source)]


# ---- generation metrics ---------------------------------------------------------------------------

@st.cache_data(show_spinner="Fingerprinting the reference crystals (CrystalNN, ~0.1 s a crystal)…", max_entries=8)
def reference_fingerprints(source: str) -> Fingerprints:
    """CDVAE fingerprints of a reference source's crystals; cached, since one reference serves many batches
    (a source whose files change is read again after the sidebar's Refresh)."""
    return fingerprints(reference_structures(source), desc="reference")
