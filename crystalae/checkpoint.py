"""Self-describing checkpoints: one folder with `checkpoint.pt` (weights + configs + metrics), loadable
with `torch.load(..., weights_only=True)`, and `config.json` beside it for people and the dashboard."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crystalae.config import VoxelConfig
from crystalae.io import atomic_write, write_json
from crystalae.models import CrystalAE, ModelConfig

FORMAT = "crystalae-checkpoint/1"
FILENAME = "checkpoint.pt"


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
                    optimizer: torch.optim.Optimizer | None = None, history: list[dict] | None = None) -> Path:
    """Write `checkpoint.pt` + `config.json` into `folder`; `history` is the per-epoch metric record."""
    folder = Path(folder)
    payload = {
        "format": FORMAT, "epoch": epoch, "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "model_config": model.config.as_dict(), "voxel_config": voxel.as_dict(),
        "train_config": train_config, "metrics": _plain(metrics), "dataset_hash": dataset_hash,
        "history": _plain({"h": history or []})["h"],
    }
    return _write(folder, payload)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (weights-only unpickling: no code runs from the file)."""
    path = Path(path)
    file = path / FILENAME if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a folder with {FILENAME} or the file)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {file} is not readable: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a crystalae checkpoint (format {FORMAT} expected)")
    return payload


def _write(folder: Path, payload: dict[str, Any]) -> Path:
    atomic_write(folder / FILENAME, lambda tmp: torch.save(payload, tmp))
    write_json(folder / "config.json", {k: v for k, v in payload.items() if k not in ("model", "optimizer")})
    return folder


def export_checkpoint(source: str | Path, folder: str | Path) -> Path:
    """Copy a checkpoint without its optimizer state (a shipped model: about a third of the size)."""
    payload = read_checkpoint(source)
    payload["optimizer"] = None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return _write(folder, payload)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from the checkpoint alone; strict, so mismatched weights fail loudly."""
    payload = read_checkpoint(path)
    model = CrystalAE(ModelConfig.from_dict(payload["model_config"]))
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model config: {exc}") from None
    model.to(device).eval()
    meta = {k: payload.get(k) for k in ("epoch", "metrics", "train_config", "dataset_hash", "history")}
    return LoadedModel(model, VoxelConfig.from_dict(payload["voxel_config"]), meta)


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
