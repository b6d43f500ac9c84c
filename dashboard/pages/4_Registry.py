"""Registry: model versions with their metrics and aliases; promote a trial's best checkpoint (confirmed)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from crystalae.checkpoint import FILENAME, read_checkpoint
from crystalae.dashboard import data, views
from crystalae.registry import Registry, lineage_text
from crystalae.search.promote import promote_trial

st.set_page_config(page_title="Registry · crystalae", page_icon="💎", layout="wide")
if "promote_message" not in st.session_state:
    st.session_state.promote_message = None  # (kind, text) of the last promote, shown after the rerun
paths = data.app_paths()
views.sidebar(paths)
st.title("Model registry")

try:
    entries = data.registry_entries(str(paths.registry))
except (OSError, ValueError) as exc:  # a version folder without manifest.json, a broken aliases.json
    entries = []
    st.warning(f"The registry at `{paths.registry}` could not be read completely: {exc}")
if not entries:
    st.info(f"The registry at `{paths.registry}` is empty. Promote a trial's best checkpoint below.")
else:
    rows = []
    for e in entries:
        folder = paths.registry_folder(e["ref"], e["name"], e["version"])
        rows.append({"ref": e["ref"], "aliases": ", ".join(e["aliases"]), "lineage": lineage_text(e),
                     "epoch": e.get("epoch"), **{m: e["metrics"].get(m) for m in ["val_loss", *data.RECON_METRICS]},
                     "created": e.get("created"),
                     "checkpoint": "ok" if (folder / FILENAME).exists() else "MISSING"})
    frame = pd.DataFrame(rows)
    st.dataframe(frame, hide_index=True, key="registry_table")
    missing = frame.loc[frame["checkpoint"] == "MISSING", "ref"].tolist()
    if missing:
        st.warning(f"Checkpoint file missing for {', '.join(missing)}: these versions cannot be loaded.")

try:
    aliases = Registry(paths.registry).aliases()
except (OSError, ValueError) as exc:
    aliases = {}
    st.warning(f"aliases.json of `{paths.registry}` is unreadable: {exc}")
known = {e["ref"] for e in entries}
if aliases:
    st.subheader("Aliases")
    st.dataframe(pd.DataFrame([{"alias": a, "ref": r, "resolves": r in known} for a, r in sorted(aliases.items())]),
                 hide_index=True, key="alias_table")
    dangling = [a for a, r in aliases.items() if r not in known]
    if dangling:
        st.warning(f"Alias(es) {', '.join(dangling)} point at versions that no longer exist.")

st.header("Promote a trial's best checkpoint")
sweeps = data.find_sweeps(str(paths.storage))
if not sweeps:
    st.info(f"No sweeps under `{paths.storage}` to promote from.")
    st.stop()
labels = {data.sweep_label(paths.storage, r): r for r in sweeps}
sweep_label = st.selectbox("Sweep", list(labels), key="promote_sweep")
root = labels[sweep_label]
try:
    summary = data.load_summary(root)
except (OSError, ValueError) as exc:  # e.g. a damaged summary.json (named in the message)
    st.warning(f"Could not read sweep `{root}`: {exc}")
    st.stop()
candidates = {f"{t.trial_id} ({t.status}, best {t.best_value:.4g})": t
              for t in summary.trials if t.best_checkpoint_path}
if not candidates:
    st.info("No trial of this sweep has a checkpoint yet (running, or every trial failed before an epoch).")
    st.stop()
best = summary.best_trial()  # preselected: the one `promote --best` would take
labels = list(candidates)
start = next((i for i, t in enumerate(candidates.values()) if best and t.trial_id == best.trial_id), 0)
trial = candidates[st.selectbox("Trial", labels, index=start, key="promote_trial",
                                help="Starts on the sweep's best trial by its objective")]
left, right = st.columns(2)
name = left.text_input("Model name", value=summary.name, key="promote_name")
alias = right.text_input("Alias (optional)", placeholder="e.g. champion", key="promote_alias").strip() or None
checkpoint = Path(root) / trial.best_checkpoint_path
st.caption(f"Checkpoint: `{checkpoint}`")
fit_prior = st.checkbox(
    "Fit a latent prior on the trial's dataset (needed to generate from the version)", value=True,
    key="promote_fit_prior",
    help="As `crystalae promote` (`--no-fit-prior` turns it off): the posterior codes of the trial's training "
         "crystals, kept with the version so that sampling lands where the decoder was trained. Without a prior, "
         "`crystalae generate` and the Generate page sample the version only from N(0, I) (--prior normal).")


def promote() -> None:
    """Button callback: runs before the rerun, so it may reset the confirmation checkbox."""
    try:
        # the trial's best checkpoint (the one shown above), recorded as every promote from a sweep records it
        manifest = promote_trial(root, Registry(paths.registry), trial.trial_id, name=name, alias=alias,
                                 fit_prior=fit_prior)
    except (ValueError, OSError) as exc:  # bad name/alias (SweepConfigError), CheckpointError
        st.session_state.promote_message = ("error", f"Promotion failed: {exc}")
        return
    data.registry_entries.clear()
    st.session_state.promote_confirm = False
    target = f" and moved alias `{alias}` to it" if alias else ""
    folder = paths.registry_folder(manifest["ref"], manifest["name"], manifest["version"])
    if manifest.get("source", {}).get("latent_prior"):
        prior = f", with a latent prior {manifest['source']['latent_prior']}."
    elif read_checkpoint(folder).get("latent_prior") is not None:
        prior = ", with the latent prior its checkpoint already had."
    else:  # turned off, or the trial's dataset is gone
        why = "" if not fit_prior else " (the trial's dataset is gone, so none could be fitted)"
        prior = (f", without a fitted latent prior{why}: generating from it needs `crystalae fit-prior` "
                 "or the normal prior.")
    st.session_state.promote_message = ("success", f"Promoted {trial.trial_id} as `{manifest['ref']}`{target}{prior}")


confirmed = st.checkbox(f"I want to copy this checkpoint into the registry as a new version of `{name}`"
                        + (f" and point `{alias}` at it" if alias else ""), key="promote_confirm")
st.button("Promote", type="primary", disabled=not confirmed, on_click=promote, key="promote_go")
if st.session_state.promote_message:
    kind, text = st.session_state.promote_message
    (st.success if kind == "success" else st.error)(text)
