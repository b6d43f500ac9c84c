"""Symmetry snapping of decoded crystals."""
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystalae.metrics import structure_matcher
from crystalae.symmetry import crystal_system, spacegroup, symmetrize

DIAMOND = Structure(Lattice.cubic(3.567), ["C"] * 8,
                    [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                     [0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75]])


def _noisy(structure: Structure, position: float, angle: float, seed: int = 0) -> Structure:
    """`structure` with Gaussian position noise (Å) and its angles bent by `angle` degrees."""
    rng = np.random.default_rng(seed)
    a, b, c = structure.lattice.abc
    lattice = Lattice.from_parameters(a * 1.01, b, c * 0.99, 90 + angle, 90 - angle, 90 + 0.5 * angle)
    cart = structure.frac_coords @ lattice.matrix + rng.normal(0, position, (len(structure), 3))
    return Structure(lattice, structure.species, cart, coords_are_cartesian=True)


def test_snapping_restores_the_ideal_crystal_within_its_tolerance():
    noisy = _noisy(DIAMOND, 0.05, 2.0)
    assert spacegroup(noisy, 0.01)[1] < 10  # the noise broke the symmetry
    snapped = symmetrize(noisy, 0.3)
    assert spacegroup(snapped, 0.01) == ("Fd-3m", 227)
    rms_noisy = structure_matcher().get_rms_dist(noisy, DIAMOND)[0]
    rms_snapped = structure_matcher().get_rms_dist(snapped, DIAMOND)[0]
    assert rms_snapped < 0.1 * rms_noisy
    assert crystal_system(snapped) == "cubic"


def test_a_tolerance_below_the_noise_keeps_the_crystal_as_decoded():
    noisy = _noisy(DIAMOND, 0.05, 2.0)
    kept = symmetrize(noisy, 1e-4)
    assert spacegroup(kept, 0.01)[1] < 10
    assert kept.matches(noisy)


def test_snapping_refuses_a_tolerance_that_is_not_a_positive_length():
    with pytest.raises(ValueError, match="symprec"):
        symmetrize(DIAMOND, 0.0)


def test_reconstructions_snap_at_the_models_tolerance_samples_stay_raw_and_the_user_decides_both():
    import torch

    import crystalae
    from crystalae.generate import decode_to_structures
    from crystalae.symmetry import decoding_symprec

    model = crystalae.load("carbon_24", device="cpu")
    assert decoding_symprec(model.loaded, reconstructing=True) == 0.5  # chosen on its validation split
    assert decoding_symprec(model.loaded, reconstructing=False) is None
    raw = crystalae.load("carbon_24", device="cpu", symprec=0)
    assert decoding_symprec(raw.loaded, reconstructing=True) is None
    z = torch.from_numpy(np.random.default_rng(0).normal(0, 0.05, (3, raw.loaded.model_config.latent_dim))).float()
    z = z + raw.loaded.meta["latent_prior"]["mean"].float()
    as_decoded = decode_to_structures(raw.loaded, z)
    assert decode_to_structures(model.loaded, z) == as_decoded  # samples: raw by default
    as_reconstructed = decode_to_structures(model.loaded, z, reconstructing=True)
    by_user = decode_to_structures(crystalae.load("carbon_24", device="cpu", symprec=0.3).loaded, z)
    assert any(s is not None for s in as_decoded)
    for a, b, c in zip(as_decoded, as_reconstructed, by_user):
        if a is not None:
            assert b == symmetrize(a, 0.5) and c == symmetrize(a, 0.3)
    with pytest.raises(ValueError, match="symprec"):
        crystalae.load("carbon_24", device="cpu", symprec=-0.1)


def test_reconstruct_refuses_a_negative_tolerance_in_one_line(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "crystalae", "reconstruct", "--checkpoint", "pretrained/perov_5",
                          "demo:2", "--out", str(tmp_path / "r.csv"), "--symprec", "-1"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "symprec" in run.stderr
    assert not (tmp_path / "r.csv").exists()
