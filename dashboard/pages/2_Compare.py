"""Compare: validation metrics, per-element accuracy and confusion of several models, then one
validation crystal reconstructed by each (density slices, isosurfaces, decoded atoms, match/RMS)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from pymatgen.core import Structure

from crystalae.dashboard import data, views

st.set_page_config(page_title="Compare · crystalae", page_icon="💎", layout="wide")
paths = data.app_paths()
views.sidebar(paths)
st.title("Compare models")

choices = views.available_models(paths, "No model to compare yet: no trial has written a checkpoint "
                                  f"under `{paths.storage}` and the registry `{paths.registry}` is empty.")

picked = views.model_picker(choices, "Models (registry versions, trial best checkpoints, shipped models)", "compare_models",
                            multi=True, default_count=2)
if len(picked) < 2:
    st.info("Pick two or more models to compare them side by side.")
if not picked:
    st.stop()

infos = {}
for choice in picked:
    try:
        infos[choice.label] = data.checkpoint_info(choice.path)
    except data.MISSING_ERRORS as exc:
        st.warning(f"{choice.label}: {exc}")
models = [c for c in picked if c.label in infos]
if not models:
    st.stop()

st.header("Validation metrics")
table = pd.DataFrame([{"model": c.label, "epoch": infos[c.label].get("epoch"),
                       "species from": data.species_path(infos[c.label]),
                       **{m: infos[c.label]["metrics"].get(m) for m in ["val_loss", *data.RECON_METRICS]},
                       **data.training_summary(infos[c.label])}
                      for c in models])
st.dataframe(table, hide_index=True, key="metric_table")
st.caption("Reconstruction metrics on the validation split, as recorded in each checkpoint's config.json; "
           "`s / epoch` is the median training epoch of the run that made it (a reader trained on a fixed VAE "
           "skips the VAE's backward pass, so compare its time with that in mind).")

accuracy = {c.label: data.per_element_accuracy(infos[c.label]["metrics"]) for c in models}
if any(accuracy.values()):
    st.subheader("Per-element species accuracy")
    st.caption("Share of each element's atoms whose decoded atom (within 0.5 Å) got the right species, "
               "read the way each model's `species_from` says.")
    st.plotly_chart(views.per_element_bars({k: v for k, v in accuracy.items() if v}), key="per_element")

st.subheader("Species confusion (atoms, row-normalised; column 'none' = no atom decoded there)")
columns = st.columns(min(len(models), 3))
for i, c in enumerate(models):
    metrics = infos[c.label]["metrics"]
    confusion, species = data.metric_value(metrics, "confusion"), data.metric_value(metrics, "confusion_species")
    with columns[i % len(columns)]:
        if confusion and species:
            symbols = [data.element_symbol(int(z)) for z in species]
            st.plotly_chart(views.confusion_heatmap(confusion, symbols, c.label), key=f"confusion_{i}")
        else:
            st.info(f"{c.label}: no confusion matrix recorded in this checkpoint.")

st.header("One validation crystal")
datasets = {c.label: data.find_dataset(str(paths.storage), infos[c.label]["voxel_config"], c.sweep_root)
            for c in models}
reference = next((c for c in models if datasets[c.label]), None)
if reference is None:
    st.info(f"No prepared dataset under `{paths.storage}` matches these models' voxel settings, so there is "
            "no validation crystal to reconstruct.")
    st.stop()
ids = data.validation_ids(datasets[reference.label])
if not ids:
    st.info(f"The dataset `{datasets[reference.label]}` has no validation split.")
    st.stop()
material_id = st.selectbox("Validation crystal", ids, key="compare_crystal")

results = {}
for c in models:
    if not datasets[c.label]:
        st.info(f"{c.label}: no prepared dataset with its voxel settings under `{paths.storage}`; skipped.")
        continue
    try:
        results[c.label] = data.reconstruction(c.path, datasets[c.label], material_id)
    except data.MISSING_ERRORS as exc:  # a deleted checkpoint, or the crystal absent from its split
        st.warning(f"{c.label}: {exc}")
if not results:
    st.stop()

first = next(iter(results.values()))
left, mid, right = st.columns(3)
n = first["input"].shape[2]
k = left.slider("z-slice (voxel index)", 0, n - 1, views.slice_through_atoms(first["input"]), key="compare_slice",
                help="Starts on the plane through the densest atom of the original")
level_share = mid.slider("Isosurface level (share of max density)", 0.05, 0.95, 0.3, key="compare_level")
show_iso = right.toggle("Show 3-D isosurfaces", value=True, key="compare_iso")
st.plotly_chart(views.structure_view(Structure.from_str(first["true_cif"], fmt="cif"), "Original"), key="true_atoms")

for i, (label, rec) in enumerate(results.items()):
    st.subheader(label)
    rms = "n/a" if rec["rms"] is None else f"{rec['rms']:.3f}"
    st.markdown(views.badges({"match": rec["match"], "composition": rec["composition_ok"],
                              "atom count": rec["count_ok"]}) + f" · RMS {rms}")
    zmax = float(max(rec["input"].max(), rec["output"].max()))
    kk = min(k, rec["input"].shape[2] - 1)
    cols = st.columns(3)
    cols[0].plotly_chart(views.density_slice(rec["input"], kk, f"original, z={kk}", zmax), key=f"in_{i}")
    cols[1].plotly_chart(views.density_slice(rec["output"], kk, f"reconstructed, z={kk}", zmax), key=f"out_{i}")
    decoded = Structure.from_str(rec["cif"], fmt="cif") if rec["cif"] else None
    cols[2].plotly_chart(views.structure_view(decoded, "Decoded"), key=f"atoms_{i}")
    if show_iso:
        cols = st.columns(2)
        level = level_share * float(np.max(rec["input"]))
        cols[0].plotly_chart(views.isosurface(rec["input"], level, "original"), key=f"iso_in_{i}")
        cols[1].plotly_chart(views.isosurface(rec["output"], level, "reconstructed"), key=f"iso_out_{i}")
