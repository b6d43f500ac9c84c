"""Optional dependencies (pyproject extras): is one installed, and the error that says how to get it."""
from __future__ import annotations

import importlib.util

__all__ = ["available", "require"]


def available(module: str) -> bool:
    """Whether `module` can be imported, without importing it (some, like matminer, import slowly)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, purpose: str) -> None:
    """Raise ImportError naming the extra to install when `module` is missing."""
    if not available(module):
        raise ImportError(f"{purpose} needs {module}: pip install 'crystalae[{extra}]'")
