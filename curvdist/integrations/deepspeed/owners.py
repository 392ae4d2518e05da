"""Per-layer owners of the preconditioner across data-parallel ranks (KAISA's ``grad_worker_fraction``).

A block-diagonal metric M = blockdiag(M_p) (Kronecker blocks, EKFAC blocks, diagonals) gives the direction of each
parameter p from its own gradient alone: d_p = (M_p + δI)⁻¹ g_p. So no rank needs the full gradient. Each
parameter gets k = max(1, round(f · world)) *owners* (f: the ``grad_worker_fraction``, Pauloski et al. 2021,
"KAISA: an adaptive second-order optimizer framework for deep neural networks"):

* the primary owners are assigned by cost — n_out³ + n_in³ of the block's eigendecompositions, longest job first
  (:func:`~curvdist.problem.reducers.assign_by_cost`) — and the other k − 1 owners are the next ranks, cyclically;
* g_p is reduced to its owners only (``dist.reduce`` to the primary, then a broadcast inside the owner set; with
  k = world one ``all_reduce``), each owner computes d_p, and the primary broadcasts d_p to the ranks that are not
  owners;
* f = 1 (k = world): every rank preconditions everything ("communication-optimal"); f = 1/world: one owner per
  layer ("memory-optimal": each rank eigendecomposes and holds only its layers' blocks).

Parameters are handled one at a time, so a rank holds at most one parameter's gradient in full, never the model's.
Every rank builds the same plan from the same names, shapes and world size (deterministic), so the collectives
match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...errors import ConfigError
from ...problem.reducers import assign_by_cost
from .data_parallel import group_rank_and_size


def block_cost(shape: Sequence[int]) -> float:
    """The cost of a parameter's block: n_out³ + n_in³ (the eigendecompositions of its Kronecker factors) for a
    matrix-shaped parameter, n for a vector (a diagonal or a small dense factor)."""
    s = torch.Size(shape)
    if len(s) < 2:
        return float(s.numel())
    lead = s[0]
    return float(lead ** 3 + (s.numel() // max(lead, 1)) ** 3)


def owner_count(fraction: float, world: int) -> int:
    """k = max(1, round(f · world)), the number of owners of every parameter."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"grad_worker_fraction must lie in (0, 1], got {fraction!r}")
    return max(1, min(world, int(round(fraction * world))))


def owner_sets(names: Sequence[str], shapes: Sequence[Sequence[int]], world: int, k: int
               ) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """(primary owner, owner set) of every parameter: primaries by cost (longest job first onto the least loaded
    rank), then the next k − 1 ranks cyclically."""
    shares = assign_by_cost({n: block_cost(s) for n, s in zip(names, shapes)}, world)
    primary = {n: r for r, share in enumerate(shares) for n in share}
    return primary, {n: tuple(sorted((primary[n] + j) % world for j in range(k))) for n in names}


class Owners:
    """The owner plan of the parameters ``names`` (shapes ``shapes``) over ``group`` (see the module docstring).

    Args:
        names, shapes: the parameters, in the order of the flat vectors.
        group: the data-parallel process group (None: the default group).
        fraction: the grad_worker_fraction f ∈ (0, 1].
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], group: Any, fraction: float) -> None:
        self.group = group
        self.rank, self.world = group_rank_and_size(group)
        self.k = owner_count(fraction, self.world)
        self.fraction = float(fraction)
        self.primary, self.owners = owner_sets(names, shapes, self.world, self.k)
        self._groups: dict[tuple[int, ...], Any] = {}
        if 1 < self.k < self.world:  # every rank creates every owner subgroup, in the same order
            for ranks in sorted(set(self.owners.values())):
                self._groups[ranks] = dist.new_group([self._global(r) for r in ranks])

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def owns(self, name: str) -> bool:
        """Whether this rank computes ``name``'s direction."""
        return self.rank in self.owners[name]

    def is_primary(self, name: str) -> bool:
        return self.rank == self.primary[name]

    def owned(self, names: Sequence[str]) -> list[str]:
        """The names among ``names`` this rank owns, in order."""
        return [n for n in names if self.owns(n)]

    def to_owners(self, name: str, buf: Tensor, replicated: bool = False) -> None:
        """In place: at every owner of ``name``, ``buf`` becomes Σ_ranks buf (each rank's fragment of the gradient,
        zero elsewhere); with ``replicated`` every rank already holds the whole reduced gradient (ZeRO 0), and
        nothing moves. Elsewhere ``buf`` is left undefined."""
        if replicated or self.world == 1:
            return
        if self.k == self.world:
            dist.all_reduce(buf, group=self.group)
            return
        dist.reduce(buf, dst=self._global(self.primary[name]), group=self.group)
        if self.k > 1 and self.owns(name):
            ranks = self.owners[name]
            dist.broadcast(buf, src=self._global(self.primary[name]), group=self._groups[ranks])

    def from_owners(self, name: str, buf: Tensor) -> None:
        """In place: every rank receives the primary owner's ``buf`` (``name``'s direction); nothing moves when
        every rank is an owner."""
        if self.world == 1 or self.k == self.world:
            return
        dist.broadcast(buf, src=self._global(self.primary[name]), group=self.group)

    def describe(self) -> dict[str, Any]:
        """The plan as plain values: k, f, and each rank's owned parameters."""
        return {"owners_per_parameter": self.k, "grad_worker_fraction": self.fraction,
                "owned": {r: [n for n, o in self.owners.items() if r in o] for r in range(self.world)}}
