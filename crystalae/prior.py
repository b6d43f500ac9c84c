"""Where new crystals are sampled from: a Gaussian fitted to the training set's latent codes.

A VAE trained with a small KL weight (β = 1e-3 here, for sharp reconstructions) leaves its posterior
codes in a small, correlated region of latent space; N(0, I) samples mostly land outside it and decode
to overlapping or missing atoms. Fitting a full-covariance Gaussian to the posterior means of the
training crystals ("ex-post density estimation", Ghosh et al. 2020, *From Variational to Deterministic
Autoencoders*) and sampling from it keeps samples where the decoder was trained. The fit is stored in
the checkpoint (`latent_prior`: mean and Cholesky factor as tensors, weights-only safe).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystalae.checkpoint import LoadedModel, export_checkpoint
from crystalae.inference import density_scale


@torch.no_grad()
def fit_latent_prior(loaded: LoadedModel, data: str | Path, split: str = "train", batch_size: int = 64,
                     shrinkage: float = 1e-3, temperature: float = 1.0) -> dict[str, Any]:
    """Mean and Cholesky factor of the posterior means of `split` in a prepared dataset, and the
    default sampling spread (`temperature`) stored with them.

    `shrinkage` (a fraction of the mean variance, added to the diagonal) keeps the covariance positive
    definite when there are fewer crystals than latent dimensions.
    """
    from crystalae.shards import read_table
    from crystalae.training import table_batches

    table = read_table(data, split=split, columns=["density"])
    if table.num_rows < 2:
        raise ValueError(f"{data}: split {split!r} has {table.num_rows} rows; a latent prior needs at least 2")
    model, scale = loaded.model, density_scale(loaded.voxel)
    device = next(model.parameters()).device
    codes = []
    for batch in table_batches(table, batch_size, columns=("density",)):
        x = batch["density"].unsqueeze(1).to(device) * scale
        codes.append(model.vae.encode(x)[0].double().cpu())
    z = torch.cat(codes)
    mean = z.mean(0)
    cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    cov += shrinkage * cov.diagonal().mean() * torch.eye(len(mean), dtype=cov.dtype)
    return {"mean": mean.float(), "scale_tril": torch.linalg.cholesky(cov).float(), "count": int(len(z)),
            "split": split, "temperature": float(temperature)}


def sample_latents(loaded: LoadedModel, count: int, seed: int = 0, prior: str = "auto",
                   temperature: float | None = None) -> torch.Tensor:
    """(count, latent_dim) latents: from the fitted prior when the checkpoint has one ("auto"/"fitted"),
    else from N(0, I) ("normal"). `temperature` scales the spread around the mean; None takes the
    one stored with the fitted prior (1 for N(0, I))."""
    if prior not in ("auto", "fitted", "normal"):
        raise ValueError(f"prior must be auto, fitted or normal, got {prior!r}")
    fitted = loaded.meta.get("latent_prior")
    if prior == "fitted" and fitted is None:
        raise ValueError("this checkpoint has no fitted latent prior (add one with `crystalae fit-prior`)")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, loaded.model.config.latent_dim, generator=generator)
    if fitted is not None and prior != "normal":
        spread = float(fitted.get("temperature", 1.0)) if temperature is None else temperature
        z = fitted["mean"] + spread * noise @ fitted["scale_tril"].T
    else:
        z = (1.0 if temperature is None else temperature) * noise
    return z.to(next(loaded.model.parameters()).device)


def with_latent_prior(source: str | Path, data: str | Path, out: str | Path, split: str = "train",
                      temperature: float = 1.0) -> dict[str, Any]:
    """Copy checkpoint `source` to `out` (without optimizer state) with a prior fitted on `data`."""
    from crystalae.checkpoint import load_checkpoint

    prior = fit_latent_prior(load_checkpoint(source), data, split, temperature=temperature)
    export_checkpoint(source, out, latent_prior=prior)
    return {"count": prior["count"], "split": split,
            "mean_norm": float(np.linalg.norm(prior["mean"].numpy())),
            "mean_std": float(prior["scale_tril"].pow(2).sum(1).sqrt().mean())}
