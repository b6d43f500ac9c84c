"""The one-line summaries the commands print: a round trip's or reconstruction's figures, a batch's
validity and coverage, a sweep's trials and compute."""
from __future__ import annotations

from typing import Any

__all__ = [
    "format_budget", "format_composition_validity", "format_distribution", "format_metrics", "format_sweep",
]


def format_metrics(metrics: dict[str, Any]) -> str:
    """Match rate, RMS, composition and atom-count accuracy, rejections and time of a scored run."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    rms = "n/a" if metrics.get("mean_rms") is None else f"{metrics['mean_rms']:.4g}"
    return (f"{metrics['n']} structures: match rate {pct(metrics['match_rate'])}, mean RMS {rms}, "
            f"composition {pct(metrics['composition_accuracy'])}, atom count {pct(metrics['atom_count_accuracy'])}"
            f" ({metrics.get('rejected_inputs', 0)} inputs rejected, {metrics.get('decode_failures', 0)} decode failures,"
            f" {metrics.get('seconds', 0)} s)")


def format_distribution(figures: dict[str, Any]) -> str:
    """COV-R, COV-P, d_ρ and d_elem on one line (CDVAE's generation metrics)."""
    def dist(x):
        return "n/a" if x is None else f"{x:.3f}"

    return (f"COV-R {100 * figures['cov_recall']:.1f}%, COV-P {100 * figures['cov_precision']:.1f}% "
            f"(cutoffs {figures['cutoffs'][0]:g} / {figures['cutoffs'][1]:g}), "
            f"d_rho {dist(figures['d_rho'])}, d_elem {dist(figures['d_elem'])}")


def format_composition_validity(summary: dict[str, Any]) -> str:
    """The field's composition validity (SMACT, as CDVAE) and pymatgen's stricter check, labelled."""
    smact = summary.get("composition_validity_smact")
    field = "n/a (pip install crystalae[metrics])" if smact is None else f"{100 * smact:.1f}%"
    return (f"composition validity {field} (SMACT, as CDVAE), "
            f"{100 * summary['composition_validity']:.1f}% (pymatgen oxidation states)")


def format_sweep(summary) -> str:
    """A SweepSummary as a few lines: one per trial, with its status, epochs, best value and params."""
    objective = summary.objective
    lines = [f"sweep {summary.name}: {len(summary.trials)} trials, objective {objective.metric} ({objective.mode})"]
    for t in summary.trials:
        value = "n/a" if t.best_value is None else f"{t.best_value:.4g}"
        match = (t.best_record.metrics.get("val_match_rate") if t.best_record else None)
        if isinstance(match, (int, float)) and objective.metric != "val_match_rate":
            value += f" (val match {100 * match:.0f}%)"  # the headline metric, at the same checkpoint
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        lines.append(f"  {t.trial_id}  {t.status:9s} epochs {t.epochs}  best {value}  {params}")
    lines.append(format_budget(summary.budget()))
    return "\n".join(lines)


def format_budget(budget) -> str:
    """One line: the compute a sweep spent, and how much of it came before its best result."""
    line = f"compute: {budget.epochs} epochs, {budget.trial_seconds / 60:.1f} trial-minutes"
    if budget.epochs_to_best is not None:
        epochs = f"{budget.epochs_to_best} epoch" + ("" if budget.epochs_to_best == 1 else "s")
        line += (f"; best reached after {epochs}, "
                 f"{budget.seconds_to_best / 60:.1f} trial-minutes")
    return line
