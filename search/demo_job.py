"""The main job on the built-in demo data (`crystalae demo`): a round trip with no learning, a sweep, the
best trial promoted as `champion`, crystals generated from it and from the shipped perov_5 model.

Every step writes where the other commands look by default, so `generate --model champion`, `models`,
`crystalae.load("champion")` and `dashboard` find the results with no flag.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib.resources import as_file, files
from pathlib import Path

from crystalae.checkpoint import FILENAME
from crystalae.generate import sample, write_generated
from crystalae.loading import load_model
from crystalae.locations import REGISTRY, SWEEPS
from crystalae.pretrained import PRETRAINED
from crystalae.registry import Registry
from crystalae.report_lines import format_composition_validity, format_metrics, format_sweep
from crystalae.roundtrip import roundtrip
from crystalae.search.config import load_sweep_config
from crystalae.search.layout import SWEEP_FILE, sweep_dir
from crystalae.search.promote import promote_trial
from crystalae.search.sweep import run_sweep  # imports Ray

__all__ = ["demo_next_steps", "run_demo", "sample_pretrained"]


def run_demo(out: Path, storage: Path = SWEEPS, registry: Path = REGISTRY, workers: int | None = None,
             say: Callable[[str], None] = print) -> None:
    """Round trip, sweep (resumed when `storage` holds it), promote the best into `registry` as
    `champion`, generate from it into `out/generated`, sample the shipped perov_5 model into
    `out/pretrained_samples`; `say` gets one line per step."""
    out = Path(out)
    with as_file(files("crystalae.search") / "configs" / "demo.yaml") as demo_yaml:
        config = load_sweep_config(demo_yaml)
    say("1/5 round trip crystal -> density -> crystal on the demo set (no learning)")
    metrics = roundtrip(config.data["source"], out / "roundtrip.csv", config.voxel_config(), workers=workers)
    say("    " + format_metrics(metrics))
    say(f"2/5 sweep {config.name}: {config.trials} trials x {config.epochs} epochs (Ray Tune + Optuna + ASHA)")
    root = sweep_dir(storage, config.name)
    summary = run_sweep(config, storage=storage, resume=(root / SWEEP_FILE).exists())
    say(format_sweep(summary))
    entry = promote_trial(root, Registry(registry), alias="champion", fit_prior=True)  # a prior, so it samples well
    say(f"3/5 promoted trial {entry['source']['trial']} epoch {entry['epoch']} as {entry['ref']} (alias champion)")
    loaded = load_model("champion", registry, device="cpu")
    generated = write_generated(out / "generated", [(f"sample-{i:02d}", s) for i, s in enumerate(sample(loaded, 8))],
                                overwrite=True)  # the demo's own folder: a rerun replaces it
    say(f"4/5 generated {generated['decoded']} of {generated['count']} crystals into {out / 'generated'}: "
        f"structural validity {100 * generated['structural_validity']:.0f}%, "
        f"{format_composition_validity(generated)}")
    sample_pretrained(out / "pretrained_samples", say=say)
    say("\nnext:\n" + demo_next_steps(storage, registry))


def demo_next_steps(storage: Path, registry: Path) -> str:
    """The commands that pick up the demo's results, with only the flags that differ from the defaults."""
    on_registry = "" if Path(registry) == REGISTRY else f" --registry {registry}"
    on_storage = "" if Path(storage) == SWEEPS else f" --storage {storage}"
    return "\n".join(f"  .venv/bin/crystalae {command}" for command in (
        f"generate --model champion --sample 4{on_registry}", f"models{on_registry}",
        f"dashboard{on_storage}{on_registry}"))


def sample_pretrained(out: Path, count: int = 8, say: Callable[[str], None] = print) -> None:
    """The demo's last step: a few crystals from the shipped perov_5 model, with their validity."""
    folder = PRETRAINED / "perov_5"
    if not (folder / FILENAME).exists():
        say(f"(no shipped model at {folder}: skipped sampling from it)")
        return
    named = [(f"perov-{i:02d}", s) for i, s in enumerate(sample(load_model(folder, device="cpu"), count))]
    summary = write_generated(out, named, overwrite=True)
    formulas = ", ".join(s.composition.reduced_formula for _, s in named if s is not None)
    say(f"5/5 sampled {count} crystals from the shipped perov_5 model into {out}: {formulas}; "
        f"structural validity {100 * summary['structural_validity']:.0f}%, "
        f"{format_composition_validity(summary)}")
