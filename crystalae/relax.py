"""Relax decoded crystals with a universal interatomic potential (CHGNet), cell and positions.

Decoded positions are good to ~0.1-0.2 Å: enough for StructureMatcher, not for the local geometry
that CDVAE's coverage fingerprints (CrystalNN) read. Adding 0.1 Å of noise to real carbon_24 crystals
moves their fingerprints 0.30 from the originals (median), beyond the 0.2 cutoff; 0.02 Å moves them
0.03. A short relaxation brings a decoded crystal to the nearest local minimum of the potential: on 12
carbon_24 test reconstructions, the median fingerprint distance to the original fell from 0.60 to
0.02 (CHGNet, 100 FIRE steps, fmax 0.1 eV/Å).

Two paths do the same relaxation: ASE's FIRE on a `FrechetCellFilter` (cell and positions), stopped
when every row of the filter's gradient (the atom forces, and the cell's: the virial along the log of
the cell's deformation, over the atom count) is below `fmax`, or after `steps` steps.
- "batched" (the default): FIRE re-implemented with its state per crystal (velocities, time step,
  mixing, steps since an uphill move), so `batch` crystals move together in one CHGNet call per step;
  a crystal leaves the batch when it converges and the next one takes its place. Forces and stress
  come from one backward pass without a double-backward graph (CHGNet's own predictor makes two, and
  keeps the graph for training): that, not the batching, is the gain on a CPU, where the potential is
  compute-bound and a bigger batch costs more per crystal (so the default batch is 1; a GPU wants many).
  Graphs are rebuilt every step (~12% of the time, measured by the bench).
- "one-by-one": CHGNet's `StructOptimizer` per crystal, as before (kept for comparison).
`bench/relax_batched.py` measures both on the same crystals ([results](../docs/results.md)).

CHGNet (`pip install 'crystalae[relax]'`) ships its weights in its wheel, so this works offline.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from pymatgen.core import Lattice, Structure

from crystalae.extras import available, require
from crystalae.parallel import default_workers, map_chunks

__all__ = ["relax", "relax_available"]

METHODS = ("batched", "one-by-one")
# ASE FIRE's defaults (ase.optimize.FIRE), which StructOptimizer uses: the batched path moves the same way
FIRE_DT, FIRE_DTMAX, FIRE_NMIN, FIRE_FINC, FIRE_FDEC, FIRE_ASTART, FIRE_FA, FIRE_MAXSTEP = 0.1, 1.0, 5, 1.1, 0.5, 0.1, 0.99, 0.2


def relax_available() -> bool:
    return available("chgnet")


@lru_cache(maxsize=1)
def _optimizer():
    import torch
    from chgnet.model import StructOptimizer

    torch.set_num_threads(1)  # one process per core (map_chunks); threads would only contend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StructOptimizer(use_device="cpu")


@lru_cache(maxsize=1)
def _model():
    import torch
    from chgnet.model import CHGNet

    torch.set_num_threads(1)  # as _optimizer: one process per core
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CHGNet.load(verbose=False, use_device="cpu")
    model.graph_converter.set_isolated_atom_response("ignore")  # StructOptimizer's calculator relaxes those too
    return model.eval()


def _cell_gradient(forces: np.ndarray, stress: np.ndarray, deform: np.ndarray, log_deform: np.ndarray,
                   volume: float) -> np.ndarray:
    """The (n + 3, 3) forces on a FrechetCellFilter's degrees of freedom (ASE's get_forces_frechet):
    atom forces in the undeformed frame, then the virial's derivative along log(deformation) over n.
    `stress` is the 3x3 Cauchy stress in eV/Å³ (ASE's sign)."""
    from scipy.linalg import expm

    n = len(forces)
    cell_grad = -volume * stress @ np.linalg.inv(deform.T)
    # d expm(A)/dA along each unit direction E: the upper-right block of expm([[A, E], [0, A]]), all
    # nine in one stacked call (the same numbers as scipy's expm_frechet, nine calls)
    blocks = np.zeros((9, 6, 6))
    blocks[:, :3, :3] = blocks[:, 3:, 3:] = log_deform
    blocks[np.arange(9), np.arange(9) // 3, 3 + np.arange(9) % 3] = 1.0
    derivatives = expm(blocks)[:, :3, 3:]
    log_force = np.einsum("kij,ij->k", derivatives, cell_grad).reshape(3, 3)
    return np.concatenate([forces @ deform, log_force / n])


def _converged(gradient: np.ndarray, fmax: float) -> bool:
    """ASE's rule: every row (an atom's force, a cell row) shorter than fmax."""
    return bool(np.linalg.norm(gradient, axis=1).max() < fmax)


# --- one by one: CHGNet's StructOptimizer (ASE FIRE + FrechetCellFilter), one process per core -------------

def _relax_one(structure: Structure, steps: int, fmax: float) -> dict[str, Any]:
    result = _optimizer().relax(structure, fmax=fmax, steps=steps, relax_cell=True, verbose=False)
    trajectory = result["trajectory"]
    n = len(structure)
    taken = len(trajectory.energies) - 2  # observed at the start, after every step and once more at the end
    converged = taken < steps  # FIRE stops early only when converged; at the last step, ask the criterion
    if not converged:
        from ase.stress import voigt_6_to_full_3x3_stress
        from scipy.linalg import logm

        cell, first = np.asarray(trajectory.cells[-1]), np.asarray(trajectory.cells[0])
        deform = np.linalg.solve(first, cell).T
        gradient = _cell_gradient(trajectory.forces[-1], voigt_6_to_full_3x3_stress(trajectory.stresses[-1]),
                                  deform, np.real(logm(deform)), abs(np.linalg.det(cell)))
        converged = _converged(gradient, fmax)
    return {"structure": result["final_structure"], "energy": float(trajectory.energies[-1]) / n,
            "initial_energy": float(trajectory.energies[0]) / n, "steps": taken, "converged": converged}


def _relax_chunk(args: tuple[list[Structure | None], int, float]) -> list[dict[str, Any] | None]:
    structures, steps, fmax = args
    out: list[dict[str, Any] | None] = []
    for structure in structures:
        if structure is None:
            out.append(None)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(_relax_one(structure, steps, fmax))
        except Exception:  # noqa: BLE001  (a crystal the potential cannot handle stays as decoded)
            out.append({"structure": structure, "failed": True})
    return out


# --- batched: one CHGNet call per step for every crystal still relaxing -----------------------------------

@dataclass
class _State:
    """One crystal's relaxation: the FrechetCellFilter's degrees of freedom and FIRE's own state."""

    index: int
    species: list
    cell0: np.ndarray  # the starting cell (rows are lattice vectors); the deformation is relative to it
    x: np.ndarray  # (n + 3, 3): positions in the starting cell's frame, then n * log(deformation)
    velocity: np.ndarray | None = None
    dt: float = FIRE_DT
    alpha: float = FIRE_ASTART
    downhill: int = 0  # FIRE's N: steps since the power F·v last turned negative
    steps: int = 0
    initial_energy: float | None = None
    deform: np.ndarray = field(default_factory=lambda: np.eye(3))
    answer: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, index: int, structure: Structure) -> _State:
        x = np.concatenate([structure.cart_coords, np.zeros((3, 3))])  # undeformed: log(1) = 0
        return cls(index, list(structure.species), structure.lattice.matrix.copy(), x)

    @property
    def n(self) -> int:
        return len(self.species)

    def structure(self) -> Structure:
        """The crystal at the current degrees of freedom (FrechetCellFilter.set_positions)."""
        from scipy.linalg import expm

        self.deform = expm(self.x[self.n:] / self.n)
        cell = self.cell0 @ self.deform.T
        return Structure(Lattice(cell), self.species, self.x[: self.n] @ self.deform.T, coords_are_cartesian=True)

    def gradient(self) -> np.ndarray:
        """Forces on the degrees of freedom from the last answer of the potential."""
        volume = abs(np.linalg.det(self.cell0 @ self.deform.T))
        return _cell_gradient(self.answer["forces"], self.answer["stress"], self.deform, self.x[self.n:] / self.n,
                              volume)

    def fire_step(self, force: np.ndarray) -> None:
        """One step of ASE's FIRE (ase.optimize.FIRE.step) over all of this crystal's degrees of freedom."""
        if self.velocity is None:
            self.velocity = np.zeros_like(self.x)
        elif np.vdot(force, self.velocity) > 0.0:
            self.velocity = (1.0 - self.alpha) * self.velocity + self.alpha * force / np.sqrt(
                np.vdot(force, force)) * np.sqrt(np.vdot(self.velocity, self.velocity))
            if self.downhill > FIRE_NMIN:
                self.dt = min(self.dt * FIRE_FINC, FIRE_DTMAX)
                self.alpha *= FIRE_FA
            self.downhill += 1
        else:  # uphill: stop, restart gently
            self.velocity = np.zeros_like(self.x)
            self.alpha, self.dt, self.downhill = FIRE_ASTART, self.dt * FIRE_FDEC, 0
        self.velocity = self.velocity + self.dt * force
        move = self.dt * self.velocity
        norm = np.sqrt(np.vdot(move, move))
        if norm > FIRE_MAXSTEP:  # ASE caps the whole step (atoms and cell together), not each atom
            move = FIRE_MAXSTEP * move / norm
        self.x = self.x + move
        self.steps += 1

    def result(self, converged: bool) -> dict[str, Any]:
        structure = self.structure()
        structure.add_site_property("magmom", [float(m) for m in self.answer["magmoms"]])  # as StructOptimizer
        return {"structure": structure, "energy": self.answer["energy"], "initial_energy": self.initial_energy,
                "steps": self.steps, "converged": converged}


def _potential(structures: list[Structure], timing: dict[str, float]) -> list[dict[str, Any]]:
    """Energy per atom, forces, stress (eV/Å³) and magnetic moments of every crystal: one CHGNet forward
    over the batch and one backward to the fractional coordinates and the lattices."""
    import torch

    model = _model()
    started = time.perf_counter()
    graphs = [model.graph_converter(s) for s in structures]
    timing["graphs"] += time.perf_counter() - started
    fractional = [g.atom_frac_coord.detach().requires_grad_(True) for g in graphs]
    lattices = [g.lattice.detach().requires_grad_(True) for g in graphs]
    for graph, frac, lattice in zip(graphs, fractional, lattices):
        graph.atom_frac_coord, graph.lattice = frac, lattice
    out = model(graphs, task="em")  # energies per atom (CHGNet is intensive) and magnetic moments
    grads = torch.autograd.grad((out["e"] * out["atoms_per_graph"]).sum(), fractional + lattices)
    timing["potential"] += time.perf_counter() - started
    timing["calls"] += 1
    answers = []
    for i, lattice in enumerate(lattices):
        matrix = lattice.detach().double().numpy()
        d_frac, d_lattice = grads[i].double().numpy(), grads[len(graphs) + i].double().numpy()
        # Cartesian = fractional @ lattice, so dE/dcart = dE/dfrac @ inv(lattice)ᵀ; a strain ε takes the
        # lattice to lattice @ (1 + ε) at fixed fractional coordinates, so dE/dε = latticeᵀ @ dE/dlattice
        virial = matrix.T @ d_lattice
        answers.append({"energy": float(out["e"][i]), "forces": -d_frac @ np.linalg.inv(matrix).T,
                        "stress": (virial + virial.T) / 2 / abs(np.linalg.det(matrix)),  # symmetric, as ASE's
                        "magmoms": out["m"][i].detach().numpy()})
    return answers


def _evaluate(states: list[_State], timing: dict[str, float]) -> list[_State]:
    """Give each state the potential's answer at its geometry; returns the states it could not answer
    (an error, a non-finite number)."""
    try:
        answers = _potential([s.structure() for s in states], timing)
    except Exception:  # noqa: BLE001  (find the crystal that broke the batch; the others go on)
        return states if len(states) == 1 else [f for s in states for f in _evaluate([s], timing)]
    failed = []
    for state, answer in zip(states, answers):
        if all(np.isfinite(answer[k]).all() for k in ("energy", "forces", "stress")):
            state.answer = answer
        else:
            failed.append(state)
    return failed


def _relax_batched_chunk(args: tuple[list[Structure | None], int, float, int]) -> tuple[list[dict | None], dict]:
    """Relax every crystal of the chunk, at most `batch` at a time in one CHGNet call per step: a
    crystal leaves when it converges or runs out of steps, and the next waiting one takes its place."""
    structures, steps, fmax, batch = args
    timing = {"graphs": 0.0, "potential": 0.0, "calls": 0}
    out: list[dict[str, Any] | None] = [None] * len(structures)
    waiting = [(i, s) for i, s in enumerate(structures) if s is not None][::-1]
    active: list[_State] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while waiting or active:
            while waiting and len(active) < batch:
                active.append(_State.start(*waiting.pop()))
            for state in _evaluate(active, timing):
                out[state.index] = {"structure": structures[state.index], "failed": True}
                active.remove(state)
            still = []
            for state in active:
                if state.initial_energy is None:
                    state.initial_energy = state.answer["energy"]
                gradient = state.gradient()
                converged = _converged(gradient, fmax)
                if converged or state.steps >= steps:
                    out[state.index] = state.result(converged)
                else:
                    state.fire_step(gradient)
                    still.append(state)
            active = still
    return out, timing


def relax(structures: list[Structure | None], *, steps: int = 100, fmax: float = 0.1, workers: int | None = None,
          chunk: int = 4, method: str = "batched", batch: int = 1) -> tuple[list[Structure | None], dict[str, Any]]:
    """Each crystal relaxed (cell and positions, at most `steps` FIRE steps, to forces below `fmax`
    eV/Å), `chunk` crystals per task in worker processes; a crystal that fails to relax stays as it
    was. `method` "batched" relaxes up to `batch` crystals of a task in one potential call per step
    (on this CPU one at a time is cheapest: a bigger batch's tensors outgrow the cache;
    bench/relax_batched.py); "one-by-one" runs CHGNet's StructOptimizer per crystal. Returns the
    crystals and a record: potential, method, steps, fmax, how many relaxed, failed and converged,
    seconds, and `per_crystal` lists (None where there was no crystal or it failed): final and starting
    energy (eV/atom), steps taken, converged."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    require("chgnet", "relax", "relaxing crystals")
    import chgnet

    workers = default_workers() if workers is None else workers
    started = time.perf_counter()
    timing: dict[str, float] = {}
    # the same tasks for both methods (`chunk` crystals each, handed to whichever worker is free)
    parts = [structures[i : i + chunk] for i in range(0, len(structures), chunk)]
    sizes = [len(p) for p in parts]
    if method == "batched":
        results: list[dict[str, Any] | None] = []
        for part_results, part_timing in map_chunks(_relax_batched_chunk, [(p, steps, fmax, batch) for p in parts],
                                                    workers, "relax", sizes):
            results += part_results
            for key, value in part_timing.items():  # seconds in graphs / in the potential, calls: all tasks
                timing[key] = timing.get(key, 0) + value
    else:
        results = [r for part in map_chunks(_relax_chunk, [(p, steps, fmax) for p in parts], workers, "relax", sizes)
                   for r in part]
    ok = [r is not None and not r.get("failed") for r in results]
    each = {name: [r[key] if good else None for r, good in zip(results, ok)] for name, key in
            (("energy_per_atom", "energy"), ("initial_energy_per_atom", "initial_energy"), ("steps", "steps"),
             ("converged", "converged"))}
    record = {"potential": f"CHGNet {chgnet.__version__}", "method": method, "steps": steps, "fmax": fmax,
              "relaxed": sum(ok), "failed": sum(r is not None and bool(r.get("failed")) for r in results),
              "converged": sum(bool(c) for c in each["converged"]), "seconds": round(time.perf_counter() - started, 2),
              **({"seconds_in": {k: round(v, 2) for k, v in timing.items()}} if timing else {}),
              "per_crystal": each}
    return [r["structure"] if r is not None else None for r in results], record
