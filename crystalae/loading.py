"""One way from a model reference to a model: `crystalae.load`, `--model`/`--checkpoint` and the dashboard
all call `load_model`, so a reference that works in one works in the others.

A reference is, in this order: an existing checkpoint folder or `checkpoint.pt` file, a shipped model's
name (`perov_5`, see `crystalae models`), or a registry reference (`NAME`, `NAME@3`, an alias such as
`champion`) in the registry given (default `runs/registry`, or an `s3://` URI).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crystalae.checkpoint import LoadedModel, load_checkpoint
from crystalae.locations import REGISTRY
from crystalae.pretrained import pretrained_models
from crystalae.registry import Registry, RegistryError
from crystalae.symmetry import set_symprec

__all__ = ["ModelNotFound", "choose_device", "find_model", "load_model"]


class ModelNotFound(RegistryError, LookupError):
    """A reference that names no checkpoint path, shipped model or registry model (a ValueError for the
    CLI's one-line errors, a LookupError for the API's callers)."""


def find_model(ref: str | Path, registry: str | Path | None = None) -> Path:
    """The checkpoint folder or file `ref` means (see the module docstring). Raises `ModelNotFound`
    naming what was tried."""
    text = str(ref).strip()
    if not text:
        raise ModelNotFound("give a model: a shipped name (perov_5), a checkpoint path or a registry reference")
    if Path(ref).exists():
        return Path(ref)
    if isinstance(ref, Path) or "/" in text or "\\" in text or text.startswith(("~", ".")) or text.endswith(".pt"):
        # a path, not a model name (names hold no slashes): say it is missing, not that the name is invalid
        raise ModelNotFound(f"{text}: no such checkpoint folder or file (the path does not exist)")
    shipped = {m["name"]: m["path"] for m in pretrained_models()}
    if text in shipped:
        return shipped[text]
    try:
        return Registry(registry if registry is not None else REGISTRY).resolve(text)
    except RegistryError as exc:
        names = ", ".join(sorted(shipped)) or "none in this install"
        raise ModelNotFound(f"{exc}; nor is {text!r} a shipped model ({names}) or an existing checkpoint "
                            "path (--checkpoint PATH)") from None


def choose_device(device: Any = None) -> str:
    """`device` checked against this machine (None: CUDA when torch sees a GPU, else the CPU). Raises one
    ValueError where torch would say 'Expected one of cpu, cuda, ipu, xpu, ...' for a typo or raise an
    AssertionError for CUDA in a CPU-only build."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if parsed.type == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= gpus:
            raise ValueError(f"device {device!r}: this machine has {gpus} CUDA GPU{'' if gpus == 1 else 's'} "
                             "torch can use (give device='cpu')")
    return str(device)


def load_model(ref: str | Path, registry: str | Path | None = None, *, device: Any = None,
               symprec: float | None = None) -> LoadedModel:
    """The model `ref` names, on `device` (see `choose_device`), decoding with `symprec` Å of symmetry
    snapping (None: the model's own setting; 0: the raw decode; see `crystalae.symmetry`).

    Raises `ModelNotFound`, or `crystalae.checkpoint.CheckpointError` when the file is no usable checkpoint.
    """
    path = find_model(ref, registry)
    return set_symprec(load_checkpoint(path, device=choose_device(device)), symprec)
