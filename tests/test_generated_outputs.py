"""What `generate` writes beside the CIFs for a user to triage: space group, symmetrized CIF, uniqueness."""
from __future__ import annotations

import csv

from pymatgen.core import Lattice, Structure

from crystalae.generate import write_generated


def test_summary_csv_gives_space_groups_symmetrized_cifs_and_uniqueness(tmp_path):
    salt = Structure(Lattice.cubic(5.6), ["Na"] * 4 + ["Cl"] * 4,
                     [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5]])
    shifted = salt.copy()
    shifted.translate_sites(list(range(len(shifted))), [0.01, 0, 0])  # the same crystal, a little off
    cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    summary = write_generated(tmp_path / "g", [("a", salt), ("b", shifted), ("c", None), ("d", cscl)])
    with open(tmp_path / "g" / "summary.csv", newline="") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    assert (rows["a"]["spacegroup"], rows["a"]["spacegroup_number"]) == ("Fm-3m", "225")
    assert rows["d"]["spacegroup"] == "Pm-3m"
    assert [rows[k]["unique"] for k in "abcd"] == ["True", "False", "", "True"]
    assert summary["uniqueness"] == 0.5  # two distinct crystals among four samples
    assert Structure.from_file(tmp_path / "g" / rows["a"]["symmetrized_cif"]).get_space_group_info()[0] == "Fm-3m"
    write_generated(tmp_path / "g", [("e", cscl)], overwrite=True)  # an earlier run's symmetrized CIFs go too
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["e.cif", "e.sym.cif", "summary.csv", "summary.json"]
