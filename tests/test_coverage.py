"""CDVAE's distribution metrics (crystalae.coverage): COV-R, COV-P, d_ρ, d_elem."""
import json

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

pytest.importorskip("matminer")

from crystalae.coverage import Fingerprints, coverage, distribution_metrics, fingerprints  # noqa: E402


@pytest.fixture(scope="module")
def perov_prints(perov_sample):
    structures = [s for _, s in perov_sample[:16]]
    return structures, fingerprints(structures, workers=1)


def test_a_set_covers_itself_fully(perov_prints):
    _, prints = perov_prints
    figures = distribution_metrics(prints, prints)
    assert figures["cov_recall"] == 1.0 and figures["cov_precision"] == 1.0
    # d_rho and d_elem compare the valid samples with the whole reference: equal when all are valid
    if prints.valid.all():
        assert figures["d_rho"] == pytest.approx(0.0) and figures["d_elem"] == pytest.approx(0.0)


def test_undecoded_samples_count_as_misses_of_precision_only(perov_prints):
    structures, prints = perov_prints
    with_failures = fingerprints([*structures, None, None], workers=1)
    assert not with_failures.valid[-2:].any() and np.isnan(with_failures.structure[-1]).all()
    figures = distribution_metrics(with_failures, prints)
    assert figures["cov_recall"] == 1.0
    assert figures["cov_precision"] == pytest.approx(len(structures) / (len(structures) + 2))


def test_a_different_chemistry_or_geometry_covers_nothing(perov_prints):
    _, prints = perov_prints
    carbon = Structure(Lattice.cubic(3.567), ["C"] * 8, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                                                          [0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75],
                                                          [0.25, 0.75, 0.75]])  # diamond
    figures = distribution_metrics(fingerprints([carbon] * 3, workers=1), prints)
    assert figures["cov_recall"] == 0.0 and figures["cov_precision"] == 0.0
    assert figures["d_elem"] > 1.5  # one element against the perovskites' three to five


def test_structure_and_composition_minima_are_taken_separately_as_in_cdvae():
    """CDVAE's compute_cov takes the nearest structure and the nearest composition fingerprints
    independently, for precision (per sample) and recall (per reference crystal)."""
    d_struct, d_comp = 61, 132
    far = np.full(d_comp, 1e3)
    reference = Fingerprints(structure=np.array([np.zeros(d_struct), np.ones(d_struct)]),  # A, B
                             composition=np.array([np.zeros(d_comp), far]), density=np.array([1.0, 2.0]),
                             n_elements=np.array([2, 2]), valid=np.array([True, True]))
    samples = Fingerprints(structure=np.array([np.zeros(d_struct), np.full(d_struct, 5.0)]),
                           composition=np.array([far, np.zeros(d_comp)]), density=np.array([1.0, 1.0]),
                           n_elements=np.array([2, 2]), valid=np.array([True, True]))
    figures = coverage(samples, reference, 0.2, 4.0)
    # sample 1: structure of A, composition of B -> counts; sample 2: near nothing in structure
    assert figures["cov_precision"] == 0.5
    # A: structure covered by sample 1, composition by sample 2 -> covered; B: no structure near it
    assert figures["cov_recall"] == 0.5


def test_generate_scores_a_batch_against_reference_crystals(perov_sample, tmp_path, capsys):
    from crystalae.cli import main
    from crystalae.pretrained import PRETRAINED

    if not (PRETRAINED / "perov_5" / "checkpoint.pt").exists():
        pytest.skip("no shipped perov_5 model in this checkout")
    refs = tmp_path / "refs"
    refs.mkdir()
    for mid, structure in perov_sample[:4]:
        structure.to(filename=str(refs / f"{mid}.cif"))
    out = tmp_path / "gen"
    # the shipped perov_5 model decodes real perovskites from its prior: the figures are about crystals
    assert main(["generate", "--checkpoint", str(PRETRAINED / "perov_5"), "--sample", "3", "--out", str(out),
                 "--reference", str(refs), "--cutoffs", "0.3", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    figures = summary["distribution"]
    assert summary["decoded"] == 3 and figures["valid_samples"] >= 1
    assert figures["reference"] == 4 and figures["samples"] == 3 and figures["cutoffs"] == [0.3, 5.0]
    assert 0.0 <= figures["cov_recall"] <= 1.0 and 0.0 <= figures["cov_precision"] <= 1.0
    assert figures["d_rho"] is not None and figures["d_elem"] is not None  # valid samples to compare
    assert "against 4 reference crystals" in capsys.readouterr().out
