"""Choosing the atom count at decoding (`crystalae.readout.CountChoice`): the count head's likeliest
counts, each read out, the one whose crystal explains the decoded density best."""
import numpy as np
from pymatgen.core import Lattice, Structure

from crystalae.config import VoxelConfig
from crystalae.metrics import compare
from crystalae.models import CrystalAE, ModelConfig
from crystalae.readout import CountChoice, density_misfit, outputs_to_structures
from crystalae.voxelize import voxelize

CONFIG = VoxelConfig(grid=16, sigma=0.7)
# Two carbons 1.2 Å apart at sigma 0.7 Å make one blob: a density that looks like one atom.
TRUTH = Structure(Lattice.from_parameters(6, 5, 5.5, 80, 95, 100), ["C", "C"], [[0.4, 0.5, 0.5], [0.6, 0.5, 0.5]])


def _decoded(head_probabilities, choice):
    """TRUTH's exact density decoded as if a count head had said `head_probabilities` (1, 2, ... atoms)."""
    model = CrystalAE(ModelConfig(grid=16, latent_dim=4, depth=1, base_width=4, max_width=8, residual=False,
                                  species=(6,), n_classes=2, species_from="density", count_head=True, max_atoms=4))
    probabilities = np.array(head_probabilities + [1e-6] * (4 - len(head_probabilities)))
    outputs = {"density": voxelize(TRUTH, CONFIG).values[None], "latent": np.zeros((1, 4), np.float32),
               "count_logp": np.log(probabilities / probabilities.sum())[None],
               "atoms": np.array([int(np.argmax(probabilities)) + 1])}
    return outputs_to_structures(model, CONFIG, outputs, TRUTH.lattice.matrix[None], count_choice=choice)[0]


def test_the_count_that_explains_the_density_wins_over_a_slightly_likelier_one():
    assert len(_decoded([0.6, 0.4], None)) == 1  # the head's argmax: one atom
    assert len(_decoded([0.6, 0.4], CountChoice(candidates=1))) == 1
    chosen = _decoded([0.6, 0.4], CountChoice(candidates=2, prior_weight=0.003))
    assert len(chosen) == 2 and compare(chosen, TRUTH)["match"]
    # only the head's likeliest counts are tried (here 1 and 3, not the ruled-out 2); a heavy prior keeps the argmax
    assert len(_decoded([0.6, 1e-9, 0.4], CountChoice(candidates=2, prior_weight=0.003))) in (1, 3)
    assert len(_decoded([0.6, 0.4], CountChoice(candidates=2, prior_weight=100.0))) == 1


def test_density_misfit_is_zero_for_the_crystal_that_made_the_density():
    density = voxelize(TRUTH, CONFIG).values
    assert density_misfit(TRUTH, CONFIG, density) < 1e-6
    one = Structure(TRUTH.lattice, ["C"], [[0.5, 0.5, 0.5]])
    assert density_misfit(one, CONFIG, density) > 0.05


def test_a_models_stored_decoding_settings_give_its_count_choice():
    assert CountChoice.of(None) == CountChoice(candidates=1)
    assert CountChoice.of({"symprec": 0.5}) == CountChoice(candidates=1)
    assert CountChoice.of({"count_candidates": 3, "count_prior_weight": 0.01}) == CountChoice(3, 0.01)


def test_a_segmenter_model_chooses_counts_with_its_labels():
    model = CrystalAE(ModelConfig(grid=16, latent_dim=4, depth=1, base_width=4, max_width=8, residual=False, seg_depth=1,
                                  seg_width=4, species=(6,), n_classes=2, species_from="segmenter", count_head=True,
                                  max_atoms=4))
    density = voxelize(TRUTH, CONFIG)
    outputs = {"density": density.values[None], "labels": density.labels[None], "latent": np.zeros((1, 4), np.float32),
               "count_logp": np.log(np.array([0.6, 0.4 - 2e-6, 1e-6, 1e-6]))[None], "atoms": np.array([1])}
    chosen = outputs_to_structures(model, CONFIG, outputs, TRUTH.lattice.matrix[None], count_choice=CountChoice(2))[0]
    assert len(chosen) == 2 and compare(chosen, TRUTH)["match"]
