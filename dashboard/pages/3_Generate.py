"""Generate: random samples from the prior, interpolation between two crystals, alteration of one.

Results stay in session_state so they survive reruns (widget changes, downloads) until replaced.
"""
from __future__ import annotations

import streamlit as st

from crystalae.dashboard import data, views

st.set_page_config(page_title="Generate · crystalae", page_icon="💎", layout="wide")
if "generated" not in st.session_state:
    st.session_state.generated = None  # {"title", "model", "items": [(name, Structure | None)]}
paths = data.app_paths()
views.sidebar(paths)
st.title("Generate crystals")

choices = views.available_models(paths, f"No model yet: the registry `{paths.registry}` is empty and no "
                                  f"trial under `{paths.storage}` has a checkpoint. Run a sweep and promote its "
                                  "best checkpoint first.")

choice = views.model_picker(choices, "Model (registry alias / name@version, or a trial's best checkpoint)",
                            "generate_model")[0]
try:
    loaded = data.load_model(choice.path)
except data.MISSING_ERRORS as exc:  # e.g. the checkpoint folder was deleted after the sweep
    st.warning(f"Cannot load {choice.label}: {exc}")
    st.stop()
cfg, voxel = loaded.model_config, loaded.voxel
st.caption(f"latent_dim {cfg.latent_dim} · grid {voxel.grid}³ · {voxel.representation} representation · "
           f"sigma {voxel.sigma} Å · epoch {loaded.meta.get('epoch')}")


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


source = st.text_input("Structure source for Interpolate and Alter", "demo:36", key="source",
                       help="demo:N (built-in crystals), a CDVAE-style CSV, a folder of CIF/POSCAR files, or one file")
sample_tab, interp_tab, alter_tab = st.tabs(["Random samples", "Interpolate", "Alter"])
with sample_tab:
    left, right = st.columns(2)
    count = left.number_input("How many", 1, 24, 4, key="sample_count")
    seed = right.number_input("Seed", 0, 2**31 - 1, 0, key="sample_seed")
    if st.button("Generate samples", type="primary", key="sample_go"):
        from crystalae.generate import sample

        run(f"{count} samples (seed {seed})",
            lambda: [(f"sample-{seed}-{i}", s) for i, s in enumerate(sample(loaded, int(count), int(seed)))])

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
        steps = right.slider("Steps", 2, 12, 5, key="interp_steps")
        if st.button("Interpolate", type="primary", key="interp_go"):
            from crystalae.generate import interpolate

            run(f"{a} → {b} in {steps} steps",
                lambda: [(f"interp-{i}", s) for i, s in
                         enumerate(interpolate(loaded, *source_densities(source, [a, b]), int(steps)))])
    with alter_tab:
        left, mid, right = st.columns(3)
        base = left.selectbox("Crystal", ids, key="alter_id")
        scale = mid.slider("Noise scale (latent σ)", 0.0, 3.0, 0.5, 0.05, key="alter_scale")
        variants = right.number_input("Variants", 1, 12, 3, key="alter_count")
        alter_seed = right.number_input("Seed", 0, 2**31 - 1, 0, key="alter_seed")
        if st.button("Alter", type="primary", key="alter_go"):
            from crystalae.generate import alter

            run(f"{base} altered with scale {scale}",
                lambda: [(f"alter-{i}", s) for i, s in
                         enumerate(alter(loaded, source_densities(source, [base])[0], scale, int(variants),
                                         int(alter_seed)))])

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
