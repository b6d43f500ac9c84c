"""Networks: `DensityVAE` (3-D conv VAE with a lattice head), and the two learned ways to give atoms
their species: `Segmenter` (3-D U-Net on the reconstructed density, the paper's) and `SiteHead` (an
MLP from the latent and an atom's fractional position).

Shapes: densities are (B, 1, N, N, N); the latent is (B, latent_dim); segmenter logits are
(B, n_classes, N, N, N), site logits (B, A, n_classes) for A query positions. Convolutions pad
circularly for the periodic `cell` grid, with zeros for `box`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from crystalae.config import MAX_Z, StrictConfig, VoxelConfig, grid_problem, in_range, set_by

__all__ = [
    "AttentionGate", "ConvBlock", "CrystalAE", "DensityVAE", "ModelConfig", "PAPER_PRESET", "Segmenter",
    "SiteHead", "model_config_for", "sample_periodic",
]


@dataclass(frozen=True)
class ModelConfig(StrictConfig):
    """Architecture of the VAE + segmenter pair; saved in every checkpoint."""

    # set from the dataset by `model_config_for`; the rest may be overridden or searched
    grid: int = set_by(32, "data")
    periodic: bool = set_by(True, "data")  # circular padding (cell representation)
    latent_dim: int = 128
    depth: int = 4  # down/up stages of the VAE; grid must be divisible by 2**depth
    base_width: int = 32  # channels after the first stage, doubling per stage
    max_width: int = 256
    norm: bool = True  # GroupNorm in every block (the paper used none)
    residual: bool = True  # a residual conv block after each stage
    seg_depth: int = 2
    seg_width: int = 16
    attention: bool = False  # attention gates on U-Net skips, as the paper
    # the segmenter also reads the decoder's last feature map (as the site head does with site_features),
    # not the reconstructed density alone as the paper's: one density peak height cannot tell Z from Z + 1
    seg_features: bool = False
    n_classes: int = set_by(2, "data")  # background + elements in `species`
    species: tuple[int, ...] = set_by((6,), "data")  # atomic number of class i + 1
    lattice_head: bool = set_by(True, "data")  # predict (a, b, c, alpha, beta, gamma) from the latent
    # How decoded atoms get their species: "site" = SiteHead(latent, position); "segmenter" = U-Net on
    # the reconstructed density (the paper); "density" = fitted peak weight, restricted to `species`.
    species_from: Literal["site", "segmenter", "density"] = "site"
    site_width: int = 256  # hidden width of the site head
    fourier_order: int = 4  # periodic features sin/cos(2 pi k f), k = 1..order, per fractional axis
    # the site head also reads the decoder's last feature map at the atom (periodic trilinear sample)
    site_features: bool = True
    # predict the number of atoms (1..max_atoms) from the latent; decoding then reads exactly that many
    # atoms from the density, which separates peaks a blurred reconstruction has merged (carbon_24)
    count_head: bool = False
    max_atoms: int = set_by(64, "data")

    def problems(self) -> list[str | None]:
        bounds = {"latent_dim": 4096, "depth": 7, "base_width": 1024, "max_width": 2048, "seg_depth": 7,
                  "seg_width": 512, "site_width": 4096, "fourier_order": 32, "n_classes": MAX_Z + 1,
                  "max_atoms": 1024}
        problems = [grid_problem(self.grid), *(in_range(self, k, 1, high) for k, high in bounds.items())]
        if any(problems):
            return problems
        if self.grid % (2**self.depth) != 0:
            problems.append(f"grid {self.grid} must be divisible by 2**depth = {2**self.depth}")
        if self.grid % (2**self.seg_depth) != 0:
            problems.append(f"grid {self.grid} must be divisible by 2**seg_depth = {2**self.seg_depth}")
        if self.n_classes != len(self.species) + 1:
            problems.append(f"n_classes {self.n_classes} must be len(species) + 1 = {len(self.species) + 1}")
        if not all(1 <= z <= MAX_Z for z in self.species):
            problems.append(f"species must be atomic numbers in 1..{MAX_Z}, got {list(self.species)}")
        if self.species_from == "site" and not self.periodic:
            problems.append("species_from='site' reads fractional positions: it needs the periodic cell grid")
        if self.count_head and not self.periodic:
            problems.append("count_head reads atoms from a periodic cell grid: it needs the cell representation")
        return problems

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["species"] = list(self.species)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        if "species" in data:
            data["species"] = tuple(int(z) for z in data["species"])  # JSON gives a list
        return super().from_dict(data)


PAPER_PRESET = {  # Hoffmann et al.: 5 conv layers 16 -> 256 channels, dense layer, latent 300, trilinear up
    "latent_dim": 300, "depth": 5, "base_width": 16, "max_width": 256, "norm": False, "residual": False,
    "attention": True, "species_from": "segmenter",
}


def _conv(c_in: int, c_out: int, periodic: bool, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, padding_mode="circular" if periodic else "zeros")


def _norm(channels: int, enabled: bool) -> nn.Module:
    # up to 8 groups that divide the channels, so any width works (12 channels: 4 groups of 3)
    return nn.GroupNorm(math.gcd(8, channels), channels) if enabled else nn.Identity()


class ConvBlock(nn.Module):
    """conv -> norm -> SiLU, optionally followed by a residual conv pair."""

    def __init__(self, c_in: int, c_out: int, periodic: bool, norm: bool, residual: bool, stride: int = 1):
        super().__init__()
        self.main = nn.Sequential(_conv(c_in, c_out, periodic, stride), _norm(c_out, norm), nn.SiLU())
        self.residual = (nn.Sequential(_conv(c_out, c_out, periodic), _norm(c_out, norm), nn.SiLU(),
                                       _conv(c_out, c_out, periodic), _norm(c_out, norm))
                         if residual else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.main(x)
        return F.silu(x + self.residual(x)) if self.residual is not None else x


def _widths(config: ModelConfig) -> list[int]:
    return [min(config.base_width * 2**i, config.max_width) for i in range(config.depth)]


class DensityVAE(nn.Module):
    """3-D conv encoder -> (mu, logvar) -> 3-D conv decoder with trilinear upsampling."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        widths = _widths(config)
        c = config
        self.encoder = nn.Sequential(*[
            ConvBlock(1 if i == 0 else widths[i - 1], widths[i], c.periodic, c.norm, c.residual, stride=2)
            for i in range(c.depth)])
        self.bottom = c.grid // 2**c.depth
        flat = widths[-1] * self.bottom**3
        self.to_stats = nn.Linear(flat, 2 * c.latent_dim)
        self.from_latent = nn.Linear(c.latent_dim, flat)
        self.decoder = nn.ModuleList([
            ConvBlock(widths[i], widths[i - 1] if i > 0 else widths[0], c.periodic, c.norm, c.residual)
            for i in reversed(range(c.depth))])
        self.out = _conv(widths[0], 1, c.periodic)
        self.lattice = (nn.Sequential(nn.Linear(c.latent_dim, 128), nn.SiLU(), nn.Linear(128, 6))
                        if c.lattice_head else None)
        self.count = (nn.Sequential(nn.Linear(c.latent_dim, 128), nn.SiLU(), nn.Linear(128, c.max_atoms))
                      if c.count_head else None)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)  # (B, C * b^3)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_features(z)[0]  # (B, 1, N, N, N)

    def decode_features(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(density (B, 1, N, N, N), last decoder features (B, widths[0], N, N, N))."""
        widths = _widths(self.config)
        h = self.from_latent(z).view(len(z), widths[-1], self.bottom, self.bottom, self.bottom)
        for block in self.decoder:
            h = block(F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False))
        return self.out(h), h

    def lattice_params(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 6) normalised lattice: lengths / 10 Å, angles / 90 degrees."""
        if self.lattice is None:
            raise RuntimeError("this model has no lattice head (box representation)")
        return self.lattice(z)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        recon, features = self.decode_features(z)
        out = {"recon": recon, "mu": mu, "logvar": logvar, "z": z, "features": features}
        if self.lattice is not None:
            out["lattice"] = self.lattice(z)
        if self.count is not None:
            out["count_logits"] = self.count(z)  # class k = k + 1 atoms
        return out


class AttentionGate(nn.Module):
    """Additive attention on a U-Net skip (Oktay et al. 2018), as in the paper's segmenter."""

    def __init__(self, skip: int, gate: int, inner: int):
        super().__init__()
        self.skip = nn.Conv3d(skip, inner, 1)
        self.gate = nn.Conv3d(gate, inner, 1)
        self.psi = nn.Conv3d(inner, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * torch.sigmoid(self.psi(F.silu(self.skip(skip) + self.gate(gate))))


class Segmenter(nn.Module):
    """3-D U-Net: density (B, 1, N, N, N) -> species logits (B, n_classes, N, N, N)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        widths = [c.seg_width * 2**i for i in range(c.seg_depth + 1)]
        inputs = 1 + (_widths(c)[0] if c.seg_features else 0)
        self.down = nn.ModuleList([ConvBlock(inputs, widths[0], c.periodic, c.norm, False)] + [
            ConvBlock(widths[i], widths[i + 1], c.periodic, c.norm, False, stride=2) for i in range(c.seg_depth)])
        self.up = nn.ModuleList([ConvBlock(widths[i + 1] + widths[i], widths[i], c.periodic, c.norm, False)
                                 for i in reversed(range(c.seg_depth))])
        self.gates = (nn.ModuleList([AttentionGate(widths[i], widths[i + 1], widths[i])
                                     for i in reversed(range(c.seg_depth))]) if c.attention else None)
        self.head = nn.Conv3d(widths[0], c.n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the density (B, 1, N, N, N), with `seg_features` followed by the decoder's features."""
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for k, block in enumerate(self.up):
            skip = skips.pop()
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            if self.gates is not None:
                skip = self.gates[k](skip, x)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def periodic_features(frac: torch.Tensor, order: int) -> torch.Tensor:
    """(..., 3) fractional coordinates -> (..., 6 * order) sin/cos features, periodic in each axis."""
    k = torch.arange(1, order + 1, dtype=frac.dtype, device=frac.device)
    angle = 2 * torch.pi * frac[..., None] * k
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).flatten(-2)


def sample_periodic(grid: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Trilinear, periodic sample of a (B, C, N, N, N) grid (voxel i at fraction i / N) at fractional
    positions (B, A, 3) -> (B, A, C)."""
    b, c, n = grid.shape[:3]
    p = torch.remainder(frac, 1.0) * n
    low = torch.floor(p)
    w = p - low
    low = low.long()
    flat = grid.reshape(b, c, n**3)
    out = torch.zeros(b, frac.shape[1], c, dtype=grid.dtype, device=grid.device)
    for corner in range(8):
        bits = [(corner >> k) & 1 for k in range(3)]
        idx = [(low[..., k] + bits[k]) % n for k in range(3)]
        weight = torch.ones_like(w[..., 0])
        for k in range(3):
            weight = weight * (w[..., k] if bits[k] else 1 - w[..., k])
        index = ((idx[0] * n + idx[1]) * n + idx[2])[:, None, :].expand(-1, c, -1)
        out = out + torch.gather(flat, 2, index).transpose(1, 2) * weight[..., None]
    return out


class SiteHead(nn.Module):
    """Species logits (class 0 = no atom here) of query positions, from the latent of their crystal
    and, with `site_features`, the decoder's features sampled at each position. A last output regresses
    Z / 10, which trains the features to carry the atomic number as one smooth quantity."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.order = config.fourier_order
        width = config.site_width
        extra = _widths(config)[0] if config.site_features else 0
        self.net = nn.Sequential(nn.Linear(config.latent_dim + 6 * self.order + extra, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, config.n_classes + 1))

    def forward(self, z: torch.Tensor, frac: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, latent_dim), frac (B, A, 3), features (B, C, N, N, N) -> (B, A, n_classes + 1):
        class logits, then the Z / 10 estimate."""
        parts = [z[:, None, :].expand(-1, frac.shape[1], -1), periodic_features(frac, self.order)]
        if features is not None:
            parts.append(sample_periodic(features, frac))
        return self.net(torch.cat(parts, dim=-1))


class CrystalAE(nn.Module):
    """What is trained together: the VAE for the density and lattice, plus the species reader its
    config names (`segmenter`, `site_head`, or nothing when species come from peak weights)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vae = DensityVAE(config)
        self.segmenter = Segmenter(config) if config.species_from == "segmenter" else None
        self.site_head = SiteHead(config) if config.species_from == "site" else None
        self.vae_frozen = False

    def segmenter_input(self, recon: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """What the segmenter reads: the reconstructed density, and with `seg_features` the decoder's features."""
        return torch.cat([recon, features], dim=1) if self.config.seg_features else recon

    def freeze_vae(self) -> CrystalAE:
        """Fix the VAE's weights (no gradients, always in eval mode): only the species reader learns."""
        self.vae.requires_grad_(False)
        self.vae_frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> CrystalAE:
        super().train(mode)
        if self.vae_frozen:
            self.vae.eval()
        return self

    def forward(self, x: torch.Tensor, sites: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`sites` (B, A, 3) fractional query positions for the site head (teacher forcing)."""
        out = self.vae(x)
        if self.segmenter is not None:
            # The segmenter learns from the VAE's output, as at generation time; it does not steer the VAE.
            out["species_logits"] = self.segmenter(self.segmenter_input(out["recon"], out["features"]).detach())
        if self.site_head is not None and sites is not None:
            features = out["features"] if self.config.site_features else None
            head = self.site_head(out["z"], sites, features)
            out["site_logits"], out["site_z"] = head[..., :-1], head[..., -1]
        return out


def model_config_for(voxel: VoxelConfig, species: tuple[int, ...], **overrides) -> ModelConfig:
    """ModelConfig matching a dataset: grid, periodicity, classes and lattice head follow the data."""
    if voxel.representation != "cell":
        overrides.setdefault("species_from", "segmenter")  # the site head reads fractional positions
    return ModelConfig(**{**overrides, "grid": voxel.grid, "periodic": voxel.representation == "cell",
                          "species": tuple(species), "n_classes": len(species) + 1, "max_atoms": voxel.max_atoms,
                          "lattice_head": voxel.representation == "cell"})
