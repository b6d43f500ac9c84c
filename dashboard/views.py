"""Plotly figures and small Streamlit widgets shared by the pages (no file access here)."""
from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative

from crystalae.dashboard import data
from crystalae.search.results import RungRanking, SweepSummary

PALETTE = qualitative.Dark24


def learning_curves(summary: SweepSummary, metric: str, trial_ids: list[str]) -> go.Figure:
    """One line per trial of `metric` over epochs."""
    fig = go.Figure()
    for t in summary.trials:
        if t.trial_id not in trial_ids:
            continue
        points = [(h.get("epoch"), h.get(metric)) for h in t.history if h.get(metric) is not None]
        if points:
            x, y = zip(*points)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"{t.trial_id} ({t.status})"))
    fig.update_layout(xaxis_title="epoch", xaxis_dtick=1, yaxis_title=metric, height=380, margin={"t": 30, "b": 40},
                      legend_title_text="trial")
    return fig


def rung_scatter(ranking: RungRanking) -> go.Figure:
    """Each trial's objective at a pruning rung against where it ended, with the rank correlation."""
    rho = "–" if ranking.spearman is None else f"{ranking.spearman:.2f}"
    fig = go.Figure(go.Scatter(x=[p[1] for p in ranking.points], y=[p[2] for p in ranking.points], mode="markers",
                               text=[p[0] for p in ranking.points], hovertemplate="%{text}<br>%{x:.4g} → %{y:.4g}",
                               marker={"size": 10, "color": PALETTE[0]}))
    fig.update_layout(title=f"Spearman ρ = {rho} over {len(ranking.points)} trials",
                      xaxis_title=f"{ranking.metric} after epoch {ranking.rung}",
                      yaxis_title=f"best {ranking.final}", height=380, margin={"t": 50, "b": 40})
    return fig


def parallel_coordinates(frame: pd.DataFrame, params: list[str], objective: str) -> go.Figure:
    """Search parameters vs the objective; categorical (text) params get one tick per value."""
    dims = []
    for name in [*params, objective]:
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column):
            dims.append({"label": name, "values": column.astype(float)})
        else:
            codes, labels = pd.factorize(column.astype(str))
            dims.append({"label": name, "values": codes, "tickvals": list(range(len(labels))),
                         "ticktext": list(labels)})
    line = {"color": frame[objective].astype(float), "colorscale": "Viridis", "showscale": True,
            "colorbar": {"title": objective}}
    fig = go.Figure(go.Parcoords(dimensions=dims, line=line))
    fig.update_layout(height=380, margin={"l": 60, "r": 60, "t": 50, "b": 30})
    return fig


def pareto_scatter(summary: SweepSummary) -> go.Figure:
    """Every scored trial on the first two objectives; the Pareto front highlighted and joined.
    Each point carries its trial id (hover, and the selection the page reads)."""
    x_obj, y_obj = summary.objectives[:2]
    front = {t.trial_id for t, _ in summary.pareto_front()}
    fig = go.Figure()
    for on_front, name, color in ((False, "dominated", "#b0b0b0"), (True, "Pareto front", PALETTE[0])):
        points = sorted((c.metrics[x_obj.metric], c.metrics[y_obj.metric], t.trial_id)
                        for t, c in summary.scored() if (t.trial_id in front) == on_front)
        if points:
            x, y, ids = zip(*points)
            fig.add_trace(go.Scatter(x=x, y=y, customdata=ids, name=name,
                                     mode="lines+markers" if on_front else "markers",
                                     line={"shape": "hv", "color": color}, marker={"size": 11, "color": color},
                                     hovertemplate="trial %{customdata}<br>" + f"{x_obj.metric}" + " %{x:.4g}<br>"
                                     + f"{y_obj.metric}" + " %{y:.4g}<extra></extra>"))
    fig.update_layout(xaxis_title=f"{x_obj.metric} ({x_obj.mode})", yaxis_title=f"{y_obj.metric} ({y_obj.mode})",
                      height=400, margin={"t": 30, "b": 40})
    return fig


def importance_bars(importances: dict[str, float]) -> go.Figure:
    names = list(importances)[::-1]  # most important on top
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(xaxis_title="importance", height=60 + 40 * len(names), margin={"t": 20, "b": 40})
    return fig


def per_element_bars(accuracy: dict[str, dict[str, float]]) -> go.Figure:
    """Grouped bars: per-element species accuracy of each model (keys: model label)."""
    fig = go.Figure()
    for label, values in accuracy.items():
        fig.add_trace(go.Bar(x=list(values), y=list(values.values()), name=label))
    fig.update_layout(barmode="group", yaxis_title="accuracy", yaxis_range=[0, 1], height=360,
                      margin={"t": 30, "b": 40}, legend={"orientation": "h", "y": -0.2})
    return fig


def confusion_heatmap(matrix: list[list[float]], symbols: list[str], title: str) -> go.Figure:
    """Row-normalised confusion (true rows, predicted columns); classes never seen nor predicted are dropped."""
    m = np.asarray(matrix, dtype=float)
    keep = np.flatnonzero((m.sum(0) + m.sum(1)) > 0)
    m = m[np.ix_(keep, keep)]
    names = [symbols[i] for i in keep]
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig = go.Figure(go.Heatmap(z=share, x=names, y=names, colorscale="Blues", zmin=0, zmax=1,
                               customdata=m, hovertemplate="true %{y}, predicted %{x}: %{customdata:.0f} atoms"
                                                           "<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed",
                      height=420, margin={"t": 50, "b": 40})
    return fig


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=float).ravel()
    return values[np.isfinite(values)]


def _positive(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=int).ravel()
    return counts[counts > 0]


def density_histogram(samples: np.ndarray, reference: np.ndarray) -> go.Figure:
    """Overlaid histograms (percent of each set, shared bins) of crystal densities in g/cm³; NaN (undecoded) dropped."""
    sets = {"valid samples": _finite(samples), "reference": _finite(reference)}
    values = np.concatenate(list(sets.values()))
    # shared bins: plotly bins each overlaid trace on its own, so bar widths would differ between sets
    bins = None
    if values.size:
        low, high = float(values.min()), float(values.max())
        bins = {"start": low, "end": high + 1e-9, "size": max((high - low) / 30, 1e-3)}
    fig = go.Figure()
    for (name, x), color in zip(sets.items(), (PALETTE[0], "#888888")):
        fig.add_trace(go.Histogram(x=x, name=f"{name} ({len(x)})", histnorm="percent", xbins=bins, opacity=0.6,
                                   marker_color=color))
    fig.update_layout(barmode="overlay", xaxis_title="density (g/cm³)", yaxis_title="% of set", height=360,
                      margin={"t": 30, "b": 40}, legend={"orientation": "h", "y": -0.25})
    return fig


def element_count_bars(samples: np.ndarray, reference: np.ndarray) -> go.Figure:
    """Grouped bars: share of crystals with 1, 2, 3, … distinct elements in each set (0, undecoded, dropped)."""
    sets = {"valid samples": _positive(samples), "reference": _positive(reference)}
    top = max((int(c.max()) for c in sets.values() if c.size), default=1)
    ks = np.arange(1, top + 1)
    fig = go.Figure()
    for (name, counts), color in zip(sets.items(), (PALETTE[0], "#888888")):
        share = np.bincount(counts, minlength=top + 1)[1:] / max(counts.size, 1)
        fig.add_trace(go.Bar(x=ks, y=share, name=f"{name} ({counts.size})", marker_color=color))
    fig.update_layout(barmode="group", xaxis_title="distinct elements", xaxis_dtick=1, yaxis_title="share of set",
                      yaxis_tickformat=".0%", height=360, margin={"t": 30, "b": 40},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def density_slice(values: np.ndarray, k: int, title: str, zmax: float | None = None) -> go.Figure:
    """Heatmap of the grid plane z = k (e/Å^3)."""
    fig = go.Figure(go.Heatmap(z=values[:, :, k].T, colorscale="Viridis", zmin=0, zmax=zmax,
                               colorbar={"title": "e/Å³"}))
    fig.update_layout(title=title, xaxis_title="i", yaxis_title="j", height=340, margin={"t": 40, "b": 30},
                      yaxis_scaleanchor="x")
    return fig


def isosurface(values: np.ndarray, level: float, title: str) -> go.Figure:
    """Isosurface of the density at `level` e/Å^3, in voxel-index coordinates."""
    n = values.shape[0]
    i, j, k = np.mgrid[0:n, 0:n, 0:n]
    fig = go.Figure(go.Isosurface(x=i.ravel(), y=j.ravel(), z=k.ravel(), value=values.ravel(),
                                  isomin=level, isomax=float(max(values.max(), level)), surface_count=2,
                                  caps={"x_show": False, "y_show": False, "z_show": False},
                                  colorscale="Viridis", showscale=False, opacity=0.6))
    fig.update_layout(title=title, height=360, margin={"l": 0, "r": 0, "t": 40, "b": 0},
                      scene={"xaxis_title": "i", "yaxis_title": "j", "zaxis_title": "k", "aspectmode": "cube"})
    return fig


@cache
def _jmol_colors() -> dict[str, tuple[int, int, int]]:
    """Jmol's element colours (the CPK convention most crystal viewers use), from pymatgen's colour schemes."""
    from importlib.resources import files

    import yaml

    for package in ("pymatgen.core", "pymatgen.vis"):  # the file moved between pymatgen releases
        try:
            text = (files(package) / "ElementColorSchemes.yaml").read_text()
        except (ModuleNotFoundError, FileNotFoundError):
            continue
        return {k: tuple(v) for k, v in yaml.safe_load(text)["Jmol"].items()}
    return {}


def element_color(symbol: str) -> str:
    """An element's Jmol (CPK) colour, as every crystal viewer shows it: S yellow, O red, C grey; a symbol
    without one (a placeholder) gets a stable grey."""
    rgb = _jmol_colors().get(symbol)
    return "#{:02x}{:02x}{:02x}".format(*rgb) if rgb else "#808080"


def slice_through_atoms(values: np.ndarray) -> int:
    """The z index of the grid plane holding the highest density, i.e. through an atom's centre (the middle
    plane of a cell whose atoms sit on its corners, such as bcc, shows nothing)."""
    return int(np.argmax(values.max(axis=(0, 1))))


def structure_view(structure, title: str) -> go.Figure:
    """Atoms as spheres coloured by element (sized by atomic radius) inside the unit-cell edges."""
    from pymatgen.core import Element

    fig = go.Figure()
    if structure is None or len(structure) == 0:
        fig.add_annotation(text="no atoms decoded", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    else:
        lattice = structure.lattice.matrix
        corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) @ lattice
        x, y, z = [], [], []
        for p in range(8):
            for q in range(p + 1, 8):
                if (p ^ q).bit_count() == 1:  # corners differing in one fractional axis share an edge
                    for axis, values in zip((x, y, z), zip(corners[p], corners[q])):
                        axis.extend([*values, None])
        fig.add_trace(go.Scatter3d(x=x, y=y, z=z, mode="lines", line={"color": "#888", "width": 2},
                                   hoverinfo="skip", showlegend=False))
        coords = structure.cart_coords
        symbols = np.array([site.specie.symbol for site in structure])
        for symbol in sorted(set(symbols)):
            mask = symbols == symbol
            radius = float(Element(symbol).atomic_radius or 1.0)  # Å
            marker = {"size": 8 + 8 * radius, "color": element_color(symbol), "line": {"color": "#333", "width": 1}}
            fig.add_trace(go.Scatter3d(x=coords[mask, 0], y=coords[mask, 1], z=coords[mask, 2], mode="markers",
                                       name=symbol, marker=marker))
        title = f"{title}: {structure.composition.reduced_formula}"
    fig.update_layout(title=title, height=360, margin={"l": 0, "r": 0, "t": 40, "b": 0},
                      scene={"aspectmode": "data", "xaxis_title": "x (Å)", "yaxis_title": "y (Å)",
                             "zaxis_title": "z (Å)"},
                      legend={"orientation": "h"})
    return fig


def model_picker(choices: list[data.ModelChoice], label: str, key: str, multi: bool = False,
                 default_count: int = 1) -> list[data.ModelChoice]:
    """A selectbox (or multiselect) over model choices; returns the picked ones."""
    labels = [c.label for c in choices]
    if multi:
        default = [c.label for c in data.distinct(choices, default_count)]
        picked = st.multiselect(label, labels, default=default, key=key)
    else:
        picked = [st.selectbox(label, labels, key=key)]
    return [c for c in choices if c.label in picked]


def badges(flags: dict[str, bool]) -> str:
    """Markdown: each flag as green ✓ or red ✗ text (plain glyphs: emoji fonts are often missing)."""
    names = {name: name.removesuffix("_valid").replace("_", " ") for name in flags}
    return " · ".join(f":{'green' if ok else 'red'}[{'✓' if ok else '✗'} {names[name]}]" for name, ok in flags.items())


def sidebar(paths: data.Paths) -> None:
    """Where the data comes from, and a refresh button (sweep tables are cached for a few seconds)."""
    with st.sidebar:
        st.caption(f"Sweeps: `{paths.storage_location or paths.storage}`  \nRegistry: `{paths.registry}`")
        if st.button("Refresh data", help="Re-read sweeps, checkpoints and registry from disk"):
            st.cache_data.clear()  # tables only; loaded models (cache_resource) stay, checkpoints are immutable


def available_models(paths: data.Paths, empty_message: str) -> list[data.ModelChoice]:
    """Registry models, trial checkpoints and the shipped models to pick from; warns about unreadable ones.
    Shows `empty_message` when there is no model of the user's own (the shipped ones still listed), and
    stops the page when there is none at all."""
    choices, problems = data.model_choices(paths)
    for problem in problems:
        st.warning(problem)
    if all(c.shipped for c in choices):
        st.info(empty_message + (" Meanwhile the shipped reference models are listed." if choices else ""))
    if not choices:
        st.stop()
    return choices
