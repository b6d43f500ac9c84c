"""Promote a sweep's trial into the model registry: the one path from a sweep to a registry version,
for `crystalae promote`, the demo job and the dashboard."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from crystalae.checkpoint import FILENAME, read_checkpoint
from crystalae.cli_args import location
from crystalae.locations import SWEEPS
from crystalae.prior import with_latent_prior
from crystalae.registry import Registry, RegistryError, check_model_name
from crystalae.search.layout import is_sweep, local_checkpoint, sweep_dataset, sweep_dir, trial_folder
from crystalae.search.results import collect_trials, resolve_checkpoint
from crystalae.uri_fs import absolute, is_remote, list_files, read_json
from crystalae.uri_fs import join as storage_join

log = logging.getLogger(__name__)

__all__ = ["checkpoint_name", "promote_source", "promote_trial"]


def promote_trial(root: str | Path, registry: Registry, trial: str | None = None, *, name: str | None = None,
                  alias: str | None = None, metric: str | None = None, mode: str | None = None,
                  within: float | None = None, prefer: str | None = None, fit_prior: bool = True) -> dict[str, Any]:
    """Promote the checkpoint `resolve_checkpoint` names (the best of `trial`, or of the whole sweep) into
    `registry` (a crystalae.registry.Registry) as a new version of `name` (default: the sweep's name).
    The CLI (`promote`, `demo`) and the dashboard promote trials only through here, so every version
    promoted from a sweep records one `source`: {"checkpoint": its folder (absolute) or URI, "sweep",
    "trial", "epoch"}, plus "latent_prior" when one was fitted.

    With `fit_prior` (the default: the trial's dataset is known), a checkpoint without a latent prior gets
    one fitted on its trial's dataset first (see `crystalae.prior`), so the version samples crystals where
    its decoder was trained; without a prior, `generate` refuses the version.

    Returns:
        The new version's manifest (`Registry.promote`).

    Raises:
        ValueError: as `resolve_checkpoint`, or `Registry.promote` (a bad name or alias, RegistryError; an
            unreadable checkpoint, CheckpointError).
    """
    summary = collect_trials(root)
    chosen, checkpoint = resolve_checkpoint(summary, trial, metric=metric, mode=mode, within=within, prefer=prefer)
    folder = local_checkpoint(root, checkpoint.path)
    source = {"checkpoint": str(absolute(storage_join(root, checkpoint.path))), "sweep": summary.name,
              "trial": chosen.trial_id, "epoch": checkpoint.epoch}
    name = summary.name if name is None else name
    registry.check_names(name, alias)  # a bad name is refused now, not after the prior is fitted
    if not fit_prior:
        return registry.promote(folder, name, alias=alias, source=source)
    payload = read_checkpoint(folder)
    data = None if payload.get("latent_prior") is not None else sweep_dataset(root, payload["dataset_hash"])
    if data is None:  # it has a prior already, or the trial's dataset is gone: promote it as it is
        if payload.get("latent_prior") is None:
            log.warning("trial %s: its dataset is gone from %s, so no latent prior was fitted; `generate` refuses "
                        "the version until `crystalae fit-prior` adds one", chosen.trial_id, root)
        return registry.promote(folder, name, alias=alias, source=source)
    with tempfile.TemporaryDirectory() as tmp:
        with_latent_prior(folder, data, Path(tmp) / "checkpoint")
        return registry.promote(Path(tmp) / "checkpoint", name, alias=alias,
                                source={**source, "latent_prior": "fitted on the trial dataset's train split"})


def promote_source(source: str, registry: Registry, storage: str | Path = SWEEPS, *, best: bool = False,
                   name: str | None = None, alias: str | None = None, metric: str | None = None,
                   mode: str | None = None, within: float | None = None, prefer: str | None = None,
                   fit_prior: bool | None = None) -> dict[str, Any]:
    """What `crystalae promote SOURCE` promotes into `registry`: with `best`, the best checkpoint of the
    sweep `source` (a sweep folder, URI or name under `storage`; `within`/`prefer` as `resolve_checkpoint`);
    else a checkpoint folder as it is, or a trial (`RUN/TRIAL` under `storage`, or a trial folder).

    `fit_prior` (default on for sweep trials) fits the sampling prior on the trial's dataset first; a
    checkpoint folder names no dataset, so it is refused there. Returns the new version's manifest.
    Raises ValueError naming the option or the source that is wrong.
    """
    if (within is not None or prefer) and not best:
        raise ValueError("--within and --prefer choose among a sweep's trials: use them with --best")
    if prefer and within is None:
        raise ValueError("--prefer needs --within D (how far below the best objective a trial may be)")
    chosen = dict(name=name or None, alias=alias, metric=metric, mode=mode,  # name '': the default
                  fit_prior=fit_prior is not False)  # on by default: a trial's dataset is known
    if best:
        given = location(source)
        root = given if isinstance(given, str) or given.is_dir() else sweep_dir(storage, source)
        return promote_trial(root, registry, **chosen, within=within, prefer=prefer)
    if (Path(source) / FILENAME).exists():
        if fit_prior:
            raise ValueError(f"--fit-prior fits on a sweep trial's dataset, which {source} does not name: run "
                             f"`crystalae fit-prior --checkpoint {source} --data ITS_DATASET --out NEW` first")
        name = name or checkpoint_name(Path(source))
        if name is None:
            raise ValueError(f"{source}: cannot derive a model name from this path; give --name NAME")
        entry = registry.promote(source, name, alias=alias, source={"given": source})
        if "latent_prior" not in read_json(Path(source) / "config.json"):
            log.warning("%s has no latent prior, so `generate` refuses it until `crystalae fit-prior` adds one",
                        entry["ref"])
        return entry
    root, trial = _find_trial(Path(source), storage)
    return promote_trial(root, registry, trial, **chosen)


def checkpoint_name(folder: Path) -> str | None:
    """The default model name of a checkpoint folder: its own name (pretrained/perov_5 -> perov_5), or for a
    Ray checkpoint_00003 folder its run's (two levels up); None when that is no valid model name."""
    folder = folder.resolve()
    try:
        return check_model_name(folder.parent.parent.name if folder.name.startswith("checkpoint_") else folder.name)
    except RegistryError:
        return None


def _find_trial(source: Path, storage: str | Path) -> tuple[str | Path, str]:
    """RUN/TRIAL (under the sweep storage) or a trial folder -> (its sweep folder, the trial id)."""
    root = source.parent.parent if source.is_dir() else sweep_dir(storage, str(source.parent))
    folder = trial_folder(root, source.name)
    if (list_files(folder) if is_remote(folder) else Path(folder).is_dir()) and is_sweep(root):
        return root, source.name
    raise ValueError(f"{source}: not a checkpoint folder, a trial folder or RUN/TRIAL under {storage}")
