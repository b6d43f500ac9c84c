"""The continuous reconstruction score (`recovery`) and the rank correlation that judges early cuts."""
import pytest
from pymatgen.core import Lattice, Structure

from crystalae.metrics import compare, recovery, summarize
from crystalae.search.results import Objective, SweepSummary, Trial, spearman


def perovskite(a: float = 4.0, species=("Ba", "Ti", "O", "O", "O")) -> Structure:
    return Structure(Lattice.cubic(a), list(species),
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def test_recovery_is_one_for_the_crystal_itself_and_zero_for_nothing():
    true = perovskite()
    assert recovery(true, true) == pytest.approx(1.0)
    assert recovery(None, true) == 0.0
    assert compare(None, true)["recovery"] == 0.0 and compare(true, true)["recovery"] == pytest.approx(1.0)


def test_recovery_counts_species_missing_and_extra_atoms():
    true = perovskite()
    wrong = perovskite(species=("Sr", "Ti", "O", "O", "O"))
    assert recovery(wrong, true) == pytest.approx(0.8)  # one atom of five has the wrong species
    missing = Structure(true.lattice, true.species[:4], true.frac_coords[:4])
    assert recovery(missing, true) == pytest.approx(0.8)
    extra = Structure(true.lattice, [*true.species, "O"], [*true.frac_coords, [0.25, 0.25, 0.25]])
    assert recovery(extra, true) == pytest.approx(5 / 6)  # an extra atom costs like a missing one
    doubled = Structure(true.lattice, [*true.species, "Ba"], [*true.frac_coords, [0.01, 0, 0]])
    assert recovery(doubled, true) == pytest.approx(5 / 6)  # one decoded atom serves one true atom


def test_recovery_falls_smoothly_with_the_lattice_and_positions():
    true = perovskite()
    values = [recovery(perovskite(a), true) for a in (4.0, 4.2, 4.6, 5.2)]
    assert values[0] > values[1] > values[2] > values[3] > 0
    assert recovery(perovskite(4.0 * 1.3), true) == pytest.approx(0.5)  # 1/2 at the matcher's ltol
    moved = Structure(true.lattice, true.species, [[0.2, 0, 0], *true.frac_coords[1:]])  # Ba 0.8 Å away
    assert recovery(moved, true) == pytest.approx(0.8)


def test_summaries_report_the_mean_recovery():
    true = perovskite()
    records = [compare(true, true), compare(None, true)]
    assert summarize(records)["mean_recovery"] == pytest.approx(0.5)


def _trial(trial_id: str, values: list[float], finals: list[float], status: str = "finished") -> Trial:
    history = [{"epoch": k, "val_recovery": v, "val_match_rate": f} for k, (v, f) in enumerate(zip(values, finals))]
    return Trial(trial_id, {}, status, len(history), history, [], None, None)


def test_rung_ranking_correlates_an_early_value_with_where_trials_end():
    summary = SweepSummary("s", Objective("val_recovery", "max"), [
        _trial("a", [0.1, 0.2, 0.3], [0.0, 0.1, 0.2]),
        _trial("b", [0.2, 0.3, 0.5], [0.0, 0.2, 0.4]),
        _trial("c", [0.3, 0.2, 0.6], [0.1, 0.3, 0.5]),
        _trial("d", [0.4, 0.1], [0.0, 0.0], status="early-stopped"),  # cut: never had the full budget
    ])
    first = summary.rung_ranking(1)
    assert [p[0] for p in first.points] == ["a", "b", "c"] and first.spearman == pytest.approx(1.0)
    assert summary.rung_ranking(2).spearman == pytest.approx(0.0)  # ties share a mean rank: b best here, c at the end
    assert len(summary.rung_ranking(1, full_only=False).points) == 4
    assert summary.rung_ranking(5).spearman is None  # no trial trained that long


def test_spearman_is_undefined_for_constant_or_short_inputs():
    assert spearman([1, 2], [2, 1]) is None
    assert spearman([0, 0, 0], [1, 2, 3]) is None
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("formula, valid", [
    ("BaTiO3", True), ("NaCl", True), ("CsPbBr3", True), ("KMgF3", True),
    ("C", True),  # one element: valid as it is
    ("Fe3Al", True),  # only metals: an alloy
    ("NaCl2", False), ("Ba2TiO5", False),  # no charge-neutral assignment of SMACT's oxidation states
    ("Ba2Ti2O6", True),  # judged at its reduced ratio, as BaTiO3
])
def test_smact_validity_follows_cdvaes_definition(formula, valid):
    pytest.importorskip("smact")
    from crystalae.validity import smact_valid

    assert smact_valid(formula) is valid


def test_generated_crystals_report_smact_validity_beside_pymatgens(tmp_path):
    pytest.importorskip("smact")
    from crystalae.generate import validity, write_generated

    peroxide_like = Structure(Lattice.cubic(4.0), ["Na", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    flags = validity(peroxide_like)  # SMACT allows O(-1): NaO passes it, pymatgen's guesses do not
    assert flags["smact_valid"] is True and flags["composition_valid"] is False
    summary = write_generated(tmp_path / "gen", [("a", perovskite()), ("b", peroxide_like), ("c", None)])
    assert summary["composition_validity_smact"] == pytest.approx(2 / 3)
    assert summary["composition_validity"] == pytest.approx(1 / 3)


def test_a_match_counts_under_cdvaes_protocol_only_when_the_reconstruction_is_valid():
    pytest.importorskip("smact")
    true = perovskite()
    assert compare(true, true)["valid_match"] is True
    crowded = Structure(Lattice.cubic(4.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.55]])
    result = compare(crowded, crowded)  # matches itself, but two atoms sit 0.2 Å apart and NaCl2 is not neutral
    assert result["match"] is True and result["valid_match"] is False
    assert summarize([compare(true, true), result])["valid_match_rate"] == pytest.approx(0.5)
