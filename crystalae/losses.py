"""The training objective: reconstruction MSE + beta * KL + lambda * species loss + lattice MSE
(+ atom-count cross-entropy), and the site head's query positions and targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from crystalae.config import TrainConfig
from crystalae.models import ModelConfig
from crystalae.units import lattice_targets

__all__ = ["loss_terms", "site_targets"]


def site_targets(sites: torch.Tensor, lattice: torch.Tensor, lut: torch.Tensor, negatives: int,
                 generator: torch.Generator | None = None, min_distance: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions (B, A + negatives, 3) and their classes: each atom's species, and random
    positions at least `min_distance` Å from every atom as class 0 (others ignored, -100)."""
    frac, z = sites[..., :3].float(), sites[..., 3].long()
    classes = torch.where(z > 0, lut.to(z.device)[z], torch.full_like(z, -100))
    if negatives == 0:
        return frac, classes
    rand = torch.rand(len(frac), negatives, 3, generator=generator).to(frac.device)
    d = rand[:, :, None, :] - frac[:, None, :, :]
    d = d - torch.round(d)
    cart = torch.einsum("bnak,bkj->bnaj", d, lattice.reshape(-1, 3, 3).float().to(frac.device))
    dist = cart.norm(dim=-1).masked_fill((z == 0)[:, None, :], float("inf")).min(dim=2).values
    empty = torch.where(dist > min_distance, 0, -100)
    return torch.cat([frac, rand], dim=1), torch.cat([classes, empty], dim=1)


def loss_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               scale: float, lut: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reconstruction MSE + beta * KL + lambda * species CE + lattice MSE. The species CE is the
    segmenter's per voxel (on the reconstruction) or the site head's per atom (teacher-forced at the
    true positions, plus empty positions); species read from peak weights add no term."""
    x = batch["density"].unsqueeze(1).float() * scale  # (B, 1, N, N, N)
    queries = None
    if _model_config(model).species_from == "site":
        queries, site_classes = site_targets(batch["sites"], batch["lattice"], lut, cfg.negatives)
    out = model(x, queries)
    recon = F.mse_loss(out["recon"].float(), x)
    if cfg.recon_normalize:
        recon = recon / x.pow(2).mean().clamp(min=1e-8)
    kl = -0.5 * torch.mean(1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp())
    terms = {"recon": recon, "kl": kl}
    if "species_logits" in out:
        target = lut.to(x.device)[batch["labels"].long()]  # (B, N, N, N) class indices
        weights = torch.ones(out["species_logits"].shape[1], device=x.device)
        weights[0] = cfg.background_weight
        terms["species"] = F.cross_entropy(out["species_logits"].float(), target, weight=weights)
    if "site_logits" in out:
        terms["species"] = _site_loss(out["site_logits"].float(), out["site_z"].float(), site_classes,
                                 _model_config(model).species, cfg)
    total = recon + cfg.beta * kl + cfg.species_weight * terms.get("species", torch.zeros((), device=x.device))
    if "lattice" in out:
        terms["lattice"] = F.mse_loss(out["lattice"].float(), lattice_targets(batch["lattice"]).to(x.device))
        total = total + cfg.lattice_weight * terms["lattice"]
    if "count_logits" in out:
        counts = (batch["sites"][..., 3] > 0).sum(1).to(x.device)
        terms["count"] = F.cross_entropy(out["count_logits"].float(), (counts - 1).clamp(min=0))
        total = total + cfg.count_weight * terms["count"]
    terms["loss"] = total
    return terms


def _model_config(model: torch.nn.Module) -> ModelConfig:
    """The ModelConfig of a model, also through a DistributedDataParallel wrapper."""
    return (model.module if hasattr(model, "module") else model).config


def _site_loss(logits: torch.Tensor, z_estimate: torch.Tensor, classes: torch.Tensor, species: tuple[int, ...],
              cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy against Z-smoothed targets (empty positions stay one-hot) + z_weight * MSE(Z / 10)."""
    valid = classes != -100
    target_class = classes.clamp(min=0)
    z_of = torch.tensor((0.0,) + tuple(float(z) for z in species), device=logits.device)
    if cfg.species_smoothing > 0:
        z_true = z_of[target_class]
        soft = torch.exp(-0.5 * ((z_of - z_true[..., None]) / cfg.species_smoothing) ** 2)
        soft[..., 0] = 0.0
        soft = torch.where((target_class == 0)[..., None], F.one_hot(target_class, logits.shape[-1]).float(), soft)
        soft = soft / soft.sum(-1, keepdim=True)
    else:
        soft = F.one_hot(target_class, logits.shape[-1]).float()
    loss = -(soft * F.log_softmax(logits, dim=-1)).sum(-1)[valid].mean()
    atoms = target_class > 0
    if cfg.z_weight > 0 and atoms.any():
        loss = loss + cfg.z_weight * ((z_estimate - z_of[target_class] / 10.0) ** 2)[atoms].mean()
    return loss
