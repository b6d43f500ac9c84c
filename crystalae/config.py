"""Voxelization settings: one frozen dataclass, stored in every shard manifest and checkpoint."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal

Representation = Literal["cell", "box"]
BoxMode = Literal["unit_cell", "lattice"]
Reduction = Literal["niggli", "lll", "none"]


class StrictConfig:
    """`as_dict` / strict `from_dict` for the frozen config dataclasses (unknown keys raise)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Strict: unknown keys raise, so a typo never silently falls back to a default."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class VoxelConfig(StrictConfig):
    """How a crystal becomes a density grid.

    `cell` grids the unit cell in fractional coordinates (periodic, lattice kept alongside): the
    representation that makes exact recovery possible. `box` is the paper's fixed Cartesian cube.
    """

    representation: Representation = "cell"
    grid: int = 32  # voxels per edge
    # Å. The paper used 1.0 in a 10 Å box; 0.5 keeps C-C bonds (1.4 Å = 2.8 sigma) as separate peaks.
    sigma: float = 0.5
    element_sigma: bool = False  # scale sigma by the element's atomic radius relative to carbon's
    box_size: float = 10.0  # Å, edge of the `box` cube
    box_mode: BoxMode = "unit_cell"  # one centred unit cell, or the repeating lattice filling the box
    rotations: int = 0  # random rotations per crystal (box only); 0 keeps the crystal unrotated
    label_radius: float = 0.65  # Å, voxels this close to an atom carry its atomic number (paper)
    cutoff_sigmas: float = 5.0  # Gaussians are summed out to this many sigma (exp(-12.5) ~ 4e-6)
    reduce: Reduction = "niggli"  # cell reduction applied before voxelizing
    seed: int = 0  # rotations are drawn from (seed, material_id, rotation index)
    # Crystals with more atoms are rejected (with the reason): bounds decode memory, and the stored
    # per-atom table (`sites`: fractional position + Z, zero-padded) has this fixed length.
    max_atoms: int = 64

    def __post_init__(self) -> None:
        problems = []
        if self.grid < 4:
            problems.append(f"grid must be >= 4, got {self.grid}")
        if not self.sigma > 0:
            problems.append(f"sigma must be > 0 Å, got {self.sigma}")
        if not self.box_size > 0:
            problems.append(f"box_size must be > 0 Å, got {self.box_size}")
        if self.rotations < 0:
            problems.append(f"rotations must be >= 0, got {self.rotations}")
        if not self.label_radius > 0:
            problems.append(f"label_radius must be > 0 Å, got {self.label_radius}")
        if not 1 <= self.max_atoms <= 4096:
            problems.append(f"max_atoms must be in 1..4096, got {self.max_atoms}")
        if self.cutoff_sigmas < 2:
            problems.append(f"cutoff_sigmas must be >= 2, got {self.cutoff_sigmas}")
        for f in fields(self):
            allowed = typing.get_args(_hint(f.name))
            if allowed and getattr(self, f.name) not in allowed:
                problems.append(f"{f.name} must be one of {allowed}, got {getattr(self, f.name)!r}")
        if problems:
            raise ValueError("invalid VoxelConfig: " + "; ".join(problems))



def _hint(name: str) -> Any:
    return typing.get_type_hints(VoxelConfig)[name]


def field_choices(name: str) -> tuple[Any, ...]:
    """Allowed values of a Literal-typed field (empty for free-valued fields)."""
    return typing.get_args(_hint(name))
