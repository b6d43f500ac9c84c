"""A run that starts from a trained model (`TrainConfig.init_from`): the architecture it keeps, the
weights it takes and the voxel settings it must share.

    crystalae train --data runs/perov_5 --config reader.yaml
    # reader.yaml:  train: {init_from: perov_5, reader_only: true}   model: {species_from: segmenter}

With `reader_only` the run trains a new species reader on the base's VAE, which stays as the base left
it (`CrystalAE.freeze_vae`): the paper's segmenter trained on a finished model's reconstructions, or a
fresh site head, compared on one VAE. Without it the run fine-tunes every weight that fits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from crystalae.checkpoint import CheckpointError, read_checkpoint
from crystalae.config import ConfigError, VoxelConfig, field_names
from crystalae.loading import find_model
from crystalae.models import CrystalAE, ModelConfig
from crystalae.pretrained import pretrained_models

__all__ = ["base_configs", "check_base_voxel", "find_base", "load_base_weights"]


def find_base(ref: str) -> str:
    """What a Ray worker on another node or in another folder can find `ref` by: a shipped model's name
    (also for a path to its folder: checkpoints then record no folder of this machine), else the absolute
    checkpoint path that `ref` (a path or a registry name) means."""
    path = Path(find_model(ref)).resolve()
    shipped = {Path(m["path"]).resolve(): m["name"] for m in pretrained_models()}
    return shipped.get(path, str(path))


def base_configs(ref: str) -> tuple[dict[str, Any], VoxelConfig]:
    """The base model's architecture as ModelConfig overrides (the dataset's fields, grid, species, ...,
    are set again from the data, and the caller's overrides win over these) and its voxel settings: one
    read of the checkpoint for both."""
    payload = _payload(ref)
    settable = field_names(ModelConfig, settable=True)
    return ({k: v for k, v in payload["model_config"].items() if k in settable},
            VoxelConfig.from_dict(payload["voxel_config"]))


def check_base_voxel(ref: str, saved: VoxelConfig, voxel: VoxelConfig) -> None:
    """Refuse data voxelized otherwise than the base model `ref` (its settings `saved`; ConfigError naming
    both): its VAE would read densities it never learned."""
    if saved != voxel:
        wanted = voxel.as_dict()
        diff = {k: (v, wanted[k]) for k, v in saved.as_dict().items() if wanted[k] != v}
        raise ConfigError(f"init_from {ref}: the data's voxel settings differ from the model's "
                          f"(model vs data: {diff}); prepare the data with the model's settings")


def load_base_weights(model: CrystalAE, path: str, vae_only: bool = False) -> list[str]:
    """Copy into `model` every weight of the base whose name and shape fit (with `vae_only`, the VAE's
    alone: a new reader starts fresh even where the base has one of its kind); the VAE's must all fit.
    Returns the names of the weights that start fresh."""
    weights = _payload(path)["model"]
    own = model.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape
            and (k.startswith("vae.") or not vae_only)}
    missing = sorted(k for k in own if k.startswith("vae.") and k not in fits)
    if missing:
        raise CheckpointError(f"init_from {path}: its VAE does not fit this model ({len(missing)} weights differ, "
                              f"e.g. {missing[0]}); keep the base's architecture (latent_dim, depth, widths)")
    model.load_state_dict(fits, strict=False)
    return sorted(k for k in own if k not in fits)


def _payload(ref: str) -> dict[str, Any]:
    """The base checkpoint `ref` (a `find_base` reference) names."""
    return read_checkpoint(find_model(ref))
