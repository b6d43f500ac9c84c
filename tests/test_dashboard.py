"""Dashboard pages under streamlit.testing.v1.AppTest, against a real tiny sweep and its registry.

Paths reach the app through CRYSTALAE_STORAGE / CRYSTALAE_REGISTRY. Streamlit caches live for the
whole process, so every test that changes files works on its own copy (a fresh path, fresh keys).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")
from streamlit.testing.v1 import AppTest

from crystalae.dashboard.data import app_paths
from crystalae.dashboard.launch import launch_command

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard"
PAGES = {"home": DASHBOARD / "app.py", **{p.stem.split("_", 1)[1].lower(): p
                                          for p in sorted((DASHBOARD / "pages").glob("[0-9]_*.py"))}}
TIMEOUT = 120  # seconds per script run: the first model load imports torch, slow on a small CPU


def open_page(name: str, monkeypatch, storage: Path, registry: Path) -> AppTest:
    monkeypatch.setenv("CRYSTALAE_STORAGE", str(storage))
    monkeypatch.setenv("CRYSTALAE_REGISTRY", str(registry))
    return AppTest.from_file(str(PAGES[name]), default_timeout=TIMEOUT).run()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def messages(at: AppTest) -> str:
    return " ".join(e.value for e in [*at.info, *at.warning])


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def copy_sweep(tiny_sweep, dest: Path) -> Path:
    """The tiny sweep copied to `dest/sweeps/tiny` (Ray's tune/ state is not needed by the dashboard)."""
    target = dest / "sweeps" / "tiny"
    shutil.copytree(tiny_sweep["root"], target, ignore=shutil.ignore_patterns("tune", "*.lock"))
    return target


# ---- launch and paths -----------------------------------------------------------------------------

def test_launch_command_runs_app_with_paths(tmp_path):
    argv = launch_command(str(tmp_path / "s"), str(tmp_path / "r"), port=8765)
    assert argv[1:4] == ["-m", "streamlit", "run"]
    assert Path(argv[4]) == DASHBOARD / "app.py" and Path(argv[4]).is_absolute()
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--server.port") + 1] == "8765"
    assert argv[argv.index("--server.headless") + 1] == "true"
    tail = argv[argv.index("--") + 1:]
    assert tail == ["--storage", str((tmp_path / "s").resolve()), "--registry", str((tmp_path / "r").resolve())]


def test_app_paths_argv_then_env_then_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYSTALAE_STORAGE", str(tmp_path / "env_s"))
    monkeypatch.delenv("CRYSTALAE_REGISTRY", raising=False)
    paths = app_paths(["--storage", str(tmp_path / "arg_s")])
    assert paths.storage == tmp_path / "arg_s"
    assert paths.registry == Path("runs/registry").resolve()
    assert app_paths(["-q", "tests"]).storage == tmp_path / "env_s"  # pytest's own argv is ignored


# ---- pages on the real sweep --------------------------------------------------------------------

def test_home_lists_sweep_and_registry(tiny_sweep, monkeypatch):
    at = open_page("home", monkeypatch, tiny_sweep["storage"], tiny_sweep["registry"])
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["sweep"]) == ["tiny"] and table["trials"][0] == 3
    assert "champion" in " ".join(m.value for m in at.markdown)


def test_sweeps_page_table_curves_and_filters(tiny_sweep, monkeypatch):
    at = open_page("sweeps", monkeypatch, tiny_sweep["storage"], tiny_sweep["registry"])
    assert_clean(at)
    table = at.dataframe[0].value
    assert len(table) == 3
    # the sweep objective, then the params
    assert {"trial_id", "status", "epochs", "best val_score", "latent_dim", "sigma", "lr"} <= set(table.columns)
    assert charts(at) >= 3  # Pareto front, learning curves, parallel coordinates (+ importance when Optuna can)
    pareto = at.dataframe[1].value  # the front of the tiny sweep's two objectives
    assert {"trial_id", "val_score", "parameters"} <= set(pareto.columns) and 1 <= len(pareto) <= 3
    assert set(pareto["trial_id"]) <= set(table["trial_id"])

    first = table["trial_id"][0]
    at.text_input(key="text_filter").input(first).run()
    assert list(at.dataframe[0].value["trial_id"]) == [first]
    at.text_input(key="text_filter").input("").run()
    at.multiselect(key="status_filter").set_value([]).run()
    assert len(at.dataframe[0].value) == 0
    at.selectbox(key="curve_metric").set_value("val_density_mse").run()
    assert_clean(at)


def test_compare_page_metrics_confusion_and_reconstruction(tiny_sweep, monkeypatch):
    at = open_page("compare", monkeypatch, tiny_sweep["storage"], tiny_sweep["registry"])
    assert_clean(at)
    assert len(at.multiselect(key="compare_models").value) == 2
    metrics = at.dataframe[0].value
    assert len(metrics) == 2 and {"val_density_mse", "val_match_rate", "val_rms", "s / epoch"} <= set(metrics.columns)
    assert (metrics["s / epoch"] > 0).all() and set(metrics["trained"]) == {"VAE and reader together"}
    assert not at.warning, [w.value for w in at.warning]
    # per-element bars, 2 confusions, original atoms, then per model 2 slices + atoms + 2 isosurfaces
    assert charts(at) >= 3 + 1 + 2 * 5
    assert any("RMS" in m.value and "match" in m.value for m in at.markdown)
    at.slider(key="compare_slice").set_value(0).run()
    at.toggle(key="compare_iso").set_value(False).run()
    assert_clean(at)


def test_generate_page_samples_interpolates_and_alters(tiny_sweep, monkeypatch, tmp_path):
    at = open_page("generate", monkeypatch, tiny_sweep["storage"], tiny_sweep["registry"])
    assert_clean(at)
    assert "champion" in at.selectbox(key="generate_model").value
    assert not at.get("download_button")

    at.number_input(key="sample_count").set_value(3).run()
    at.selectbox(key="sample_prior").set_value("normal").run()
    at.button(key="sample_go").click().run()
    assert_clean(at)
    decoded = [b for b in at.get("download_button")]
    failed = [w for w in at.warning if "no atoms" in w.value]
    assert len(decoded) + len(failed) == 3, [w.value for w in at.warning]  # each sample shown, decoded or not
    # the display of decoded crystals, whatever this 2-epoch model decodes: two crystals and a failure
    from pymatgen.core import Lattice, Structure

    salt = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    monkeypatch.setattr("crystalae.generate.sample", lambda loaded, count, seed, *args: [salt, None, salt][:count])
    at.button(key="sample_go").click().run()
    assert_clean(at)
    assert len(at.get("download_button")) == 2 and sum("no atoms" in w.value for w in at.warning) == 1
    assert any("structural" in m.value and "composition" in m.value for m in at.markdown)

    at.button(key="interp_go").click().run()
    assert_clean(at)
    assert charts(at) == 5  # default 5 steps, one view each
    at.button(key="alter_go").click().run()
    assert_clean(at)
    assert charts(at) == 4 and at.header[0].value.endswith("altered with scale 0.5")  # the CLI's default 4 variants

    at.text_input(key="source").input(str(tmp_path / "missing.csv")).run()
    assert_clean(at)
    assert "Cannot read source" in messages(at)


@pytest.fixture(scope="module")
def tiny_registry(tiny_checkpoint, tmp_path_factory):
    """The untrained tiny checkpoint promoted into a registry beside empty sweep storage (no sweep, no Ray)."""
    from crystalae.registry import Registry

    base = tmp_path_factory.mktemp("tiny_registry")
    Registry(base / "registry").promote(tiny_checkpoint, "tiny", alias="champion")
    (base / "sweeps").mkdir()
    return {"storage": base / "sweeps", "registry": base / "registry"}


def test_density_histogram_overlays_valid_samples_and_reference_on_shared_bins():
    from crystalae.dashboard.views import density_histogram

    fig = density_histogram(np.array([2.0, 3.5, np.nan]), np.array([1.0, 2.5, 4.0, 6.0]))
    samples, reference = fig.data
    assert len(samples.x) == 2 and len(reference.x) == 4  # NaN (undecoded) left out
    assert samples.xbins == reference.xbins and samples.histnorm == "percent"
    assert fig.layout.barmode == "overlay" and "g/cm³" in fig.layout.xaxis.title.text
    assert len(density_histogram(np.array([]), np.array([])).data) == 2  # no valid sample: still a figure


def test_element_count_bars_share_of_each_set_per_count():
    from crystalae.dashboard.views import element_count_bars

    fig = element_count_bars(np.array([1, 2, 2, 0]), np.array([3, 3, 2, 5]))
    samples, reference = fig.data
    assert list(samples.x) == list(reference.x) == [1, 2, 3, 4, 5]
    assert list(samples.y) == pytest.approx([1 / 3, 2 / 3, 0, 0, 0])  # 0 elements (undecoded) left out
    assert list(reference.y) == pytest.approx([0, 0.25, 0.5, 0, 0.25])
    assert fig.layout.barmode == "group"
    assert [len(t.x) for t in element_count_bars(np.array([], int), np.array([], int)).data] == [1, 1]


def test_generate_page_batch_metrics(tiny_registry, monkeypatch):
    pytest.importorskip("matminer")
    from crystalae.pretrained import PRETRAINED

    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    at = open_page("generate", monkeypatch, tiny_registry["storage"], tiny_registry["registry"])
    assert_clean(at)
    assert at.number_input(key="batch_count").value == 200 and at.text_input(key="batch_reference").value == "demo:200"
    # the untrained champion has no fitted prior: the page says so, and auto sampling is refused as by the CLI
    assert "no fitted prior" in " ".join(c.value for c in at.caption)
    assert "has no fitted latent prior" in messages(at) and "crystalae fit-prior --checkpoint" in messages(at)
    at.number_input(key="batch_count").set_value(3)
    at.text_input(key="batch_reference").input("demo:5")
    at.button(key="batch_go").click().run()
    assert_clean(at)
    failed = [w.value for w in at.warning]
    assert len(failed) == 1 and "Batch metrics failed" in failed[0] and "no fitted latent prior" in failed[0]
    assert "--prior normal" in failed[0] and not at.metric

    # the shipped perov_5 model (posterior prior) decodes real crystals: the figures are about them
    at.selectbox(key="generate_model").set_value("perov_5 (shipped)").run()
    assert "posterior prior" in " ".join(c.value for c in at.caption) and "no fitted latent prior" not in messages(at)
    at.button(key="batch_go").click().run()
    assert_clean(at)
    tiles = {m.label: m.value for m in at.metric}
    assert {"Structural validity", "SMACT validity (as CDVAE)", "Composition validity (pymatgen, stricter)",
            "Unique", "Novel", "COV-R", "COV-P", "d_ρ (g/cm³)", "d_elem"} == set(tiles)
    # the crystals as summary.csv lists them; perov_5's training set is not prepared here, and the page says so
    crystals = at.dataframe[0].value
    assert list(crystals["sample"]) == [0, 1, 2] and {"spacegroup", "unique", "novel"} <= set(crystals.columns)
    assert tiles["Unique"].endswith("%") and tiles["Novel"] == "–"
    assert any(c.value.startswith("Novelty not computed: the training set (dataset ") for c in at.caption)
    assert float(tiles["Structural validity"].rstrip("%")) > 0, tiles  # some of the 3 samples are crystals
    assert tiles["COV-R"].endswith("%") and tiles["d_ρ (g/cm³)"] != "–" and tiles["d_elem"] != "–"
    assert charts(at) == 2  # density histogram and element-count bars
    assert "3 samples" in at.subheader[0].value and "demo:5" in at.subheader[0].value
    assert any("equal counts" in c.value and "scaler" in c.value for c in at.caption)

    at.number_input(key="batch_seed").set_value(1).run()  # a rerun keeps the result until the next click
    assert len(at.metric) == 9


def test_generate_page_batch_metrics_need_matminer(tiny_registry, monkeypatch):
    monkeypatch.setattr("crystalae.coverage.matminer_available", lambda: False)
    at = open_page("generate", monkeypatch, tiny_registry["storage"], tiny_registry["registry"])
    assert_clean(at)
    assert "pip install 'crystalae[metrics]'" in messages(at)
    assert "batch_go" not in [b.key for b in at.button]


def test_registry_page_lists_and_promotes(tiny_sweep, monkeypatch, tmp_path):
    registry = tmp_path / "registry"
    shutil.copytree(tiny_sweep["registry"], registry)
    at = open_page("registry", monkeypatch, tiny_sweep["storage"], registry)
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["ref"]) == ["tiny@1"] and table["aliases"][0] == "champion"
    assert at.button(key="promote_go").disabled  # nothing happens before the confirmation

    assert at.checkbox(key="promote_fit_prior").value is True  # as `crystalae promote`: on by default
    at.text_input(key="promote_alias").input("candidate").run()
    at.checkbox(key="promote_confirm").check().run()
    at.button(key="promote_go").click().run()
    assert_clean(at)
    assert "tiny@2" in at.success[0].value and "with a latent prior fitted on the trial" in at.success[0].value
    assert list(at.dataframe[0].value["ref"]) == ["tiny@1", "tiny@2"]
    assert json.loads((registry / "aliases.json").read_text())["candidate"] == "tiny@2"
    assert at.checkbox(key="promote_confirm").value is False
    from crystalae.checkpoint import read_checkpoint

    assert read_checkpoint(registry / "tiny" / "v2")["latent_prior"] is not None

    at.checkbox(key="promote_fit_prior").uncheck().run()  # as --no-fit-prior
    at.text_input(key="promote_alias").input("").run()
    at.checkbox(key="promote_confirm").check().run()
    at.button(key="promote_go").click().run()
    assert_clean(at)
    assert "tiny@3" in at.success[0].value and "without a fitted latent prior" in at.success[0].value
    assert "crystalae fit-prior" in at.success[0].value
    assert read_checkpoint(registry / "tiny" / "v3").get("latent_prior") is None


# ---- empty and broken states ----------------------------------------------------------------------

@pytest.mark.parametrize("page", list(PAGES))
def test_empty_storage_and_registry(page, monkeypatch, tmp_path):
    (tmp_path / "sweeps").mkdir()
    at = open_page(page, monkeypatch, tmp_path / "sweeps", tmp_path / "no-registry")
    assert_clean(at)
    assert at.info, f"{page}: no empty-state message"


def test_sweep_without_checkpoints(tiny_sweep, monkeypatch, tmp_path):
    """A sweep that has just started: sweep.json and a trial folder, no epoch, no summary, no study."""
    root = tmp_path / "sweeps" / "starting"
    trial = root / "trials" / "a1b2c3d4"
    trial.mkdir(parents=True)
    shutil.copy(tiny_sweep["root"] / "sweep.json", root / "sweep.json")
    shutil.copy(next(tiny_sweep["root"].glob("trials/*/params.json")), trial / "params.json")
    for page in PAGES:
        at = open_page(page, monkeypatch, tmp_path / "sweeps", tmp_path / "no-registry")
        assert_clean(at)
        assert at.info, f"{page}: no message for a sweep without checkpoints"
    at = open_page("sweeps", monkeypatch, tmp_path / "sweeps", tmp_path / "no-registry")
    text = messages(at)
    assert "still running" in text and "No checkpoint yet" in text and "No Optuna study" in text


def test_failed_trial_and_deleted_checkpoints(tiny_sweep, monkeypatch, tmp_path):
    """One trial marked failed, another's weights deleted, and a registry version whose weights are gone."""
    root = copy_sweep(tiny_sweep, tmp_path)
    summary = json.loads((root / "summary.json").read_text())
    failed, broken = summary["trials"][0]["trial_id"], summary["trials"][1]["trial_id"]
    summary["trials"][0]["status"] = "error"
    (root / "summary.json").write_text(json.dumps(summary))
    for weights in (root / "trials" / broken).glob("checkpoint_*/checkpoint.pt"):
        weights.unlink()
    registry = tmp_path / "registry"
    shutil.copytree(tiny_sweep["registry"], registry)
    (registry / "tiny" / "v1" / "checkpoint.pt").unlink()
    storage = tmp_path / "sweeps"

    at = open_page("sweeps", monkeypatch, storage, registry)
    assert_clean(at)
    assert f"Failed trials: {failed}" in messages(at)

    at = open_page("registry", monkeypatch, storage, registry)
    assert_clean(at)
    assert "Checkpoint file missing for tiny@1" in messages(at)

    at = open_page("generate", monkeypatch, storage, registry)  # the registry model comes first
    assert_clean(at)
    assert "Cannot load tiny@1" in messages(at)

    at = open_page("compare", monkeypatch, storage, registry)
    picked = [label for label in at.multiselect(key="compare_models").options if broken in label]
    at.multiselect(key="compare_models").set_value(["tiny@1 [champion] (registry)", *picked]).run()
    assert_clean(at)
    assert "missing" in messages(at) and "Pick two or more" not in messages(at)


# ---- crystal views ----------------------------------------------------------------------------------

def test_elements_wear_their_jmol_colours_and_s_and_tl_differ():
    from pymatgen.core import Lattice, Structure

    from crystalae.dashboard.views import element_color, structure_view

    assert element_color("S") == "#ffff30" and element_color("O") == "#ff0d0d" and element_color("Tl") == "#a6544d"
    common = ["H", "C", "N", "O", "F", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "K", "Ca", "Ti", "Fe", "Cu", "Zn",
              "Cd", "Tl", "Ba", "Pb", "Sr", "La"]
    assert len({element_color(e) for e in common}) == len(common)  # the md5 palette gave S and Tl, Cd and K one colour
    fig = structure_view(Structure(Lattice.cubic(4.0), ["Tl", "S"], [[0, 0, 0], [0.5, 0.5, 0.5]]), "TlS")
    colours = {t.name: t.marker.color for t in fig.data if t.mode == "markers"}
    assert colours == {"S": "#ffff30", "Tl": "#a6544d"}


def test_the_first_slice_goes_through_an_atom():
    """A one-atom (primitive bcc) cell holds its atom on the corner: the middle plane is empty."""
    from pymatgen.core import Lattice, Structure

    from crystalae.config import VoxelConfig
    from crystalae.dashboard.views import slice_through_atoms
    from crystalae.voxelize import voxelize

    values = voxelize(Structure(Lattice.cubic(3.0), ["Fe"], [[0, 0, 0]]), VoxelConfig(grid=16)).values
    k = slice_through_atoms(values)
    assert values[:, :, 16 // 2].max() < 0.05 * values.max() and values[:, :, k].max() == values.max()


def test_pickers_list_the_shipped_models_and_promote_starts_on_the_best_trial(tiny_sweep, monkeypatch, tmp_path):
    from crystalae.pretrained import pretrained_models

    shipped = [f"{m['name']} (shipped)" for m in pretrained_models()]
    if not shipped:
        pytest.skip("no shipped models in this checkout")
    at = open_page("generate", monkeypatch, tiny_sweep["storage"], tiny_sweep["registry"])
    assert_clean(at)
    options = at.selectbox(key="generate_model").options
    assert "champion" in options[0] and set(shipped) <= set(options)
    at = open_page("compare", monkeypatch, tiny_sweep["storage"], tiny_sweep["registry"])
    assert set(shipped) <= set(at.multiselect(key="compare_models").options)
    (tmp_path / "sweeps").mkdir()
    at = open_page("generate", monkeypatch, tmp_path / "sweeps", tmp_path / "no-registry")  # nothing of the user's
    assert_clean(at)
    assert "shipped reference models are listed" in messages(at) and at.selectbox(key="generate_model").value in shipped
    assert re.search(r"sigma \d+(\.\d{1,3})? Å", " ".join(c.value for c in at.caption))  # rounded, not 0.41027633760716437

    at = open_page("registry", monkeypatch, tiny_sweep["storage"], tiny_sweep["registry"])
    best = tiny_sweep["summary"].best_trial().trial_id
    assert at.selectbox(key="promote_trial").value.startswith(best)


def test_the_compare_table_says_when_a_reader_was_trained_alone_on_a_fixed_vae():
    from crystalae.dashboard.data import training_summary

    info = {"train_config": {"init_from": "perov_5", "reader_only": True},
            "history": [{"epoch_seconds": 10.0}, {"epoch_seconds": 30.0}, {"epoch_seconds": 12.0}, {}]}
    assert training_summary(info) == {"trained": "reader only, on perov_5's fixed VAE", "s / epoch": 12.0}
    assert training_summary({}) == {"trained": "VAE and reader together", "s / epoch": None}
