"""Print a benchmark's measured figures and optionally save them as JSON (shared by the bench scripts)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crystalae.files import write_json

ROOT = Path(__file__).resolve().parents[1]


def report(figures: dict[str, Any], out: Path | None, hide: tuple[str, ...] = ()) -> None:
    for key, value in figures.items():
        if key not in hide:
            print(f"{key:32s} {value}")
    if out:
        write_json(out, figures)  # atomic: an interrupted run never leaves half a results file


def lineage_sweep_dir(lineage: dict) -> str | None:
    """The sweep folder a checkpoint's lineage names: a relative path is the project's (where
    `train --from-trial` records it from), a URI or an absolute path as it is."""
    from crystalae import uri_fs

    recorded = lineage.get("sweep_dir")
    if not recorded or uri_fs.is_remote(recorded) or Path(recorded).is_absolute():
        return recorded
    return str(ROOT / recorded)


def relative(path: Path | str) -> str:
    """Paths recorded relative to the repository (or its parent, for ../shared); a path elsewhere on
    this machine keeps only its last two parts (".../train/RUN"), never an absolute path."""
    path = Path(path).resolve()
    for base, prefix in ((ROOT, ""), (ROOT.parent, "../")):
        try:
            return prefix + str(path.relative_to(base))
        except ValueError:
            continue
    return ".../" + "/".join(path.parts[-2:])


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """--datasets (the shared CSVs) and --work (where benches prepare shards), as every bench names them."""
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared/datasets")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench", help="prepared shards")
