"""Where new crystals are sampled from: a Gaussian fitted to the training set's latent codes.

A VAE trained with a small KL weight (β = 1e-3 here, for sharp reconstructions) leaves its posterior
codes in a small, correlated region of latent space; N(0, I) samples mostly land outside it and decode
to overlapping or missing atoms. Fitting a full-covariance Gaussian to the posterior means of the
training crystals ("ex-post density estimation", Ghosh et al. 2020, *From Variational to Deterministic
Autoencoders*) and sampling from it keeps samples where the decoder was trained. The fit is stored in
the checkpoint (`latent_prior`: mean and Cholesky factor as tensors, weights-only safe).

A Gaussian still smears the data's clusters (perov_5: one composition family per cluster) into the
space between them, where the decoder mixes species: its samples cover the data poorly (COV-P 37% at
1.0). The checkpoint therefore also keeps the training codes themselves (float16), and the
`posterior` kind samples the aggregate posterior: a training code plus `temperature` x the fitted
Gaussian's spread (a kernel density estimate). Small bandwidths stay near training crystals (high
coverage, few new formulas), larger ones move away; `bench/generation.py` measures the trade-off.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystalae.checkpoint import LoadedModel, export_checkpoint
from crystalae.config import check_finite, check_whole
from crystalae.units import density_scale

__all__ = ["PRIORS", "fit_latent_prior", "resolve_prior", "sample_latents", "with_latent_prior"]


@torch.no_grad()
def fit_latent_prior(loaded: LoadedModel, data: str | Path, split: str = "train", *, batch_size: int = 64,
                     shrinkage: float = 1e-3, temperature: float | None = None, kind: str = "posterior"
                     ) -> dict[str, Any]:
    """Mean and Cholesky factor of the posterior means of `split` in a prepared dataset, the codes
    themselves, and the default way to sample: `kind` (fitted: the Gaussian; posterior: the codes
    plus Gaussian noise) at `temperature` (default: 1 for fitted, 0.1 for posterior).

    `shrinkage` (a fraction of the mean variance, added to the diagonal) keeps the covariance positive
    definite when there are fewer crystals than latent dimensions.
    """
    from tqdm.auto import tqdm

    from crystalae.dataset import read_table, table_batches

    if kind not in ("fitted", "posterior"):
        raise ValueError(f"prior kind must be fitted or posterior, got {kind!r}")
    temperature = DEFAULT_SPREAD[kind] if temperature is None else temperature
    table = read_table(data, split=split, columns=["density"])
    if table.num_rows < 2:
        raise ValueError(f"{data}: split {split!r} has {table.num_rows} rows; a latent prior needs at least 2")
    model, scale = loaded.model, density_scale(loaded.voxel)
    device = next(model.parameters()).device
    codes = []
    with tqdm(total=table.num_rows, desc="encode", unit="crystal", disable=None) as bar:
        for batch in table_batches(table, batch_size, columns=("density",)):
            x = batch["density"].unsqueeze(1).to(device) * scale
            codes.append(model.vae.encode(x)[0].double().cpu())
            bar.update(len(x))
    z = torch.cat(codes)
    mean = z.mean(0)
    cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    cov += shrinkage * cov.diagonal().mean() * torch.eye(len(mean), dtype=cov.dtype)
    return {"mean": mean.float(), "scale_tril": torch.linalg.cholesky(cov).float(), "count": int(len(z)),
            "split": split, "temperature": float(temperature), "kind": kind, "codes": z.half()}


#: the temperature each kind samples at unless told: the Gaussian as fitted; a tenth of it around a code
DEFAULT_SPREAD = {"fitted": 1.0, "posterior": 0.1, "normal": 1.0}
MAX_TEMPERATURE = 10.0  # as `generate --temperature`
MAX_SAMPLES = 100_000  # as `generate --sample`: the latents are drawn at once
PRIORS = ("auto", "fitted", "posterior", "normal")


def sample_latents(loaded: LoadedModel, count: int, seed: int = 0, prior: str = "auto",
                   temperature: float | None = None) -> torch.Tensor:
    """(count, latent_dim) latents from one of the `PRIORS`: "fitted" (the Gaussian fitted to the
    training codes), "posterior" (a training code plus that Gaussian's noise), "normal" (N(0, I)), or
    "auto": the kind stored with the checkpoint's prior (refused without one: see `resolve_prior`).
    `temperature` scales the noise; None takes the temperature stored with the prior for its kind
    (`DEFAULT_SPREAD` otherwise). Raises ValueError for a `count` that is no whole number in
    0..MAX_SAMPLES, a `seed` outside 0..2**63-1, a temperature that is no number in [0, MAX_TEMPERATURE]."""
    count = check_whole(count, "the number of samples", 0, MAX_SAMPLES)  # (count, latent_dim) floats at once
    seed = check_whole(seed, "the seed", 0, 2**63 - 1)
    kind, temperature = resolve_prior(loaded, prior, temperature)
    fitted = loaded.meta.get("latent_prior")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, loaded.model.config.latent_dim, generator=generator)
    if kind == "normal":
        z = temperature * noise
    elif kind == "fitted":
        z = fitted["mean"] + temperature * noise @ fitted["scale_tril"].T
    else:
        picked = torch.randint(len(fitted["codes"]), (count,), generator=generator)
        z = fitted["codes"][picked].float() + temperature * noise @ fitted["scale_tril"].T
    return z.to(next(loaded.model.parameters()).device)


def resolve_prior(loaded: LoadedModel, prior: str = "auto", temperature: float | None = None,
                  checkpoint: str = "CKPT") -> tuple[str, float]:
    """(kind, temperature) that `sample_latents` samples with for `prior` and `temperature` (see there).

    Raises:
        ValueError: an unknown `prior`; "auto", "fitted" or "posterior" for a checkpoint without a fitted
            prior (N(0, I) samples of a VAE trained with a small KL weight decode mostly to nothing, so
            "auto" does not fall back to them: the message names `crystalae fit-prior` for `checkpoint`).
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    if temperature is not None:  # NaN or a negative temperature would sample latents that mean nothing, silently
        check_finite(temperature, "the temperature", 0, MAX_TEMPERATURE)
    fitted = loaded.meta.get("latent_prior")
    if prior != "normal" and fitted is None:
        raise ValueError(f"this model has no fitted latent prior, and N(0, I) latents decode mostly to nothing: fit "
                         f"one with `crystalae fit-prior --checkpoint {checkpoint} --data ITS_DATASET --out NEW` "
                         "(promoting a sweep trial fits it), or ask for --prior normal")
    kind = prior if prior != "auto" else fitted.get("kind", "fitted")
    if kind == "posterior" and fitted.get("codes") is None:
        raise ValueError("this checkpoint's prior keeps no training codes (refit it with `crystalae fit-prior`)")
    if temperature is None:
        stored = fitted is not None and fitted.get("kind", "fitted") == kind and "temperature" in fitted
        temperature = float(fitted["temperature"]) if stored else DEFAULT_SPREAD[kind]
    return kind, float(temperature)


def _check_prior_data(loaded: LoadedModel, data: str | Path, allow_other_data: bool = False) -> None:
    """Refuse to fit a prior on data the model cannot have been trained on: other voxel settings or
    elements the model does not know; another dataset hash unless `allow_other_data`.

    Raises:
        ValueError: naming the mismatch.
    """
    from crystalae.dataset import config_of, dataset_species, read_manifest

    if config_of(data) != loaded.voxel:
        raise ValueError(f"--data {data} was voxelized with {config_of(data)}, but the checkpoint with "
                         f"{loaded.voxel}: fit the prior on the model's own dataset")
    unknown = sorted(set(dataset_species(data)) - set(loaded.model_config.species))
    if unknown:
        raise ValueError(f"--data {data} holds elements the model does not know (Z = {unknown}): "
                         "fit the prior on the model's own dataset")
    found, trained = read_manifest(data)["dataset_hash"], loaded.meta.get("dataset_hash")
    if found != trained and not allow_other_data:
        raise ValueError(f"--data {data} (dataset {found[:12]}) is not the dataset the checkpoint was trained on "
                         f"({str(trained)[:12]}); pass --allow-other-data to fit on it anyway")


def with_latent_prior(source: str | Path, data: str | Path, out: str | Path, *, split: str = "train",
                      temperature: float | None = None, kind: str = "posterior",
                      allow_other_data: bool = False) -> dict[str, Any]:
    """Copy checkpoint `source` to `out` (without optimizer state) with a prior fitted on `data`,
    after `_check_prior_data`."""
    from crystalae.checkpoint import load_checkpoint

    loaded = load_checkpoint(source)
    _check_prior_data(loaded, data, allow_other_data)
    prior = fit_latent_prior(loaded, data, split, temperature=temperature, kind=kind)
    export_checkpoint(source, out, latent_prior=prior)
    return {"count": prior["count"], "split": split, "kind": kind, "temperature": prior["temperature"],
            "mean_norm": float(np.linalg.norm(prior["mean"].numpy())),
            "mean_std": float(prior["scale_tril"].pow(2).sum(1).sqrt().mean())}
