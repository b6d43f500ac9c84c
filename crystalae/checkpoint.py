"""Self-describing checkpoints: one folder with `checkpoint.pt` (weights + configs + metrics), loadable
with `torch.load(..., weights_only=True)`, and `config.json` beside it for people and the dashboard."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crystalae.config import VoxelConfig
from crystalae.files import atomic_write, write_json
from crystalae.models import CrystalAE, ModelConfig
from crystalae.provenance import versions

__all__ = [
    "CheckpointError", "FILENAME", "FORMAT", "LoadedModel", "export_checkpoint", "load_checkpoint", "read_checkpoint",
    "save_checkpoint",
]

FORMAT = "crystalae-checkpoint/1"
FILENAME = "checkpoint.pt"
_REQUIRED = ("model", "model_config", "voxel_config", "epoch", "metrics", "train_config", "dataset_hash")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the requested configuration."""


@dataclass
class LoadedModel:
    model: CrystalAE
    voxel: VoxelConfig
    meta: dict[str, Any]  # train config, metrics, epoch, dataset hash

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(folder: str | Path, model: CrystalAE, voxel: VoxelConfig, *, epoch: int,
                    metrics: dict[str, Any], train_config: dict[str, Any], dataset_hash: str,
                    optimizer: torch.optim.Optimizer | None = None, history: list[dict] | None = None,
                    lineage: dict[str, Any] | None = None) -> Path:
    """Write `checkpoint.pt` + `config.json` into `folder`; `history` is the per-epoch metric record,
    `lineage` where the run's configuration came from (a sweep trial: sweep, trial, params)."""
    folder = Path(folder)
    payload = {
        "format": FORMAT, "epoch": epoch, "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "model_config": model.config.as_dict(), "voxel_config": voxel.as_dict(),
        "train_config": train_config, "metrics": _plain(metrics), "dataset_hash": dataset_hash,
        "history": _plain({"h": history or []})["h"], "versions": versions(),
    }
    if lineage:
        payload["lineage"] = _plain(lineage)
    return _write(folder, payload)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (weights-only unpickling: no code runs from the file)."""
    path = Path(path)
    file = path / FILENAME if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a folder with {FILENAME} or the file)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # not a class or function reference: just damaged
            raise CheckpointError(f"checkpoint {file} is not readable: truncated, damaged or not a PyTorch file") from None
        # PyTorch's own message suggests unsafe loading; crystalae never unpickles code, so we do not
        raise CheckpointError(f"checkpoint {file} holds objects other than tensors and plain data, "
                              "so it cannot be loaded safely; it was not written by crystalae") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {file} is not readable ({type(exc).__name__}): "
                              "truncated, damaged or not a PyTorch file") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a crystalae checkpoint (format {FORMAT} expected)")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {file} is incomplete: missing {missing}")
    return payload


def _write(folder: Path, payload: dict[str, Any]) -> Path:
    atomic_write(folder / FILENAME, lambda tmp: torch.save(payload, tmp))
    described = {k: v for k, v in payload.items() if k not in ("model", "optimizer", "latent_prior")}
    if payload.get("latent_prior") is not None:  # tensors: say what it is, not its numbers
        described["latent_prior"] = {k: v for k, v in payload["latent_prior"].items() if not torch.is_tensor(v)}
    write_json(folder / "config.json", described)
    return folder


def export_checkpoint(source: str | Path, folder: str | Path, latent_prior: dict[str, Any] | None = None,
                      decoding: dict[str, Any] | None = None) -> Path:
    """Copy a checkpoint without its optimizer state (a shipped model: about a third of the size),
    optionally adding a fitted latent prior (see `crystalae.prior`) or decoding settings chosen on
    validation (`{"symprec": Å}`: snap decoded crystals to their symmetry, see `crystalae.symmetry`)."""
    payload = read_checkpoint(source)
    payload["optimizer"] = None
    if latent_prior is not None:
        payload["latent_prior"] = latent_prior
    if decoding is not None:
        payload["decoding"] = decoding
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return _write(folder, payload)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from the checkpoint alone; strict, so mismatched weights fail loudly."""
    payload = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        voxel = VoxelConfig.from_dict(payload["voxel_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid configuration: {exc}") from None
    _check_weights_fit(path, config, payload["model"])
    model = CrystalAE(config)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model config: {exc}") from None
    model.to(device).eval()
    meta = {k: payload.get(k) for k in ("epoch", "metrics", "train_config", "dataset_hash", "history", "latent_prior",
                                        "lineage", "decoding")}
    if meta["latent_prior"] is not None and not _prior_fits(meta["latent_prior"], config.latent_dim):
        raise CheckpointError(f"checkpoint {path}: latent_prior does not fit latent_dim {config.latent_dim}")
    return LoadedModel(model, voxel, meta)


def _prior_fits(prior: Any, latent_dim: int) -> bool:
    """A stored prior is a dict of a mean (d,), a Cholesky factor (d, d), optionally training codes
    (n, d), and a known kind."""
    if not (isinstance(prior, dict) and all(torch.is_tensor(prior.get(k)) for k in ("mean", "scale_tril"))):
        return False
    codes = prior.get("codes")
    return (prior["mean"].shape == (latent_dim,) and prior["scale_tril"].shape == (latent_dim, latent_dim)
            and (codes is None or (torch.is_tensor(codes) and codes.ndim == 2 and len(codes) > 0
                                   and codes.shape[1] == latent_dim))
            and prior.get("kind", "fitted") in ("fitted", "posterior"))


def _check_weights_fit(path: str | Path, config: ModelConfig, weights: Any) -> None:
    """Build the model on the meta device (no memory) and compare shapes with the stored weights, so a
    crafted config can never make us allocate more than the file itself holds."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint {path}: `model` is not a mapping of tensors")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CrystalAE(config).state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes != stored:
        wrong = sorted(set(shapes) ^ set(stored)) or sorted(k for k in shapes if shapes[k] != stored[k])
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model config "
                              f"({len(wrong)} tensors differ, e.g. {wrong[:3]})")


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe (hence weights-only-safe) copy: numpy scalars become floats, NaN becomes None."""
    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (bool, int, str)) or v is None:
            return v
        v = float(v)
        return None if v != v else v
    return clean(metrics)
