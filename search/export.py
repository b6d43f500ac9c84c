"""Export a sweep's record: its small files (config, study, summary, params, metrics), no weights and
no datasets, so a sweep can be committed beside the model it found."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from crystalae.search.layout import CHECKPOINT_GLOB, PARAMS_FILE, STUDY_FILE, SUMMARY_FILE, SWEEP_FILE, TRIALS_DIR

__all__ = ["export_record"]


def export_record(root: str | Path, out: str | Path) -> list[Path]:
    """Copy a local sweep's small files to `out`: its config, study, summary, each trial's params and each
    kept checkpoint's `config.json` (metrics and per-epoch history), but no weights and no datasets.

    The copy reads like the sweep itself (`collect_trials`, the dashboard, `train --from-trial`), so a
    sweep can be committed beside the model it found. Local data sources, which a sweep stores as absolute
    paths, are written relative to the current directory (as a sweep config's own sources are read), so
    the record names no folder of this machine. Returns the files written.
    """
    root, out = Path(root), Path(out)
    wanted = [SWEEP_FILE, SUMMARY_FILE, STUDY_FILE, *(str(p.relative_to(root)) for p in (root / TRIALS_DIR).glob(
        f"*/{PARAMS_FILE}")), *(str(p.relative_to(root)) for p in (root / TRIALS_DIR).glob(f"*/{CHECKPOINT_GLOB}/config.json"))]
    written = []
    for relative in wanted:
        if (root / relative).is_file():
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            if relative.endswith(".json"):  # compact: the sweep's own files are indented for people
                data = json.loads((root / relative).read_text())
                if relative == SWEEP_FILE:
                    data["data"]["source"] = _portable_source(data["data"]["source"])
                (out / relative).write_text(json.dumps(data, separators=(",", ":")))
            else:
                shutil.copy2(root / relative, out / relative)
            written.append(out / relative)
    return written


def _portable_source(source: str | list) -> str | list:
    """A sweep's stored source with its absolute local paths made relative to the current directory."""
    if isinstance(source, list):
        return [_portable_source(part) for part in source]
    return os.path.relpath(source) if os.path.isabs(source) else source
