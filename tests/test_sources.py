import csv
import json

import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystalae.config import VoxelConfig
from crystalae.dataset import read_table
from crystalae.shards import PrepareOptions, prepare_dataset
from crystalae.sources import SourceError, StructureError, list_entries, load_structure

GOOD = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
GOOD_CIF = str(CifWriter(GOOD))

BAD_ROWS = {
    "garbage": ("this is not a CIF", "unparsable cif"),
    "nan": (GOOD_CIF.replace("0.50000000  0.50000000  0.50000000", "nan  0.5  0.5"), "unparsable cif"),
    "unknown": (GOOD_CIF.replace("  Cl  Cl1", "  Xx  Xx1"), "unknown element"),
    "empty": (GOOD_CIF.split("loop_\n _atom_site_type_symbol")[0], "unparsable cif"),
    "too-big": (str(CifWriter(Structure(Lattice.cubic(16.0), ["C"] * 3,
                                        [[0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [2 / 3, 2 / 3, 2 / 3]]))),
                "does not fit"),
}


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["material_id", "cif"])
        writer.writerows(rows)
    return path


def test_every_source_kind_reads(tmp_path, caplog):
    folder = tmp_path / "folder"
    folder.mkdir()
    GOOD.to(filename=str(folder / "a.cif"))
    GOOD.to(filename=str(folder / "POSCAR"))
    (folder / "c.json").write_text(json.dumps(GOOD.as_dict()))
    (folder / "notes.txt").write_text("not a structure")
    entries = list_entries(folder)
    assert "1 files are not in a format crystalae reads and are skipped: notes.txt" in caplog.text
    assert sorted(e.fmt for e in entries) == ["cif", "json", "poscar", "unknown"]
    for e in entries:
        if e.fmt == "unknown":  # a rejected entry that says why, not a silent skip
            with pytest.raises(StructureError, match="notes.txt: not a format crystalae reads"):
                load_structure(e)
        else:
            assert load_structure(e).composition.reduced_formula == "NaCl"
    csv_path = write_csv(tmp_path / "s.csv", [("x1", GOOD_CIF), ("x2", GOOD_CIF)])
    assert [e.material_id for e in list_entries(csv_path)] == ["x1", "x2"]
    assert len(list_entries(folder / "a.cif")) == 1
    assert len(list_entries("demo:5")) == 5


def test_gzipped_cifs_and_ase_formats_read_in_a_folder(tmp_path):
    import gzip

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.cif.gz").write_bytes(gzip.compress(GOOD_CIF.encode()))
    (folder / "bomb.cif.gz").write_bytes(gzip.compress(b" " * (2 << 20)))  # 2 MB of blanks from a few KB
    ase_io = pytest.importorskip("ase.io")
    from pymatgen.io.ase import AseAtomsAdaptor

    ase_io.write(str(folder / "b.extxyz"), AseAtomsAdaptor.get_atoms(GOOD), format="extxyz")
    ase_io.write(str(folder / "c.xsf"), AseAtomsAdaptor.get_atoms(GOOD), format="xsf")
    entries = {e.material_id: e for e in list_entries(folder)}
    assert set(entries) == {"a", "bomb", "b", "c"}
    for name in ("a", "b", "c"):
        assert load_structure(entries[name]).composition.reduced_formula == "NaCl", name
    with pytest.raises(StructureError, match="decompresses to over"):
        load_structure(entries["bomb"])


def test_missing_or_unusable_source_is_named(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_entries(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,2\n")
    with pytest.raises(SourceError, match="needs a 'cif' column"):
        list_entries(bad)


@pytest.mark.parametrize("name", ["garbage", "nan", "unknown", "empty"])
def test_bad_entries_raise_with_reason(tmp_path, name):
    text, reason = BAD_ROWS[name]
    entry = list_entries(write_csv(tmp_path / "one.csv", [(name, text)]))[0]
    with pytest.raises(StructureError, match=reason):
        load_structure(entry)


def test_prepare_skips_and_records_bad_rows_and_writes_the_rest(tmp_path):
    rows = [("good-1", GOOD_CIF)] + [(name, text) for name, (text, _) in BAD_ROWS.items()]
    rows += [("good-2", GOOD_CIF), ("good-1", GOOD_CIF)]  # the last is a duplicate id
    source = write_csv(tmp_path / "mixed.csv", rows)
    config = VoxelConfig(representation="box", grid=12)
    manifest = prepare_dataset(source, tmp_path / "ds", config, PrepareOptions(shard_size=3), workers=1)
    assert manifest["counts"]["rows"] == 2 and manifest["counts"]["rejected"] == len(BAD_ROWS) + 1
    with open(tmp_path / "ds" / "rejects.csv") as handle:
        rejects = {r["material_id"]: r["reason"] for r in csv.DictReader(handle)}
    assert set(rejects) == set(BAD_ROWS) | {"good-1"}
    assert "duplicate material_id" in rejects["good-1"]
    for name, (_, reason) in BAD_ROWS.items():
        assert reason in rejects[name] and rejects[name]
    assert sorted(read_table(tmp_path / "ds").column("material_id").to_pylist()) == ["good-1", "good-2"]


def test_nan_coordinates_in_json_are_rejected(tmp_path):
    data = GOOD.as_dict()
    data["sites"][1]["abc"] = [float("nan"), 0.5, 0.5]
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StructureError, match="NaN"):
        load_structure(list_entries(path)[0])
