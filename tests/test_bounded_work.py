"""Issue 37, bounded work on every input: a crafted cell (huge, near-flat, a thousandth of an ångström, or
10^4 atoms by symmetry) is refused by one check, before anything is sized by it, in `data prepare`,
`roundtrip`, `reconstruct`, the Python API and what the dashboard calls; all of it under a memory cap."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from test_reliability import GOOD_CIF, _symmetry_bomb

# (file name, what its one line of refusal says)
CRAFTED = {
    "huge.cif": "cell length 1e+08 Å is over 100 Å",  # Niggli-reducing it alone took 20 GB
    "coplanar.json": "closer than 0.5 Å to its own image",  # long vectors, but 10 c - 3 a - 4 b is 1e-3 Å
    "thin.json": "periodic images",  # no vector under 0.5 Å, but a needle of a cell
    "tiny.json": "degenerate lattice",  # a 1e-3 Å cube (pymatgen's CIF reader refuses one itself)
    "bomb.cif": "symmetry operations",  # 52 sites x 192 operations
    "many.json": "atoms, over the 4096",  # 10^4 atoms listed one by one
}
MEMORY_CAP = 2 << 30  # address space of the whole process, torch and pymatgen included (~1.2 GB alone)


def _cif(length: float) -> str:
    return GOOD_CIF.replace("4.0", f"{length:g}")


def write_crafted(folder) -> None:
    folder.mkdir()
    (folder / "good.cif").write_text(GOOD_CIF)
    (folder / "huge.cif").write_text(_cif(1e8))
    tiny = Structure(Lattice.cubic(1e-3), ["Na"], [[0, 0, 0]])
    (folder / "tiny.json").write_text(json.dumps(tiny.as_dict()))
    (folder / "bomb.cif").write_text(_symmetry_bomb())
    coplanar = Structure(Lattice([[10, 0, 0], [0, 10, 0], [3, 4, 1e-4]]), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0]])
    (folder / "coplanar.json").write_text(json.dumps(coplanar.as_dict()))
    thin = Structure(Lattice.tetragonal(0.6, 99.0), ["Na"], [[0, 0, 0]])  # 15,000 images at grid 8
    (folder / "thin.json").write_text(json.dumps(thin.as_dict()))
    rng = np.random.default_rng(0)
    many = Structure(Lattice.cubic(99.0), ["Na"] * 10_000, rng.random((10_000, 3)))
    (folder / "many.json").write_text(json.dumps(many.as_dict()))


_CAPPED = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from crystalae.cli import main
    folder, checkpoint, out = sys.argv[1:]
    codes = {{
        "prepare": main(["data", "prepare", folder, "--out", out + "/ds", "--grid", "8", "--workers", "1"]),
        "roundtrip": main(["roundtrip", folder, "--out", out + "/rt.csv", "--grid", "8", "--workers", "1"]),
        "reconstruct": main(["reconstruct", folder, "--checkpoint", checkpoint, "--out", out + "/rc.csv"]),
        "reconstruct_one": main(["reconstruct", folder + "/huge.cif", "--checkpoint", checkpoint,
                                 "--out", out + "/one.csv"]),
    }}
    import crystalae
    from crystalae.generate import reference_structures, voxelized_source
    from crystalae.sources import StructureError
    model = crystalae.load(checkpoint, device="cpu")
    api = {{}}
    for name in {names!r}:
        try:
            model.densities(folder + "/" + name)
            api[name] = "accepted"
        except StructureError as exc:
            api[name] = str(exc)
    # what the dashboard's Generate page calls for a source's crystals and for a reference batch
    page = {{it["material_id"]: it.get("error", "") for it in voxelized_source(model.loaded, folder)}}
    reference = len(reference_structures(folder))
    print(json.dumps({{"codes": codes, "api": api, "page": page, "reference": reference}}))
""")


def test_crafted_cells_are_refused_by_every_entry_point_under_a_memory_cap(tmp_path, tiny_checkpoint):
    folder = tmp_path / "crafted"
    write_crafted(folder)
    script = _CAPPED.format(cap=MEMORY_CAP, names=sorted(CRAFTED))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(tiny_checkpoint), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "MemoryError" not in done.stderr and "out of memory" not in done.stderr, done.stderr[-3000:]
    # the good crystal is read everywhere; the single crafted file is one line naming its reason, exit 2
    assert result["codes"] == {"prepare": 0, "roundtrip": 0, "reconstruct": 0, "reconstruct_one": 2}
    one = [line for line in done.stderr.splitlines() if line.startswith("crystalae: error:")]
    assert len(one) == 1 and "huge.cif" in one[0] and CRAFTED["huge.cif"] in one[0], one

    rejects = {row["material_id"]: row["reason"] for row in _csv(tmp_path / "ds" / "rejects.csv")}
    roundtrip = {row["material_id"]: row["error"] for row in _csv(tmp_path / "rt.details.csv")}
    reconstruct = {row["material_id"]: row["error"] for row in _csv(tmp_path / "rc.details.csv")}
    for name, needle in CRAFTED.items():
        mid = name.split(".")[0]
        assert needle in rejects[mid], (name, rejects[mid])
        assert roundtrip[mid] == "input rejected: " + rejects[mid]  # the same one line everywhere
        assert reconstruct[mid] == result["page"][mid] == rejects[mid]
        assert needle in result["api"][name], (name, result["api"][name])
    assert "good" not in rejects and result["page"]["good"] == ""
    assert result["reference"] == 2  # good and thin: a reference batch is not voxelized, so only size and shape count
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["counts"]["rows"] == 1


def _csv(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_cell_check_is_the_one_decoding_uses():
    """Decoding a predicted lattice and voxelizing a file's refuse with the same words (one check)."""
    from crystalae.config import VoxelConfig
    from crystalae.decode import DecodeError, decode
    from crystalae.voxelize import VoxelizeError, cell_problem, voxelize_arrays

    config = VoxelConfig(grid=8)
    thin = Lattice.from_parameters(60.0, 1.0, 1.0, 30, 30, 30).matrix
    with pytest.raises(VoxelizeError) as voxelizing:
        voxelize_arrays(thin, np.zeros((1, 3)), np.array([6]), config)
    density = voxelize_arrays(Lattice.cubic(4.0).matrix, np.zeros((1, 3)), np.array([6]), config)
    density.lattice = thin
    with pytest.raises(DecodeError) as decoding:
        decode(density, species_source="density")
    assert str(voxelizing.value) == cell_problem(thin, config) and str(decoding.value).startswith(str(voxelizing.value))
    for bad in (np.full((3, 3), np.nan), np.eye(3) * 1e300, np.zeros((3, 3))):
        assert cell_problem(bad, config) is not None


def test_voxelizing_work_is_bounded_and_its_memory_does_not_grow_with_it(monkeypatch):
    """The Gaussian terms of a crystal are counted before any is computed (a fine grid and wide Gaussians
    on many atoms are refused), and those allowed are summed in batches, to the same bits."""
    import crystalae.voxelize as voxelize
    from crystalae.config import VoxelConfig

    lattice = Lattice.cubic(6.0).matrix
    frac = np.random.default_rng(1).random((60, 3)) @ np.diag([1, 1, 1])
    numbers = np.full(60, 6)
    with pytest.raises(voxelize.VoxelizeError, match="Gaussian terms"):
        voxelize.voxelize_arrays(lattice, frac, numbers, VoxelConfig(grid=128, sigma=2.0, cutoff_sigmas=10, max_atoms=64))
    skewed = Lattice.from_parameters(5.0, 6.0, 7.0, 70, 80, 100).matrix
    config = VoxelConfig(grid=16)
    whole = voxelize.voxelize_arrays(skewed, frac[:12], numbers[:12], config).values
    monkeypatch.setattr(voxelize, "_FLUSH", 500)  # batches and slabs far smaller than one atom's window
    assert np.array_equal(voxelize.voxelize_arrays(skewed, frac[:12], numbers[:12], config).values, whole)
