"""The fitted latent prior: fit on a prepared dataset, stored in the checkpoint, used by sampling."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import generated

from crystalae.cli import main


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from crystalae.checkpoint import save_checkpoint
    from crystalae.config import VoxelConfig
    from crystalae.models import CrystalAE, ModelConfig
    from crystalae.shards import PrepareOptions, prepare_dataset

    base = tmp_path_factory.mktemp("prior")
    voxel = VoxelConfig(grid=8)
    prepare_dataset("demo:24", base / "data", voxel, PrepareOptions(val_fraction=0.2, test_fraction=0.0), workers=1)
    from crystalae.dataset import dataset_species, read_manifest

    species = dataset_species(base / "data")
    torch.manual_seed(0)
    model = CrystalAE(ModelConfig(grid=8, latent_dim=6, depth=1, base_width=4, max_width=8, seg_depth=1,
                                  seg_width=4, residual=False, site_width=8, species=species,
                                  n_classes=len(species) + 1))
    save_checkpoint(base / "model", model, voxel, epoch=0, metrics={}, train_config={},
                    dataset_hash=read_manifest(base / "data")["dataset_hash"])
    return base / "model", base / "data"


def test_fitted_prior_matches_the_training_latents_and_travels_in_the_checkpoint(model_and_data, tmp_path):
    from crystalae.checkpoint import export_checkpoint, load_checkpoint
    from crystalae.dataset import read_table, table_batches
    from crystalae.prior import fit_latent_prior, sample_latents
    from crystalae.units import density_scale

    folder, data = model_and_data
    loaded = load_checkpoint(folder)
    prior = fit_latent_prior(loaded, data, kind="fitted")
    train = read_table(data, split="train", columns=["density"])
    assert prior["count"] == train.num_rows and prior["mean"].shape == (6,)
    assert torch.equal(prior["scale_tril"], torch.tril(prior["scale_tril"]))
    # the mean is the mean of the posterior means, computed independently here
    codes = torch.cat([loaded.model.vae.encode(b["density"].unsqueeze(1) * density_scale(loaded.voxel))[0]
                       for b in table_batches(train, 7, columns=("density",))])
    torch.testing.assert_close(prior["mean"], codes.mean(0).float(), atol=1e-4, rtol=1e-4)

    export_checkpoint(folder, tmp_path / "with_prior", latent_prior=prior)
    reloaded = load_checkpoint(tmp_path / "with_prior")
    z = sample_latents(reloaded, 4000, seed=1)
    torch.testing.assert_close(z.mean(0), prior["mean"], atol=0.1 * float(prior["scale_tril"].abs().max()) + 1e-3,
                               rtol=0)
    cov = prior["scale_tril"] @ prior["scale_tril"].T
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.15 * float(cov.abs().max()), rtol=0)
    normal = sample_latents(reloaded, 4000, seed=1, prior="normal")
    assert abs(float(normal.std()) - 1.0) < 0.05
    described = json.loads((tmp_path / "with_prior" / "config.json").read_text())
    assert described["latent_prior"] == {"count": prior["count"], "split": "train", "temperature": 1.0, "kind": "fitted"}
    # a stored spread is the default; an explicit one overrides it
    export_checkpoint(folder, tmp_path / "narrow", latent_prior={**prior, "temperature": 0.5})
    narrow = load_checkpoint(tmp_path / "narrow")
    torch.testing.assert_close(sample_latents(narrow, 5, seed=3),
                               prior["mean"] + 0.5 * (sample_latents(reloaded, 5, seed=3) - prior["mean"]))
    torch.testing.assert_close(sample_latents(narrow, 5, seed=3, temperature=1.0), sample_latents(reloaded, 5, seed=3))
    with pytest.raises(ValueError, match="no fitted latent prior"):
        sample_latents(load_checkpoint(folder), 2, prior="fitted")


def test_the_posterior_prior_samples_around_the_training_codes(model_and_data, tmp_path):
    from crystalae.checkpoint import export_checkpoint, load_checkpoint
    from crystalae.prior import fit_latent_prior, sample_latents

    folder, data = model_and_data
    prior = fit_latent_prior(load_checkpoint(folder), data)
    assert prior["kind"] == "posterior" and prior["temperature"] == 0.1
    assert prior["codes"].shape == (prior["count"], 6)
    export_checkpoint(folder, tmp_path / "posterior", latent_prior=prior)
    loaded = load_checkpoint(tmp_path / "posterior")
    codes = prior["codes"].float()
    exact = sample_latents(loaded, 50, seed=2, temperature=0.0)  # no noise: each sample is a training code
    assert (exact[:, None] == codes[None]).all(-1).any(1).all()
    near = sample_latents(loaded, 50, seed=2)  # default spread 0.1 of the fitted Gaussian around a code
    offsets = near - exact
    torch.testing.assert_close(offsets, 0.1 * (sample_latents(loaded, 50, seed=2, prior="fitted", temperature=1.0)
                                               - prior["mean"]), atol=1e-5, rtol=0)
    # an older prior without codes samples its Gaussian, and says why it cannot sample the posterior
    export_checkpoint(folder, tmp_path / "old", latent_prior={k: v for k, v in prior.items() if k not in ("codes", "kind")})
    old = load_checkpoint(tmp_path / "old")
    torch.testing.assert_close(sample_latents(old, 3, seed=1, temperature=1.0), sample_latents(loaded, 3, seed=1, prior="fitted"))
    with pytest.raises(ValueError, match="keeps no training codes"):
        sample_latents(old, 2, prior="posterior")


def test_a_prior_of_the_wrong_size_is_refused(model_and_data, tmp_path):
    from crystalae.checkpoint import CheckpointError, export_checkpoint, load_checkpoint

    folder, _ = model_and_data
    export_checkpoint(folder, tmp_path / "bad", latent_prior={"mean": torch.zeros(3), "scale_tril": torch.eye(3)})
    with pytest.raises(CheckpointError, match="latent_prior does not fit latent_dim 6"):
        load_checkpoint(tmp_path / "bad")


def test_fit_prior_command_writes_a_new_checkpoint_that_generate_uses(model_and_data, tmp_path, capsys):
    folder, data = model_and_data
    # issue 24: never into an existing checkpoint (given as a folder or as its file) or registry version
    for checkpoint in (folder, folder / "checkpoint.pt"):
        assert main(["fit-prior", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(folder)]) == 2
        assert "already exists" in capsys.readouterr().err
    out = tmp_path / "fitted"
    assert main(["fit-prior", "--checkpoint", str(folder), "--data", str(data), "--out", str(out)]) == 0
    assert "fitted a latent prior" in capsys.readouterr().out
    rc = main(["generate", "--checkpoint", str(out), "--sample", "2", "--out", str(tmp_path / "gen"), "--cpu"])
    # auto takes the fitted prior's kind; the tiny model may decode none (then it exits 1, never 0)
    assert generated(rc, tmp_path / "gen", 2)["prior"] == {"kind": "posterior", "temperature": 0.1}
    assert "from the posterior prior at temperature 0.1 (the kind stored with the model)" in capsys.readouterr().out


def test_fit_prior_refuses_data_the_model_was_not_trained_on(model_and_data, tmp_path, capsys):
    """Issue 24: other voxel settings, unknown elements, another dataset (unless allowed)."""
    from crystalae.checkpoint import save_checkpoint
    from crystalae.config import VoxelConfig
    from crystalae.models import CrystalAE, ModelConfig
    from crystalae.shards import PrepareOptions, prepare_dataset

    folder, data = model_and_data
    options = PrepareOptions(val_fraction=0.2, test_fraction=0.0)
    prepare_dataset("demo:12", tmp_path / "grid12", VoxelConfig(grid=12), options, workers=1)
    prepare_dataset("demo:12", tmp_path / "other", VoxelConfig(grid=8), options, workers=1)

    def fit(checkpoint, dataset, *extra):
        return main(["fit-prior", "--checkpoint", str(checkpoint), "--data", str(dataset),
                     "--out", str(tmp_path / f"out-{len(list(tmp_path.iterdir()))}"), *extra])

    assert fit(folder, tmp_path / "grid12") == 2
    assert "voxelized with" in capsys.readouterr().err
    assert fit(folder, tmp_path / "other") == 2
    assert "not the dataset the checkpoint was trained on" in capsys.readouterr().err
    assert fit(folder, tmp_path / "other", "--allow-other-data") == 0
    carbon_only = CrystalAE(ModelConfig(grid=8, latent_dim=6, depth=1, base_width=4, max_width=8, seg_depth=1,
                                        seg_width=4, residual=False, site_width=8))
    save_checkpoint(tmp_path / "carbon_model", carbon_only, VoxelConfig(grid=8), epoch=0, metrics={},
                    train_config={}, dataset_hash="x")
    assert fit(tmp_path / "carbon_model", data, "--allow-other-data") == 2
    assert "elements the model does not know" in capsys.readouterr().err
