"""Data-parallel training across two nodes of a local Ray cluster (`tests/raycluster.py`): one Ray Train
worker per node, gloo between them. One step of crystalae's training step (`run_epoch`) on two halves of
a global batch gives the weights one process gets from the same global batch, and the two workers read
disjoint shares of the shards (`WorkerShare`). test_training.py covers shares and 2-worker training on
one node."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from crystalae.config import VoxelConfig
from crystalae.dataset import read_table, table_batches
from crystalae.losses import loss_terms
from crystalae.models import CrystalAE
from crystalae.shards import PrepareOptions, prepare_dataset
from crystalae.training import TrainConfig, build_configs, class_lookup, density_scale

TINY = {"depth": 1, "base_width": 4, "max_width": 8, "latent_dim": 8, "seg_depth": 1, "seg_width": 4,
        "residual": False}
# Deterministic loss: no random empty-site queries and no per-batch density normalisation, so each
# half's loss depends on its rows alone; no augmentation (each rank draws its own).
STEP = TrainConfig(batch_size=4, workers=2, threads=1, negatives=0, recon_normalize=False, shift=False,
                   substitute=0.0, grad_clip=None)
GLOBAL_BATCH = 8
LR = 0.5

WORKERS = """
import json, sys, ray, ray.train, torch
from ray.train.torch import TorchTrainer

def loop(config):
    import numpy as np
    from crystalae.dataset import WorkerShare, read_table, table_batches
    from crystalae.models import CrystalAE
    from crystalae.training import TrainConfig, build_configs, class_lookup, density_scale, run_epoch

    cfg = TrainConfig.from_dict(config["train"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(1)
    voxel, model_cfg = build_configs(config["data"], config["model"])
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(CrystalAE(model_cfg))  # DDP over gloo
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    table = read_table(config["data"], split="train").slice(0, config["global_batch"])
    half = table.take(list(range(rank, config["global_batch"], world)))  # this rank's half of the global batch
    torch.manual_seed(100 + rank)  # the VAE's sampling noise, drawn again by the one-process reference
    run_epoch(model, table_batches(half, len(half)), cfg, density_scale(voxel), class_lookup(model_cfg.species),
              torch.device("cpu"), optimizer)
    core = model.module if hasattr(model, "module") else model
    share = WorkerShare(config["data"], rank, world, cfg.batch_size, keep=False, seed=cfg.seed)
    rows = [[round(float(v), 5) for v in r] for b in share.batches(0) for r in b["lattice"].reshape(len(b["lattice"]), -1)]
    torch.save({"node": ray.util.get_node_ip_address(), "rows": rows,
                "weights": {k: v.detach().clone() for k, v in core.state_dict().items()}},
               f"{config['out']}/rank{rank}.pt")

ray.init(address=sys.argv[1], log_to_driver=False)
config = json.loads(sys.argv[2])
TorchTrainer(loop, train_loop_config=config,
             scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
             run_config=ray.train.RunConfig(name="dp", storage_path=config["out"] + "/runs")).fit()
"""


def _reference(data, model_overrides) -> dict[str, torch.Tensor]:
    """One process, the same global batch: the gradient of each half (with the noise its rank drew),
    averaged as DDP averages it, then the same SGD step."""
    voxel, model_cfg = build_configs(data, model_overrides)
    torch.manual_seed(0)
    model = CrystalAE(model_cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    table = read_table(data, split="train").slice(0, GLOBAL_BATCH)
    grads = None
    for rank in (0, 1):
        half = table.take(list(range(rank, GLOBAL_BATCH, 2)))
        batch = next(iter(table_batches(half, len(half))))
        model.zero_grad()
        torch.manual_seed(100 + rank)
        loss_terms(model, batch, STEP, density_scale(voxel), class_lookup(model_cfg.species))["loss"].backward()
        g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    for p, g in zip(model.parameters(), grads):
        p.grad = g / 2
    optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_two_workers_on_two_nodes_step_as_one_process_and_read_disjoint_shares(tmp_path):
    from raycluster import local_cluster

    data = tmp_path / "data"
    prepare_dataset("demo:30", data, VoxelConfig(grid=8), PrepareOptions(shard_size=6, val_fraction=0.2), workers=1)
    config = {"data": str(data), "model": TINY, "train": STEP.as_dict(), "lr": LR, "global_batch": GLOBAL_BATCH,
              "out": str(tmp_path)}
    # one CPU per node: the two 1-CPU workers cannot share a node
    with local_cluster(head_cpus=1, workers={"127.0.0.3": 1}) as cluster:
        result = subprocess.run([sys.executable, "-c", WORKERS, cluster.address, json.dumps(config)],
                                env=cluster.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert {r["node"] for r in ranks} == {"127.0.0.2", "127.0.0.3"}
    reference = _reference(data, TINY)
    for name, expected in reference.items():
        for rank in ranks:
            torch.testing.assert_close(rank["weights"][name], expected, rtol=1e-5, atol=1e-6)
    # the step moved the weights (equal untrained weights would prove nothing)
    torch.manual_seed(0)
    initial = CrystalAE(build_configs(data, TINY)[1]).state_dict()
    assert any(not torch.allclose(initial[k], v) for k, v in reference.items())
    # each node read its own rows: disjoint, together every train row an epoch uses
    shares = [{tuple(r) for r in rank["rows"]} for rank in ranks]
    assert [len(s) for s in shares] == [len(rank["rows"]) for rank in ranks]
    assert not shares[0] & shares[1]
    assert len(shares[0]) + len(shares[1]) == read_table(data, split="train").num_rows // 2 * 2
