"""Generate: random samples from the prior, interpolation between two crystals, alteration of one,
and CDVAE's generation metrics (validity, COV-R/COV-P, d_ρ, d_elem) of a batch of samples.

Results stay in session_state so they survive reruns (widget changes, downloads) until replaced.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import streamlit as st

from crystalae.config import GENERATE_DEFAULTS
from crystalae.dashboard import data, views

if TYPE_CHECKING:
    from streamlit.delta_generator import DeltaGenerator

    from crystalae.coverage import Fingerprints

st.set_page_config(page_title="Generate · crystalae", page_icon="💎", layout="wide")
if "generated" not in st.session_state:
    st.session_state.generated = None  # {"title", "model", "items": [(name, Structure | None)]}
if "batch_metrics" not in st.session_state:
    st.session_state.batch_metrics = None  # {"title", "metrics", "rates", "density", "elements"}
paths = data.app_paths()
views.sidebar(paths)
st.title("Generate crystals")

choices = views.available_models(paths, f"No model yet: the registry `{paths.registry}` is empty and no "
                                  f"trial under `{paths.storage}` has a checkpoint. Run a sweep and promote its "
                                  "best checkpoint first.")

choice = views.model_picker(choices, "Model (registry alias / name@version, a trial's best checkpoint, or a shipped model)",
                            "generate_model")[0]
try:
    loaded = data.load_model(choice.path)
except data.MISSING_ERRORS as exc:  # e.g. the checkpoint folder was deleted after the sweep
    st.warning(f"Cannot load {choice.label}: {exc}")
    st.stop()
cfg, voxel = loaded.model_config, loaded.voxel
fitted_prior = loaded.meta.get("latent_prior")
st.caption(f"latent_dim {cfg.latent_dim} · grid {voxel.grid}³ · {voxel.representation} representation · "
           f"sigma {voxel.sigma:.3g} Å · epoch {loaded.meta.get('epoch')} · "
           + (f"{fitted_prior.get('kind', 'fitted')} prior" if fitted_prior else "no fitted prior"))
if not fitted_prior:  # as `crystalae generate`: auto, fitted and posterior are refused, normal is asked for
    st.info(f"{choice.label} has no fitted latent prior, and N(0, I) latents decode mostly to nothing, so sampling "
            "it needs the normal prior, chosen on purpose. Fit one with `crystalae fit-prior --checkpoint "
            f"{choice.path} --data ITS_DATASET --out NEW`, or promote the trial on the Registry page (it fits one).")


def run(title: str, make) -> None:
    """Call a crystalae.generate function and keep its crystals; model/input problems become warnings."""
    try:
        items = make()
    except ValueError as exc:  # box models cannot sample; unknown ids, unreadable sources (StructureError)
        st.session_state.generated = None
        st.warning(f"{title} failed: {exc}")
        return
    st.session_state.generated = {"title": title, "model": choice.label, "items": items}


def source_densities(source: str, ids: list[str]):
    """Densities of `ids` voxelized with the model's own settings; raises StructureError with the reason."""
    from crystalae.generate import voxelized_source
    from crystalae.sources import StructureError

    items = voxelized_source(loaded, source, ids=ids)
    bad = [f"{it['material_id']}: {it['error']}" for it in items if "error" in it]
    if bad:
        raise StructureError("cannot voxelize " + "; ".join(bad))
    return [it["density"] for it in items]


def score_samples(structures: list, bar: DeltaGenerator, start: float, end: float
                  ) -> tuple[list[dict], Fingerprints]:
    """Validity flags and fingerprints of the samples, block by block so that the progress bar moves."""
    from dataclasses import fields

    import numpy as np

    from crystalae.coverage import Fingerprints, fingerprints
    from crystalae.generate import validity
    from crystalae.parallel import default_workers

    block = 25 * default_workers()  # one 25-crystal chunk per worker process at a time
    flags, parts = [], []
    for i in range(0, len(structures), block):
        part = structures[i : i + block]
        flags += [validity(s) for s in part]
        parts.append(fingerprints(part, desc="samples"))
        done = i + len(part)
        bar.progress(start + (end - start) * done / len(structures),
                     text=f"Fingerprinted {done} of {len(structures)} samples…")
    merged = Fingerprints(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Fingerprints)))
    return flags, merged


def share(flags: list[dict], name: str) -> float | None:
    """Share of all samples passing check `name`; None when the check is unavailable (SMACT missing)."""
    values = [f[name] for f in flags]
    return None if any(v is None for v in values) else sum(values) / max(len(values), 1)


def score_batch(count: int, seed: int, prior: str, temperature: float | None, reference: str,
                cutoffs: tuple[float, float]) -> None:
    """Sample a batch, fingerprint it and the reference and keep CDVAE's metrics; problems become warnings."""
    from crystalae.coverage import distribution_metrics
    from crystalae.generate import sample, triage
    from crystalae.search.training_set import training_set

    bar = st.progress(0.0, text=f"Reading and fingerprinting the reference {reference}…")
    try:
        ref = data.reference_fingerprints(reference)  # cached: the slow part the first time only
        bar.progress(0.1, text=f"Sampling {count} crystals…")
        structures = sample(loaded, count, seed, prior, temperature)
        flags, prints = score_samples(structures, bar, 0.15, 0.9)
        bar.progress(0.9, text="Comparing with the reference…")
        metrics = distribution_metrics(prints, ref, cutoffs)
        bar.progress(0.95, text="Space groups, uniqueness and novelty against the training set…")
        training = training_set(loaded, paths.storage)
        sorted_by = triage(structures, training)  # as summary.csv of `crystalae generate`
    except (ValueError, OSError) as exc:  # no prior for this kind, unreadable reference (SourceError, StructureError)
        st.session_state.batch_metrics = None
        st.warning(f"Batch metrics failed: {exc}")
        return
    finally:
        bar.empty()
    temperature_text = "stored temperature" if temperature is None else f"temperature {temperature:g}"
    st.session_state.batch_metrics = {
        "title": f"{count} samples of {choice.label} ({prior} prior, {temperature_text}, seed {seed}) against {reference}",
        "metrics": metrics,
        "rates": {k: share(flags, k) for k in ("structural_valid", "smact_valid", "composition_valid")},
        "uniqueness": sum(r["unique"] is True for r in sorted_by) / max(count, 1),
        "novelty": None if training.cifs is None else sum(r["novel"] is True for r in sorted_by) / max(count, 1),
        "novelty_note": training.note,
        "crystals": [{"sample": i, "formula": s.composition.reduced_formula if s is not None else "", **f, **r}
                     for i, (s, f, r) in enumerate(zip(structures, flags, sorted_by))],
        # d_ρ and d_elem compare the valid samples with the whole reference: plot the same sets
        "density": (prints.density[prints.valid], ref.density),
        "elements": (prints.n_elements[prints.valid], ref.n_elements),
    }


def show_batch(result: dict) -> None:
    """The metric tiles, a caption on how to read them, and the density and element-count figures."""
    def percent(x: float | None) -> str:
        return "–" if x is None else f"{x:.1%}"

    def distance(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    m, rates = result["metrics"], result["rates"]
    st.subheader(result["title"])
    validity_tiles = [
        ("Structural validity", percent(rates["structural_valid"]),
         "Share of all samples whose atoms are all more than 0.5 Å apart (undecoded samples count as invalid)."),
        ("SMACT validity (as CDVAE)", percent(rates["smact_valid"]),
         "Composition validity by SMACT, the check CDVAE reports; – without smact (pip install 'crystalae[metrics]')."),
        ("Composition validity (pymatgen, stricter)", percent(rates["composition_valid"]),
         "pymatgen finds a charge-neutral assignment of oxidation states; stricter than SMACT."),
        ("Unique", percent(result["uniqueness"]),
         "Share of all samples that are the first of their kind in the batch (StructureMatcher, CDVAE's settings)."),
        ("Novel", percent(result["novelty"]),
         "Share of all samples that match no crystal of the model's training set; – where that set is not here."),
    ]
    distribution_tiles = [
        ("COV-R", percent(m["cov_recall"]), "Share of reference crystals with a sample within both cutoffs."),
        ("COV-P", percent(m["cov_precision"]), "Share of all samples with a reference crystal within both cutoffs."),
        ("d_ρ (g/cm³)", distance(m["d_rho"]),
         "Wasserstein distance between the densities of the valid samples and of the reference."),
        ("d_elem", distance(m["d_elem"]),
         "Wasserstein distance between the numbers of distinct elements of the valid samples and of the reference."),
    ]
    for tiles in (validity_tiles, distribution_tiles):
        for column, (label, value, help_text) in zip(st.columns(len(tiles)), tiles):
            column.metric(label, value, help=help_text)
    st.caption(f"{m['samples']} samples ({m['valid_samples']} valid: structural and SMACT) against "
               f"{m['reference']} reference crystals, cutoffs {m['cutoffs'][0]:g} / {m['cutoffs'][1]:g}. "
               "COV-R and COV-P grow with the numbers of samples and of reference crystals: compare models at "
               "equal counts. The composition fingerprints are standardised with crystalae's own scaler (fitted on "
               "random compositions, not CDVAE's constants; see `crystalae/coverage.py`), so COV reads close to, "
               "not exactly as, CDVAE's.")
    if result["novelty"] is None:
        st.caption(result["novelty_note"][:1].upper() + result["novelty_note"][1:] + ".")
    st.dataframe(result["crystals"], hide_index=True, key="batch_crystals",
                 column_order=("sample", "formula", "spacegroup", "spacegroup_number", "unique", "novel",
                               "structural_valid", "smact_valid", "composition_valid"))
    left, right = st.columns(2)
    left.plotly_chart(views.density_histogram(*result["density"]), key="batch_density")
    right.plotly_chart(views.element_count_bars(*result["elements"]), key="batch_elements")


source = st.text_input("Structure source for Interpolate and Alter", "demo:36", key="source",
                       help="demo:N (built-in crystals), a CDVAE-style CSV, a folder of CIF/POSCAR files, or one file")
def prior_inputs(left: DeltaGenerator, right: DeltaGenerator, key: str) -> tuple[str, float | None]:
    """How to sample: the prior kind and its temperature (None: the one stored with the prior)."""
    from crystalae.prior import PRIORS

    prior = left.selectbox(
        "Prior", PRIORS, key=f"{key}_prior",
        help="auto: the kind stored with the model's prior; fitted: the Gaussian fitted to the training codes; "
             "posterior: around the training codes; normal: N(0, I). A model without a fitted prior samples only "
             "with normal (as `crystalae generate --prior normal`): fit one with `crystalae fit-prior`, or "
             "promote the trial on the Registry page")
    temperature = right.number_input(
        "Temperature", 0.0, 10.0, None, 0.01, key=f"{key}_temperature", placeholder="stored with the prior",
        help="Noise scale of the prior; empty: the one stored with the prior (else 1 for fitted and normal, "
             "0.1 for posterior)")
    return prior, temperature


sample_tab, interp_tab, alter_tab, metrics_tab = st.tabs(["Random samples", "Interpolate", "Alter", "Batch metrics"])
with sample_tab:
    columns = st.columns(4)
    count = columns[0].number_input("How many", 1, 24, 4, key="sample_count")
    seed = columns[1].number_input("Seed", 0, 2**31 - 1, GENERATE_DEFAULTS.seed, key="sample_seed")
    sample_prior, sample_temperature = prior_inputs(columns[2], columns[3], "sample")
    if st.button("Generate samples", type="primary", key="sample_go"):
        from crystalae.generate import sample

        run(f"{count} samples (seed {seed}, {sample_prior} prior)",
            lambda: [(f"sample-{seed}-{i}", s) for i, s in
                     enumerate(sample(loaded, int(count), int(seed), sample_prior, sample_temperature))])

try:
    ids = data.source_ids(source)
except (ValueError, OSError) as exc:  # SourceError is a ValueError
    ids = []
    for tab in (interp_tab, alter_tab):
        tab.warning(f"Cannot read source {source!r}: {exc}")

if ids:
    with interp_tab:
        left, mid, right = st.columns(3)
        a = left.selectbox("From", ids, index=0, key="interp_a")
        b = mid.selectbox("To", ids, index=min(1, len(ids) - 1), key="interp_b")
        steps = right.slider("Steps", 2, 12, GENERATE_DEFAULTS.interpolate_steps, key="interp_steps")
        if st.button("Interpolate", type="primary", key="interp_go"):
            from crystalae.generate import interpolate

            run(f"{a} → {b} in {steps} steps",
                lambda: [(f"interp-{i}", s) for i, s in
                         enumerate(interpolate(loaded, *source_densities(source, [a, b]), int(steps)))])
    with alter_tab:
        left, mid, right = st.columns(3)
        base = left.selectbox("Crystal", ids, key="alter_id")
        scale = mid.slider("Noise scale (latent σ)", 0.0, 3.0, GENERATE_DEFAULTS.alter_scale, 0.05,
                           key="alter_scale")
        variants = right.number_input("Variants", 1, 12, GENERATE_DEFAULTS.alter_count, key="alter_count")
        alter_seed = right.number_input("Seed", 0, 2**31 - 1, GENERATE_DEFAULTS.seed, key="alter_seed")
        if st.button("Alter", type="primary", key="alter_go"):
            from crystalae.generate import alter

            run(f"{base} altered with scale {scale}",
                lambda: [(f"alter-{i}", s) for i, s in
                         enumerate(alter(loaded, source_densities(source, [base])[0], scale, int(variants),
                                         int(alter_seed)))])

with metrics_tab:
    from crystalae.coverage import COVERAGE_CUTOFFS, matminer_available

    cutoff_help = ("Coverage cutoffs on the structure (CrystalNN) and composition (Magpie) fingerprint distances. "
                   "CDVAE: " + ", ".join(f"{a:g} / {b:g} for {name}" for name, (a, b) in COVERAGE_CUTOFFS.items()))
    columns = st.columns(4)
    batch_count = columns[0].number_input("Samples", 1, 2000, 200, key="batch_count",
                                          help="CrystalNN fingerprints cost ~0.1 s a crystal, shared by the CPU cores")
    batch_seed = columns[1].number_input("Seed", 0, 2**31 - 1, GENERATE_DEFAULTS.seed, key="batch_seed")
    batch_prior, batch_temperature = prior_inputs(columns[2], columns[3], "batch")
    left, mid, right = st.columns([2, 1, 1])
    batch_reference = left.text_input(
        "Reference crystals", "demo:200", key="batch_reference",
        help="demo:N (built-in crystals), a CDVAE-style CSV (e.g. a data set's test.csv), a folder of CIF/POSCAR "
             "files, or one file; fingerprinted once and cached")
    cut_structure = mid.number_input("Structure cutoff", 0.0, 1000.0, 0.2, 0.05, key="batch_cut_structure",
                                     help=cutoff_help)
    cut_composition = right.number_input("Composition cutoff", 0.0, 1000.0, 4.0, 0.5, key="batch_cut_composition",
                                         help=cutoff_help)
    if not matminer_available():  # CrystalNN and Magpie fingerprints come from matminer
        st.info("Batch metrics need matminer for the CDVAE fingerprints: `pip install 'crystalae[metrics]'`")
    elif not batch_reference.strip():  # an empty field would read the current folder
        st.info("Give the reference crystals to score the batch against (e.g. demo:200 or a test.csv).")
    elif st.button("Score a batch", type="primary", key="batch_go"):
        score_batch(int(batch_count), int(batch_seed), batch_prior, batch_temperature, batch_reference.strip(),
                    (float(cut_structure), float(cut_composition)))
    if st.session_state.batch_metrics is not None:
        show_batch(st.session_state.batch_metrics)

result = st.session_state.generated
if result is not None:
    from crystalae.generate import validity

    items = result["items"]
    flags = [validity(s) for _, s in items]
    st.header(result["title"])
    n = max(len(items), 1)
    st.caption(f"Model {result['model']} · decoded {sum(s is not None for _, s in items)}/{len(items)} · "
               f"structural validity {sum(f['structural_valid'] for f in flags) / n:.0%} · "
               f"composition validity {sum(f['composition_valid'] for f in flags) / n:.0%}")
    columns = st.columns(3)
    for i, ((name, structure), flag) in enumerate(zip(items, flags)):
        with columns[i % 3]:
            st.plotly_chart(views.structure_view(structure, name), key=f"gen_{i}")
            if structure is None:
                st.warning(f"{name}: no atoms could be decoded.")
                continue
            st.write(f"**{structure.composition.reduced_formula}** · {len(structure)} atoms  \n"
                     f"{views.badges(flag)}")
            st.download_button(f"Download {name}.cif", structure.to(fmt="cif"), file_name=f"{name}.cif",
                               mime="chemical/x-cif", on_click="ignore", key=f"cif_{i}")
