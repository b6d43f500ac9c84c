"""crystalae: crystal structures as 3-D densities, learned with VAEs, searched with Ray Tune.

    import crystalae
    model = crystalae.load("perov_5")        # shipped name, checkpoint folder, NAME@3 or alias
    model.reconstruct(structures)            # pymatgen Structures / ASE Atoms / paths in, Structures out
    model.sample(10, seed=0)

The names below load on first use, so `import crystalae` (and `crystalae --help`) stay fast.
"""
from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = _metadata.version("crystalae")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["CrystalModel", "StructureLike", "as_structures", "load", "__version__"]


def _import_tqdm_quietly() -> None:
    """In a Jupyter kernel without ipywidgets, tqdm.auto's first import warns "IProgress not found" and then
    uses its text bar anyway; import it once here with that warning off, so crystalae's bars (every module
    imports tqdm.auto) come without it. Installing ipywidgets gives the notebook widget instead."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.auto  # noqa: F401


_import_tqdm_quietly()

if TYPE_CHECKING:
    from crystalae.api import CrystalModel, StructureLike, as_structures, load


def __getattr__(name: str) -> Any:
    if name in ("CrystalModel", "StructureLike", "as_structures", "load"):
        from crystalae import api

        return getattr(api, name)
    raise AttributeError(f"module 'crystalae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, "api"})
