"""Models, checkpoints and Ray Train on a tiny grid (8^3) and a tiny model: minutes, CPU only."""
import json

import numpy as np
import pytest
import torch
from conftest import generated
from pymatgen.core import Structure

from crystalae.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from crystalae.config import ConfigError, TrainConfig, VoxelConfig
from crystalae.dataset import WorkerShare
from crystalae.models import PAPER_PRESET, CrystalAE, ModelConfig
from crystalae.shards import PrepareOptions, prepare_dataset
from crystalae.training import train

TINY = {"depth": 1, "base_width": 4, "max_width": 8, "latent_dim": 8, "seg_depth": 1, "seg_width": 4,
        "residual": False}
TRAIN = TrainConfig(epochs=4, batch_size=8, lr=5e-3, workers=2, eval_limit=4)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare_dataset("demo:36", out, VoxelConfig(grid=8), PrepareOptions(shard_size=12, val_fraction=0.2), workers=1)
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    import ray

    storage = tmp_path_factory.mktemp("runs")
    result = train(tiny_data, TRAIN, TINY, storage=storage, name="tiny")
    yield {"result": result, "storage": storage, "data": tiny_data}
    ray.shutdown()


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("keep", [True, False])
def test_worker_shares_are_disjoint_equal_and_take_equal_steps(tiny_data, world, keep):
    from crystalae.dataset import column_numpy, read_table

    train_rows = read_table(tiny_data, split="train")
    every = {tuple(row) for row in column_numpy(train_rows, "lattice").round(6)}
    shares = [WorkerShare(tiny_data, rank, world, batch_size=5, keep=keep) for rank in range(world)]
    seen, steps = [], set()
    for share in shares:
        epochs = [list(share.batches(epoch)) for epoch in (0, 1)]
        rows = [[tuple(r) for b in batches for r in b["lattice"].numpy().round(6)] for batches in epochs]
        assert sorted(rows[0]) == sorted(rows[1]) and rows[0] != rows[1]  # same rows, reshuffled
        assert all(b["density"].shape[1:] == (8, 8, 8) for b in epochs[0])
        steps.add(len(epochs[0]))
        seen += rows[0]
    assert len(steps) == 1  # data-parallel workers must step together
    assert len(seen) == len(set(seen)) == train_rows.num_rows // world * world and set(seen) <= every


def _latest(result) -> dict:
    return read_checkpoint(result.checkpoint.path)


def test_two_ray_workers_lower_the_loss(trained):
    assert trained["result"].error is None
    history = _latest(trained["result"])["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_samples"] > 0 and "val_match_rate" in history[-1]


def test_resume_continues_the_epoch_count(trained):
    result = train(trained["data"], TrainConfig(**{**TRAIN.as_dict(), "epochs": 6}), TINY,
                   storage=trained["storage"], name="tiny")
    payload = _latest(result)
    assert payload["epoch"] == 5
    assert [h["epoch"] for h in payload["history"]] == list(range(6))


def test_a_resumed_train_says_where_it_picks_up_and_counts_only_the_epochs_it_trained(trained, tmp_path, capsys):
    import yaml

    from crystalae.cli import main

    newest = sorted(p for p in (trained["storage"] / "tiny").glob("checkpoint_*") if p.is_dir())[-1]
    done = read_checkpoint(newest)["epoch"] + 1  # 4, or 6 after the resume test above
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"model": TINY, "train": {"eval_limit": 4}}))
    assert main(["train", "--data", str(trained["data"]), "--storage", str(trained["storage"]), "--name", "tiny",
                 "--config", str(spec), "--epochs", str(done + 1), "--batch-size", "8", "--workers", "2"]) == 0
    said = capsys.readouterr()
    assert f"resuming from epoch {done}/{done + 1} (the newest checkpoint in " in said.out + said.err
    assert f"trained 1 epoch ({done + 1}/{done + 1} in all); last validation" in said.out


def test_resume_with_another_model_config_is_refused(trained):
    with pytest.raises(CheckpointError, match="another model config"):
        train(trained["data"], TRAIN, {**TINY, "latent_dim": 12}, storage=trained["storage"], name="tiny")


def test_a_segmenter_trained_on_a_fixed_vae_keeps_the_vae_and_learns_the_species(trained, tmp_path):
    """`init_from` + `reader_only`: the base's architecture without repeating it, its VAE weights exactly,
    and a new segmenter that learned (its species loss fell and its weights moved from their start)."""
    base = sorted(p for p in (trained["storage"] / "tiny").glob("checkpoint_*") if p.is_dir())[-1]
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, workers=1, eval_limit=2, init_from=str(base), reader_only=True)
    result = train(trained["data"], cfg, {"species_from": "segmenter"}, storage=tmp_path, name="reader")
    assert result.error is None
    payload, base_payload = _latest(result), read_checkpoint(base)
    assert payload["model_config"]["latent_dim"] == TINY["latent_dim"]  # from the base, not given again
    assert payload["model_config"]["species_from"] == "segmenter"
    vae = {k: v for k, v in base_payload["model"].items() if k.startswith("vae.")}
    assert vae and all(torch.equal(payload["model"][k], v) for k, v in vae.items())
    history = payload["history"]
    assert history[-1]["train_species"] < history[0]["train_species"]
    torch.manual_seed(cfg.seed)  # the worker's seed: the segmenter's starting weights
    start = CrystalAE(ModelConfig.from_dict(payload["model_config"])).state_dict()
    assert any(not torch.equal(payload["model"][k], start[k]) for k in start if k.startswith("segmenter."))
    assert "site_head.net.0.weight" not in payload["model"]


def test_init_from_refuses_what_it_cannot_start_from(trained, tmp_path):
    from dataclasses import replace

    from crystalae.base_model import base_configs, check_base_voxel, load_base_weights

    with pytest.raises(ConfigError, match="reader_only needs init_from"):
        TrainConfig(reader_only=True)
    base = sorted(p for p in (trained["storage"] / "tiny").glob("checkpoint_*") if p.is_dir())[-1]
    overrides, voxel = base_configs(str(base))
    assert voxel == VoxelConfig.from_dict(read_checkpoint(base)["voxel_config"])
    assert overrides["latent_dim"] == TINY["latent_dim"] and "species" not in overrides  # the data sets species
    check_base_voxel(str(base), voxel, voxel)  # the same settings pass
    with pytest.raises(ConfigError, match="voxel settings differ.*sigma"):
        check_base_voxel(str(base), voxel, replace(voxel, sigma=voxel.sigma + 0.25))
    config = ModelConfig.from_dict(read_checkpoint(base)["model_config"])
    assert load_base_weights(CrystalAE(config), str(base)) == []  # the same model: every weight fits
    fresh = load_base_weights(CrystalAE(config), str(base), vae_only=True)  # a new reader of the same kind
    assert fresh and all(k.startswith("site_head.") for k in fresh)
    with pytest.raises(CheckpointError, match="its VAE does not fit"):
        load_base_weights(CrystalAE(replace(config, latent_dim=config.latent_dim + 4)), str(base))
    with pytest.raises(ValueError, match="no-such-model"):
        train(trained["data"], TrainConfig(epochs=1, init_from="no-such-model"), storage=tmp_path, name="x")


def test_reconstruct_and_generate_write_parseable_cifs(trained, tmp_path, capsys):
    from crystalae.cli import main

    # the newest kept checkpoint (the resume test above may have replaced the fixture's own)
    checkpoint = str(sorted(p for p in (trained["storage"] / "tiny").glob("checkpoint_*") if p.is_dir())[-1])
    out = tmp_path / "rec.csv"
    assert main(["reconstruct", "demo:6", "--checkpoint", checkpoint, "--out", str(out)]) == 0
    # every file it wrote is named, the per-structure details too
    assert f"wrote {out}, {tmp_path / 'rec.details.csv'} (per structure) and {tmp_path / 'rec.metrics.json'}" \
        in capsys.readouterr().out
    metrics = json.loads((tmp_path / "rec.metrics.json").read_text())
    assert metrics["n"] == 6
    gen = tmp_path / "gen"
    rc = main(["generate", "--checkpoint", checkpoint, "--sample", "3", "--out", str(gen), "--prior", "normal",
               "--interpolate", "demo-0000-rocksalt-MnSe", "demo-0001-cscl-TlCl", "--steps", "3",
               "--source", "demo:6"])  # no prior fitted: N(0, I) asked for; a run decoding none exits 1, never 0
    generated(rc, gen, 6)
    for cif in gen.glob("*.cif"):
        assert len(Structure.from_file(cif)) > 0


def test_checkpoint_weights_only_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(grid=8, species=(8, 22, 38), n_classes=4, **TINY)
    model = CrystalAE(config).eval()
    save_checkpoint(tmp_path, model, VoxelConfig(grid=8), epoch=3, metrics={"val_loss": np.float32(0.5)},
                    train_config=TRAIN.as_dict(), dataset_hash="abc")
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no pickled code inside
    loaded = load_checkpoint(tmp_path)
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        a, b = model(x), loaded.model(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert loaded.meta["epoch"] == 3 and loaded.voxel.grid == 8 and loaded.meta["metrics"]["val_loss"] == 0.5


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not readable"):
        load_checkpoint(tmp_path / "junk.pt")
    config = ModelConfig(grid=8, species=(6,), n_classes=2, **TINY)
    save_checkpoint(tmp_path / "ck", CrystalAE(config), VoxelConfig(grid=8), epoch=0, metrics={},
                    train_config={}, dataset_hash="")
    payload = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)
    payload["model_config"]["latent_dim"] = 16  # weights no longer fit
    torch.save(payload, tmp_path / "ck" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "ck")


def test_paper_preset_builds():
    config = ModelConfig(grid=32, species=(6,), n_classes=2, **PAPER_PRESET)
    model = CrystalAE(config).eval()
    assert model.vae.config.latent_dim == 300 and model.segmenter.gates is not None
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 32, 32))
    assert out["recon"].shape == (1, 1, 32, 32, 32) and out["species_logits"].shape == (1, 2, 32, 32, 32)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(grid=30, depth=4)


@pytest.mark.parametrize("periodic", [True, False])
def test_cell_models_are_equivariant_to_periodic_shifts(periodic):
    """Circular padding: shifting a periodic density by the total stride shifts the features exactly."""
    torch.manual_seed(0)
    config = ModelConfig(grid=16, periodic=periodic, species=(6,), n_classes=2,
                         species_from="site" if periodic else "segmenter", **{**TINY, "depth": 2})
    encoder = CrystalAE(config).vae.encoder.eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        shifted = encoder(torch.roll(x, shifts=4, dims=2))
        expected = torch.roll(encoder(x), shifts=1, dims=2)
    assert torch.allclose(shifted, expected, atol=1e-5) == periodic


def test_background_prefetch_gives_the_same_batches_and_raises_the_producers_error():
    from crystalae.dataset import prefetched

    batches = [{"density": torch.full((2, 3), float(k))} for k in range(7)]
    double = lambda b: {k: v * 2 for k, v in b.items()}  # noqa: E731
    inline = [b["density"] for b in prefetched(iter(batches), double)]
    background = [b["density"] for b in prefetched(iter(batches), double, background=True)]
    assert len(background) == 7 and all(torch.equal(a, b) for a, b in zip(inline, background))

    def broken():
        yield batches[0]
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        list(prefetched(broken(), background=True))
    first = next(prefetched(iter(batches), background=True))  # a consumer that stops early does not hang
    assert torch.equal(first["density"], batches[0]["density"])


def test_any_base_width_builds_and_runs():
    """GroupNorm takes up to 8 groups that divide the channels: a sweep's width 12 crashed every trial."""
    import torch

    from crystalae.models import CrystalAE, ModelConfig

    model = CrystalAE(ModelConfig(grid=8, base_width=12, max_width=24, depth=1, latent_dim=4, species=(11, 17),
                                  n_classes=3, residual=False, seg_depth=1, seg_width=6))
    out = model(torch.rand(2, 1, 8, 8, 8))
    assert out["recon"].shape == (2, 1, 8, 8, 8) and torch.isfinite(out["recon"]).all()


def test_grad_clip_bounds_each_step_and_is_off_by_default(tiny_data):
    """With plain SGD at lr 1 a step moves the weights by the gradient itself: clipped, its norm is the clip."""
    from crystalae.dataset import read_table, table_batches
    from crystalae.training import build_configs, run_epoch
    from crystalae.units import class_lookup, density_scale

    voxel, config = build_configs(tiny_data, TINY)
    batch = next(table_batches(read_table(tiny_data, split="train"), 8))

    def step_norm(cfg: TrainConfig) -> float:
        torch.manual_seed(0)
        model = CrystalAE(config)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        run_epoch(model, [batch], cfg, density_scale(voxel), class_lookup(config.species), torch.device("cpu"),
                  torch.optim.SGD(model.parameters(), lr=1.0))
        return float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())

    free = step_norm(TrainConfig(batch_size=8))
    assert TrainConfig().grad_clip is None and free > 1e-2
    assert step_norm(TrainConfig(batch_size=8, grad_clip=1e-3)) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ConfigError, match="grad_clip must be > 0, got 0.0"):
        TrainConfig(grad_clip=0.0)


def test_train_refuses_a_reader_without_a_base_or_an_unknown_base_in_one_line(trained, tmp_path, capsys):
    import yaml

    from crystalae.cli import main

    for train_section, said in (({"reader_only": True}, "reader_only needs init_from"),
                                ({"init_from": "no-such-model"}, "no-such-model")):
        spec = tmp_path / "reader.yaml"
        spec.write_text(yaml.safe_dump({"train": train_section}))
        assert main(["train", "--data", str(trained["data"]), "--storage", str(tmp_path), "--name", "r",
                     "--config", str(spec), "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and "Traceback" not in err[0], err
