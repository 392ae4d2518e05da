"""The curvature operator of a :class:`~curvdist.problem.sharded.ShardedProblem`:

    C v = s · Σ_shards Σ_{n∈shard} C_n v,

each shard applying its own sum-reduced operator of the same kind (:func:`matvec_sum`, :func:`matmat_sum`) and the
problem's reducer adding the partial products in shard order — one implementation for every place the shards live.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..problem.base import Params
from ..problem.reducers import Shard
from ..problem.sharded import ShardedProblem
from .base import CurvatureOperator


def matvec_sum(shard: Shard, kind: str, options: dict[str, Any], v: Tensor) -> Tensor:
    """Σ_{n∈shard} C_n v for a flat v."""
    p = shard.problem
    v = v.to(p.device, p.dtype)
    return p.flatten(shard.operator(kind, options).matvec_params(p.unflatten(v)))


def matmat_sum(shard: Shard, kind: str, options: dict[str, Any], V: Tensor) -> Tensor:
    """Σ_{n∈shard} C_n V for V of shape (k, d)."""
    p = shard.problem
    V = V.to(p.device, p.dtype)
    k = V.shape[0]
    parts = shard.operator(kind, options).matmat_params(
        tuple(t.reshape(k, *s) for t, s in zip(torch.split(V, [s.numel() for s in p.shapes], 1), p.shapes)))
    return torch.cat([t.reshape(k, -1) for t in parts], 1)


class ShardedOperator(CurvatureOperator):
    """C v = s · Σ_shards (the shard's sum-reduced product), summed by the problem's reducer."""

    def __init__(self, problem: ShardedProblem, kind: str, check_determinism: bool = True, **options: Any) -> None:
        self.kind = kind
        self.options = dict(options)
        self.backend = problem.backend
        super().__init__(problem, check_determinism)

    def batch_matvec(self, params: Params, v: Params, X: Tensor, y: Tensor, ctx: Any) -> Params:
        raise NotImplementedError  # products are assembled from the shards

    def matvec_params(self, v: Params) -> Params:
        p = self.problem
        total = p.reducer.sum(matvec_sum, self.kind, self.options, p.flatten(v).detach())
        return p.unflatten(total.to(p.device, p.dtype) * p.scale)

    def matmat_params(self, V: Params) -> Params:
        p = self.problem
        k = V[0].shape[0]
        flat = torch.cat([t.reshape(k, -1) for t in V], 1).detach()
        total = p.reducer.sum(matmat_sum, self.kind, self.options, flat).to(p.device, p.dtype) * p.scale
        return tuple(t.reshape(k, *s) for t, s in zip(torch.split(total, [s.numel() for s in p.shapes], 1), p.shapes))
