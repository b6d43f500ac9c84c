"""Atom assignment: site head, peak-weight species, augmentation, the per-atom metrics and the score."""
import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalae.augment import augment, substitutes
from crystalae.config import TrainConfig, VoxelConfig
from crystalae.decode import decode
from crystalae.evaluation import evaluate
from crystalae.losses import site_targets
from crystalae.metrics import reconstruction_score, site_confusion
from crystalae.models import CrystalAE, ModelConfig, SiteHead
from crystalae.shards import site_table
from crystalae.training import lr_factor, run_epoch
from crystalae.units import density_scale
from crystalae.voxelize import voxelize

SRTIO3 = Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                   [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
VOXEL = VoxelConfig(grid=16, max_atoms=8)


def _batch(structures, voxel=VOXEL):
    grids = [voxelize(s, voxel) for s in structures]
    return {"density": torch.from_numpy(np.stack([g.values for g in grids])),
            "labels": torch.from_numpy(np.stack([g.labels for g in grids])),
            "lattice": torch.from_numpy(np.stack([s.lattice.matrix.ravel() for s in structures])),
            "sites": torch.from_numpy(np.stack([site_table(s, voxel.max_atoms) for s in structures]))}


def test_periodic_shift_augmentation_is_exact():
    cfg = TrainConfig(shift=True, substitute=0.0)
    out = augment(_batch([SRTIO3]), cfg, VOXEL, (8, 22, 38), np.random.default_rng(3))
    frac = out["sites"][0, :5, :3].double().numpy()
    moved = Structure(SRTIO3.lattice, SRTIO3.species, frac)
    expected = voxelize(moved, VOXEL)
    np.testing.assert_allclose(out["density"][0].numpy(), expected.values, atol=1e-4)
    np.testing.assert_array_equal(out["labels"][0].numpy(), expected.labels)
    assert not np.allclose(frac, SRTIO3.frac_coords % 1)  # the seed does move it


def test_substitution_keeps_oxidation_states_and_revoxelizes():
    species = (8, 20, 22, 38, 56, 40)  # O, Ca, Ti, Sr, Ba, Zr
    choices = substitutes(species)
    assert 56 in choices[38] and 8 not in choices[38]  # Sr2+ may become Ba2+, never O
    cfg = TrainConfig(shift=False, substitute=1.0)
    out = augment(_batch([SRTIO3] * 6), cfg, VOXEL, species, np.random.default_rng(0))
    changed = 0
    for i in range(6):
        z = out["sites"][i, :5, 3].numpy().astype(int)
        assert all(int(new) in choices[old.Z] for new, old in zip(z, SRTIO3.species))
        new = Structure(SRTIO3.lattice, [int(v) for v in z], SRTIO3.frac_coords)
        np.testing.assert_allclose(out["density"][i].numpy(), voxelize(new, VOXEL).values, atol=1e-4)
        changed += (z != [38, 22, 8, 8, 8]).any()
    assert changed > 0


def test_site_targets_label_atoms_and_only_empty_space_as_background():
    sites = torch.from_numpy(site_table(SRTIO3, 8))[None]
    lattice = torch.from_numpy(SRTIO3.lattice.matrix.ravel())[None]
    lut = torch.zeros(256, dtype=torch.long)
    lut[8], lut[22], lut[38] = 1, 2, 3
    queries, classes = site_targets(sites, lattice, lut, negatives=64, generator=torch.Generator().manual_seed(0))
    assert classes[0, :5].tolist() == [3, 2, 1, 1, 1] and (classes[0, 5:8] == -100).all()  # padding ignored
    structure = SRTIO3.copy()
    for f, c in zip(queries[0, 8:].double().numpy(), classes[0, 8:].tolist()):
        nearest = min(structure.lattice.get_distance_and_image(f, s.frac_coords)[0] for s in structure)
        assert (c == 0) == (nearest > 1.0) and c in (0, -100)
    assert (classes[0, 8:] == 0).sum() > 0


def test_site_head_is_periodic_in_position():
    config = ModelConfig(grid=8, depth=1, base_width=4, latent_dim=8, species=(8, 22), n_classes=3)
    head = SiteHead(config).eval()
    z, f, features = torch.randn(2, 8), torch.rand(2, 5, 3), torch.randn(2, 4, 8, 8, 8)
    torch.testing.assert_close(head(z, f, features), head(z, f + torch.tensor([1.0, -2.0, 3.0]), features),
                               atol=1e-4, rtol=0)


def test_peak_weight_species_restricted_to_known_elements():
    grid = voxelize(SRTIO3, VoxelConfig(grid=24))
    assert decode(grid, species_from="density").composition.reduced_formula == "SrTiO3"
    # without Ti (22) among the allowed elements, the nearest allowed weight wins: V (23)
    restricted = decode(grid, species_from="density", elements=(8, 23, 38))
    assert restricted.composition.reduced_formula == "SrVO3"


def test_site_confusion_counts_right_wrong_and_missing_atoms():
    species = (8, 22, 38)
    assert np.trace(site_confusion(SRTIO3, SRTIO3, species)) == 5
    wrong = SRTIO3.copy()
    wrong.replace(1, "O")
    shifted = Structure(SRTIO3.lattice, SRTIO3.species[:4], SRTIO3.frac_coords[:4] + 0.01)  # one atom missing
    counts = site_confusion(wrong, SRTIO3, species)
    assert counts[2, 1] == 1 and np.trace(counts) == 4
    counts = site_confusion(shifted, SRTIO3, species)
    assert counts[1, 0] == 1 and np.trace(counts) == 4
    assert site_confusion(None, SRTIO3, species)[:, 0].sum() == 5


def test_score_ranks_match_rate_first():
    assert reconstruction_score(0.5, 0.0, 0.0) > reconstruction_score(0.49, 1.0, 1.0)
    assert reconstruction_score(0.5, 0.9, 0.9) > reconstruction_score(0.5, 0.8, 0.9)
    assert reconstruction_score(None, None, None) == 0.0


def test_cosine_schedule_warms_up_then_decays():
    cfg = TrainConfig(epochs=10, lr=1e-3, warmup_epochs=1, min_lr=1e-5)
    assert lr_factor(cfg, 0.5) == pytest.approx(0.5)
    assert lr_factor(cfg, 1.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 10.0) == pytest.approx(0.01)
    assert lr_factor(TrainConfig(schedule="constant"), 7.0) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


@pytest.mark.parametrize("species_from", ["site", "segmenter", "segmenter+features", "density"])
def test_each_species_path_trains_and_evaluates(species_from, tmp_path):
    from crystalae.dataset import read_table, table_batches
    from crystalae.shards import PrepareOptions, prepare_dataset
    from crystalae.training import build_configs
    from crystalae.units import class_lookup

    prepare_dataset("demo:24", tmp_path, VoxelConfig(grid=8), PrepareOptions(val_fraction=0.3), workers=1)
    species_from, features = species_from.split("+")[0], species_from.endswith("+features")
    voxel, config = build_configs(tmp_path, {"species_from": species_from, "depth": 1, "base_width": 4,
                                             "latent_dim": 8, "seg_depth": 1, "seg_width": 4, "seg_features": features})
    torch.manual_seed(0)
    model = CrystalAE(config)
    assert (model.site_head is not None) == (species_from == "site")
    assert (model.segmenter is not None) == (species_from == "segmenter")
    if features:  # the density and the decoder's 4 feature channels
        assert model.segmenter.down[0].main[0].in_channels == 1 + 4
    cfg = TrainConfig(batch_size=8, eval_limit=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    terms = run_epoch(model, table_batches(read_table(tmp_path, split="train"), 8), cfg, density_scale(voxel),
                      class_lookup(config.species), torch.device("cpu"), optimizer,
                      lambda b: augment(b, cfg, voxel, config.species, rng))
    assert np.isfinite(terms["loss"]) and ("species" in terms) == (species_from != "density")
    metrics = evaluate(model, read_table(tmp_path, split="val"), voxel, cfg, torch.device("cpu"))
    assert 0 <= metrics["score"] <= 1.001 and len(metrics["confusion"]) == len(config.species) + 1


def test_periodic_feature_sampling_hits_voxels_and_interpolates():
    from crystalae.models import sample_periodic

    grid = torch.arange(4**3, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    at = torch.tensor([[[0.25, 0.5, 0.75], [0.999999, 0.0, 0.0], [0.125, 0.0, 0.0]]])
    values = sample_periodic(grid, at)[0, :, 0]
    assert values[0] == grid[0, 0, 1, 2, 3]
    assert values[1] == pytest.approx(float(grid[0, 0, 0, 0, 0]), abs=1e-3)  # wraps to voxel 0
    assert values[2] == pytest.approx(0.5 * (grid[0, 0, 0, 0, 0] + grid[0, 0, 1, 0, 0]).item())


def test_count_head_trains_and_sets_how_many_atoms_are_decoded(tmp_path):
    from crystalae.dataset import read_table, table_batches
    from crystalae.losses import loss_terms
    from crystalae.readout import decode_latents, outputs_to_structures
    from crystalae.shards import PrepareOptions, prepare_dataset
    from crystalae.training import build_configs
    from crystalae.units import class_lookup

    prepare_dataset("demo:16", tmp_path, VoxelConfig(grid=8, max_atoms=12), PrepareOptions(val_fraction=0.3), workers=1)
    voxel, config = build_configs(tmp_path, {"count_head": True, "depth": 1, "base_width": 4, "latent_dim": 8})
    assert config.max_atoms == 12
    torch.manual_seed(0)
    model = CrystalAE(config)
    batch = next(iter(table_batches(read_table(tmp_path, split="train"), 8)))
    terms = loss_terms(model, batch, TrainConfig(), density_scale(voxel), class_lookup(config.species))
    counts = (batch["sites"][..., 3] > 0).sum(1)
    # untrained: about log(12) per crystal; the term is in the total
    assert abs(float(terms["count"]) - np.log(12)) < 1.0 and float(terms["loss"]) > float(terms["count"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):  # the head alone can learn this batch's counts
        optimizer.zero_grad()
        loss_terms(model, batch, TrainConfig(), density_scale(voxel), class_lookup(config.species))["count"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = decode_latents(model, voxel, model.vae.encode(batch["density"][:, None] * density_scale(voxel))[0])
    assert (outputs["atoms"] == counts.numpy()).all()
    decoded = outputs_to_structures(model, voxel, outputs)
    assert all(len(s) == n for s, n in zip(decoded, outputs["atoms"]) if s is not None)


def test_count_head_needs_the_cell_grid():
    with pytest.raises(ValueError, match="count_head"):
        ModelConfig(grid=16, depth=2, periodic=False, species_from="segmenter", count_head=True)


def test_axis_permutation_augmentation_describes_the_same_crystal():
    cell = Structure(Lattice.from_parameters(3.1, 4.2, 5.3, 80, 95, 110), ["Sr", "Ti", "O"],
                     [[0.1, 0.2, 0.3], [0.6, 0.5, 0.9], [0.3, 0.8, 0.55]])
    cfg = TrainConfig(shift=False, substitute=0.0, permute_axes=True)
    out = augment(_batch([cell] * 6), cfg, VOXEL, (8, 22, 38), np.random.default_rng(1))
    orders = set()
    for i in range(6):
        lattice = out["lattice"][i].reshape(3, 3).double().numpy()
        moved = Structure(lattice, cell.species, out["sites"][i, :3, :3].double().numpy())
        assert moved.matches(cell)  # the same crystal
        expected = voxelize(moved, VOXEL)
        np.testing.assert_allclose(out["density"][i].numpy(), expected.values, atol=1e-4)
        np.testing.assert_array_equal(out["labels"][i].numpy(), expected.labels)
        orders.add(tuple(np.round(np.linalg.norm(lattice, axis=1), 3)))
    assert len(orders) > 1  # the seed does permute


def test_evaluate_reports_symmetrized_figures_and_per_crystal_records(tmp_path):
    from crystalae.dataset import read_table
    from crystalae.shards import PrepareOptions, prepare_dataset
    from crystalae.training import build_configs

    prepare_dataset("demo:12", tmp_path, VoxelConfig(grid=8), PrepareOptions(val_fraction=0.5), workers=1)
    voxel, config = build_configs(tmp_path, {"depth": 1, "base_width": 4, "latent_dim": 8})
    val = read_table(tmp_path, split="val")
    cfg = TrainConfig(batch_size=4, eval_limit=val.num_rows)
    plain = evaluate(CrystalAE(config), val, voxel, cfg, torch.device("cpu"))
    assert "symmetrized" not in plain and "records" not in plain
    torch.manual_seed(0)
    metrics = evaluate(CrystalAE(config), val, voxel, cfg, torch.device("cpu"), symprec=0.3, records=True)
    assert metrics["symmetrized"]["symprec"] == 0.3
    assert 0 <= metrics["symmetrized"]["match_rate"] <= 1
    assert len(metrics["records"]) == val.num_rows
    assert [r["material_id"] for r in metrics["records"]] == val.column("material_id").to_pylist()
    assert all("symmetrized_match" in r and r["n_atoms"] >= 1 for r in metrics["records"])
