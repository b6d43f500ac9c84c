"""crystalae dashboard, home page: what the sweep storage and the model registry hold.

Run with `crystalae dashboard`, or directly:
    streamlit run dashboard/app.py -- --storage runs/sweeps --registry runs/registry
Pages (sidebar): Sweeps, Compare, Generate, Registry.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from crystalae.dashboard import data, views

PAGES = Path(__file__).resolve().parent / "pages"


def overview() -> None:
    """The home page: what the sweep storage and the registry hold."""
    st.set_page_config(page_title="crystalae", page_icon="💎", layout="wide")
    paths = data.app_paths()
    views.sidebar(paths)
    st.title("crystalae dashboard")
    st.write("Voxel-density VAE with a learned species reader for crystal structures: sweep results, model comparison, "
             "generation and the model registry. Pick a page in the sidebar.")

    st.header("Sweeps")
    sweeps = data.find_sweeps(str(paths.storage))
    if not paths.storage.is_dir():
        st.info(f"No sweep storage at `{paths.storage}` yet. Start one with "
                "`crystalae sweep search/configs/demo.yaml`, or point the dashboard elsewhere with `--storage`.")
    elif not sweeps:
        st.info(f"No sweeps under `{paths.storage}` yet (a sweep is a folder holding `sweep.json`).")
    else:
        rows = []
        for root in sweeps:
            try:
                summary = data.load_summary(root)
            except (OSError, ValueError) as exc:
                st.warning(f"Sweep `{root}` could not be read: {exc}")
                continue
            statuses = pd.Series([t.status for t in summary.trials], dtype=object).value_counts().to_dict()
            best = summary.best_trial()  # the sweep's own rule, as `promote --best` uses
            rows.append({"sweep": data.sweep_label(paths.storage, root),
                         "objective": f"{summary.objective.metric} ({summary.objective.mode})",
                         "trials": len(summary.trials),
                         "status": ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no trials yet",
                         "best value": best.best_value if best else None,
                         "best trial": best.trial_id if best else None})
        st.dataframe(pd.DataFrame(rows), hide_index=True)

    st.header("Registry")
    try:
        entries = data.registry_entries(str(paths.registry))
    except (OSError, ValueError) as exc:
        entries = []
        st.warning(f"The registry at `{paths.registry}` could not be read: {exc}")
    if not entries:
        st.info(f"The registry at `{paths.registry}` is empty. Promote a trial's best checkpoint on the "
                "Registry page or with `crystalae promote SWEEP --best`.")
    else:
        aliases = {a: ref for e in entries for a in e["aliases"] for ref in [e["ref"]]}
        left, right = st.columns(2)
        left.metric("Model versions", len(entries))
        right.metric("Aliases", len(aliases))
        st.write(", ".join(f"`{a}` → `{ref}`" for a, ref in sorted(aliases.items())) or "No aliases set.")


# st.navigation names the pages (the home page would otherwise be listed as the script's name, "app")
st.navigation([st.Page(overview, title="Overview", icon="💎", url_path="overview", default=True),
               *(st.Page(str(page), title=page.stem.split("_", 1)[1], url_path=page.stem.split("_", 1)[1])
                 for page in sorted(PAGES.glob("[0-9]_*.py")))]).run()
