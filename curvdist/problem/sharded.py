"""A problem whose samples are split over shards (Ray actors, the ranks of a process group, or one shard here).

The coordinator (or every rank) holds the model and the parameters — shapes, dtype, the flat vector layout — but no
samples: every data pass is a statistic summed over the shards by a :class:`~curvdist.problem.reducers.ShardReducer`,

    L(θ) = s · Σ_shards Σ_{n∈shard} ℓ_n,   ∇L = s · Σ_shards Σ_{n∈shard} ∇ℓ_n,   C v = s · Σ_shards Σ_{n∈shard} C_n v,

with s = 1/N over all N samples of all shards (mean) or 1 (sum). Operators (:mod:`curvdist.operators.sharded`) and
metric statistics (:mod:`curvdist.geometry.metrics.statistics`) are written once against the reducer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..errors import ProblemError
from .base import BaseProblem, Params
from .losses import Loss
from .reducers import InProcessReducer, Shard, ShardReducer, SubsetReducer


def loss_sum(shard: Shard) -> float:
    """Σ_{n∈shard} ℓ_n."""
    return shard.problem.value()


def gradient_sum(shard: Shard) -> Tensor:
    """Σ_{n∈shard} ∇ℓ_n, flat."""
    p = shard.problem
    return p.flatten(p.gradient()).detach()


class ShardedProblem(BaseProblem):
    """The risk over samples split into shards, reduced by ``reducer``.

    Args:
        model: the model at the current parameters (the coordinator's or this rank's replica); ``params`` and
            ``reduction`` as for :class:`~curvdist.problem.problem.Problem`.
        loss: the loss name or object.
        reducer: where the shards live and how their statistics are summed.
    """

    def __init__(self, model: nn.Module, loss: str | Loss, reducer: ShardReducer,
                 params: Sequence[str] | None = None, reduction: str = "mean") -> None:
        super().__init__(model, loss, params, reduction)
        if not isinstance(reducer, ShardReducer):
            raise ProblemError(f"reducer must be a ShardReducer, got {type(reducer).__name__}")
        self.reducer = reducer
        self.num_samples, self.num_batches = reducer.counts()
        self.data = None

    @classmethod
    def in_process(cls, problem: Any) -> ShardedProblem:
        """One shard in this process: ``problem``'s samples, reduced as ``problem`` is (for tests and as the
        reference of the other reducers)."""
        from .problem import Problem

        local = Problem(problem.model, problem.loss, problem.data, params=list(problem.param_names),
                        reduction="sum")
        return cls(problem.model, problem.loss, InProcessReducer(local), list(problem.param_names),
                   problem.reduction)

    @property
    def backend(self) -> str:
        return self.reducer.label

    def backend_stats(self) -> dict[str, Any] | None:
        return self.reducer.stats()

    def memory_reset(self) -> None:
        super().memory_reset()
        self.reducer.memory_reset()

    def memory_records(self) -> list[dict[str, Any]]:
        """This (coordinating) process, with its replica of the model, then each worker."""
        own = super().memory_records()
        own[0]["role"] = "coordinator"
        return own + self.reducer.memory_records()

    def restricted(self, params: Sequence[str]) -> ShardedProblem:
        return ShardedProblem(self.model, self.loss, SubsetReducer(self.reducer, tuple(params)), list(params),
                              self.reduction)

    # ---------------------------------------------------------------- data passes, summed over the shards
    def batches(self, validate: bool = False) -> Any:
        raise ProblemError(f"the samples of this problem live on its shards ({self.backend}); use its operators, "
                           "metrics, value() and gradient()")

    def value(self, params: Params | None = None) -> float:
        if params is not None:
            raise ProblemError("a sharded problem is evaluated at its own parameters only (set_params moves them)")
        return self.scale * self.reducer.sum(loss_sum)

    def gradient(self, params: Params | None = None) -> Params:
        if params is not None:
            raise ProblemError("a sharded problem is evaluated at its own parameters only (set_params moves them)")
        return self.unflatten(self.reducer.sum(gradient_sum).to(self.device, self.dtype) * self.scale)

    def set_params(self, params: Params) -> None:
        """Move this process's and every shard's selected parameters to ``params`` (one broadcast)."""
        self.reducer.set_params(self.flatten(params).detach())  # first: a subset reducer refuses before any change
        super().set_params(params)

    def __repr__(self) -> str:
        return (f"ShardedProblem(model={type(self.model).__name__}, loss={self.loss.name}, dim={self.dim}, "
                f"N={self.num_samples}, shards={self.reducer.shards}, backend={self.backend!r})")


__all__ = ["ShardedProblem", "gradient_sum", "loss_sum"]
