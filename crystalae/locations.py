"""Default locations of what crystalae writes, relative to the working directory: the one place that
names them (CLI defaults, the Python API, the dashboard). Any of them may be given as an object-storage
URI (s3://...) instead where a command takes one."""
from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO", "GENERATED", "REGISTRY", "SWEEPS", "TRAIN"]

SWEEPS = Path("runs/sweeps")  # sweep folders (`crystalae sweep --storage`)
REGISTRY = Path("runs/registry")  # the model registry (`--registry`)
TRAIN = Path("runs/train")  # training runs (`crystalae train --storage`)
DEMO = Path("runs/demo")  # everything `crystalae demo` writes
GENERATED = Path("runs/generated")  # crystals `crystalae generate` writes
