"""One resolver: a model reference means the same model in `crystalae.load`, `--model` and the dashboard,
and the three share one set of generation defaults."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import crystalae
from crystalae.cli import build_parser, main
from crystalae.config import GENERATE_DEFAULTS


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_model_the_dashboard_offers_loads_by_its_reference_in_the_api_and_the_cli(tiny_sweep, tmp_path, capsys):
    pytest.importorskip("streamlit")
    from crystalae.dashboard.data import Paths, model_choices
    from crystalae.loading import load_model

    registry = str(tiny_sweep["registry"])
    choices, problems = model_choices(Paths(tiny_sweep["storage"], registry))
    assert not problems
    kinds = {"registry": [c for c in choices if c.ref.startswith("tiny@")], "shipped": [c for c in choices if c.shipped],
             "trial": [c for c in choices if c.sweep_root]}
    assert all(kinds.values()), kinds  # a registry version, a shipped model and a trial's checkpoint
    for choice in (kinds["registry"][0], kinds["shipped"][0], kinds["trial"][0]):
        by_dashboard = load_model(choice.path)
        assert _same_weights(crystalae.load(choice.ref, registry=registry, device="cpu").loaded, by_dashboard)
        out = tmp_path / choice.ref.replace("/", "_").replace("@", "-")[-40:]
        code = main(["generate", "--model", choice.ref, "--registry", registry, "--sample", "1", "--prior", "normal",
                     "--out", str(out), "--cpu"])
        assert code in (0, 1) and (out / "summary.json").exists(), capsys.readouterr()  # 1: the sample decoded to nothing
    # an alias and a checkpoint path, the other two kinds of reference, also work after --model
    for ref in ("champion", str(kinds["trial"][0].path)):
        assert _same_weights(crystalae.load(ref, registry=registry).loaded, load_model(ref, registry))
        assert main(["generate", "--model", ref, "--registry", registry, "--sample", "1", "--prior", "normal",
                     "--out", str(tmp_path / f"g{len(ref)}"), "--cpu"]) in (0, 1)


def test_a_reference_that_names_nothing_is_one_error_in_the_api_and_the_cli(tmp_path, capsys):
    with pytest.raises(LookupError, match="nor is 'nothing-here' a shipped model"):
        crystalae.load("nothing-here", registry=tmp_path / "registry")
    assert main(["generate", "--model", "nothing-here", "--registry", str(tmp_path / "registry"), "--sample", "1",
                 "--out", str(tmp_path / "g")]) == 2
    assert "nor is 'nothing-here' a shipped model" in capsys.readouterr().err


def test_the_cli_and_the_api_share_the_generation_defaults():
    from crystalae.api import CrystalModel

    args = build_parser().parse_args(["generate", "--model", "perov_5", "--sample", "1"])
    from crystalae.cli import _check_generate_options

    args.interpolate, args.alter = ["a", "b"], "a"  # so that every default is filled in
    _check_generate_options(args)
    alter = inspect.signature(CrystalModel.alter).parameters
    assert (args.steps, args.scale, args.count, args.seed) == (
        inspect.signature(CrystalModel.interpolate).parameters["steps"].default, alter["scale"].default,
        alter["count"].default, inspect.signature(CrystalModel.sample).parameters["seed"].default) == (
        GENERATE_DEFAULTS.interpolate_steps, GENERATE_DEFAULTS.alter_scale, GENERATE_DEFAULTS.alter_count,
        GENERATE_DEFAULTS.seed)


def test_alter_still_reads_its_old_n_keyword_with_a_deprecation_warning(tiny_checkpoint):
    from pymatgen.core import Lattice, Structure

    model = crystalae.load(tiny_checkpoint, device="cpu")
    salt = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        variants = model.alter(salt, n=2)
    assert len(variants) == 2 and any("alter(count=...)" in str(w.message) for w in caught)
