"""Sweeps: trial table with filters, learning curves, parallel coordinates, parameter importance."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from crystalae.dashboard import data, views
from crystalae.search.layout import LOG_FILE

st.set_page_config(page_title="Sweeps · crystalae", page_icon="💎", layout="wide")
paths = data.app_paths()
views.sidebar(paths)
st.title("Sweeps")

sweeps = data.find_sweeps(str(paths.storage))
if not sweeps:
    where = "does not exist yet" if not paths.storage.is_dir() else "holds no sweep (no folder with sweep.json)"
    st.info(f"The sweep storage `{paths.storage}` {where}. Start a sweep with "
            "`crystalae sweep search/configs/demo.yaml`, or pass `--storage` to the dashboard.")
    st.stop()

labels = {data.sweep_label(paths.storage, r): r for r in sweeps}
root = labels[st.selectbox("Sweep", list(labels), key="sweep")]
try:
    summary = data.load_summary(root)
except (OSError, ValueError) as exc:
    st.error(f"Could not read sweep `{root}`: {exc}")
    st.stop()

objective = summary.objective.metric
trials = summary.trials
st.caption(f"`{root}` · objective: {objective} ({summary.objective.mode})")
if not trials:
    st.info("This sweep has no trials on disk yet: it may still be preparing data. Refresh in a moment.")
    st.stop()

counts = {s: sum(t.status == s for t in trials) for s in ("finished", "early-stopped", "running", "error")}
best_trial = summary.best_trial()  # the sweep's own rule, as `promote --best` uses
cols = st.columns(5)
cols[0].metric("Trials", len(trials))
for col, (status, n) in zip(cols[1:], counts.items()):
    col.metric(status.capitalize(), n)
if counts["running"]:
    st.info(f"{counts['running']} trial(s) are still running (or the sweep driver stopped before writing "
            "summary.json). Tables refresh every few seconds; use *Refresh data* in the sidebar.")
if counts["error"]:
    failed = ", ".join(t.trial_id for t in trials if t.status == "error")
    st.warning(f"Failed trials: {failed}. Their metrics stop at the last epoch they reported; see the Ray "
               f"log `{root}/{LOG_FILE}` for the error.")
empty = [t.trial_id for t in trials if not t.checkpoints]
if empty:
    st.info(f"No checkpoint yet for trial(s) {', '.join(empty)}: they have not finished an epoch.")
if best_trial:
    st.success(f"Best trial: **{best_trial.trial_id}** with {objective} = {best_trial.best_value:.4g}")
budget = summary.budget()
cols = st.columns(4)
cols[0].metric("Epochs trained", budget.epochs)
cols[1].metric("Trial-minutes", f"{budget.trial_seconds / 60:.1f}")
cols[2].metric("Epochs before the best", "–" if budget.epochs_to_best is None else budget.epochs_to_best)
cols[3].metric("Trial-minutes before the best",
               "–" if budget.seconds_to_best is None else f"{budget.seconds_to_best / 60:.1f}")

st.header("Trials")
frame = data.trial_frame(summary)
left, right = st.columns([1, 2])
statuses = sorted(frame["status"].unique())
chosen = left.multiselect("Status", statuses, default=statuses, key="status_filter")
text = right.text_input("Filter", placeholder="trial id, status or parameter value", key="text_filter")
shown = frame[frame["status"].isin(chosen)]
if text and not shown.empty:
    haystack = shown.apply(lambda row: " ".join(map(str, row.tolist())).lower(), axis=1)
    shown = shown[haystack.str.contains(text.lower(), regex=False)]
st.dataframe(shown, hide_index=True, key="trial_table")
st.caption(f"{len(shown)} of {len(frame)} trials. Click a column header to sort.")

if summary.secondary:
    st.header("Pareto front")
    front = summary.pareto_front()
    names = ", ".join(f"{o.metric} ({o.mode})" for o in summary.objectives)
    st.caption(f"Objectives: {names}. Each trial is placed at its best kept checkpoint; select a point to see "
               f"its trial.")
    event = st.plotly_chart(views.pareto_scatter(summary), key="pareto", on_select="rerun", selection_mode="points")
    picked = [p.get("customdata") for p in (event.selection.points if event else [])]
    rows = [{"trial_id": t.trial_id, **{o.metric: c.metrics[o.metric] for o in summary.objectives},
             "epoch": c.epoch, **t.params} for t, c in front]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="pareto_table")
    st.caption(f"{len(front)} of {len(summary.scored())} scored trials are on the front. "
               f"`crystalae promote {summary.name} --best --within D` promotes the trial best on "
               f"{summary.secondary[0].metric} among those within D of the best {objective}.")
    if picked:
        chosen_trial = next(t for t in trials if t.trial_id == picked[0])
        st.info(f"Selected trial **{chosen_trial.trial_id}** ({chosen_trial.status}, {chosen_trial.epochs} epochs): "
                + ", ".join(f"{k}={v}" for k, v in chosen_trial.params.items()))

st.header("Learning curves")
metrics = data.history_metrics(summary)
if not metrics:
    st.info("No epoch has been reported yet.")
else:
    left, right = st.columns([1, 2])
    default = metrics.index(objective) if objective in metrics else 0
    metric = left.selectbox("Metric", metrics, index=default, key="curve_metric")
    ids = right.multiselect("Trials", list(frame["trial_id"]), default=list(shown["trial_id"]), key="curve_trials")
    st.plotly_chart(views.learning_curves(summary, metric, ids), key="curves")

st.header("Does the objective rank trials early?")
st.caption("Each trial's objective at a pruning rung against the best value it ended with. A high rank "
           "correlation means ASHA's cut at that rung keeps the trials that end best; trials it stopped "
           "early are left out (they never had the full budget). `bench/rank_correlation.py` measures the "
           "same against the test-split match rate.")
if not metrics:
    st.info("No epoch has been reported yet.")
else:
    left, right = st.columns(2)
    longest = max(len(t.history) for t in trials)
    rung = left.number_input("Rung (epochs trained)", 1, max(longest, 1), min(data.first_rung(root), max(longest, 1)),
                             key="rung_epoch")
    finals = [m for m in metrics if m.startswith("val_")] or metrics
    final = right.selectbox("Final metric", finals, index=finals.index("val_match_rate") if "val_match_rate" in finals
                            else 0, key="rung_final")
    ranking = summary.rung_ranking(int(rung), final)
    if len(ranking.points) < 3:
        st.info(f"{len(ranking.points)} trial(s) trained past epoch {rung} without being stopped: a correlation "
                "needs at least 3.")
    st.plotly_chart(views.rung_scatter(ranking), key="rung_scatter")

st.header("Search space vs objective")
params = sorted({k for t in trials for k in t.params})
objective_col = f"best {objective}"
scored = frame[frame[objective_col].notna()] if objective_col in frame else frame.iloc[0:0]
if not params:
    st.info("The trials recorded no search parameters (params.json missing).")
elif scored.empty:
    st.info("No trial has reported the objective yet.")
else:
    st.plotly_chart(views.parallel_coordinates(scored, params, objective_col), key="parcoords")

st.subheader("Parameter importance (Optuna)")
importances, note = data.param_importance(root, summary.name)
if importances is None:
    st.info(note)
else:
    st.plotly_chart(views.importance_bars(importances), key="importance")
    st.caption(note)
