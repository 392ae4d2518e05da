"""Data parallelism over a ``torch.distributed`` process group (the DeepSpeed engine's data-parallel group).

Every rank holds a replica of the model and one disjoint shard of a batch. The risk over the whole batch is

    L(θ) = s · Σ_ranks Σ_{n in shard} ℓ_n,      s = 1/N (mean over all N samples of all shards) or 1 (sum),

so a curvature product is C v = s · all_reduce_sum(Σ_{n in shard} C_n v): each rank applies its shard's
sum-reduced operator and one ``all_reduce`` adds the partial products. All ranks then hold the same product and
run the same solver with the same seeds, so every rank computes the same numbers — no coordinator, and no second
communication stack next to DeepSpeed's.

This mirrors the Ray data mode (:mod:`curvdist.distributed.data_parallel`): :class:`ProcessGroupProblem` plays
the part of ``RemoteProblem`` (including the hooks through which ``cd.metric`` reduces BackPACK diagonals and
Kronecker statistics over the shards) and :class:`AllReduceOperator` that of ``DataParallelOperator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...errors import DataError, ProblemError
from ...geometry.metrics.base import DiagonalMetric
from ...geometry.metrics.kfac import KFACMetric, kfac_from_sums, kfac_sums
from ...operators import operator
from ...operators.base import CurvatureOperator
from ...problem.data import unpack
from ...problem.losses import Loss
from ...problem.problem import Params, Problem


def group_rank_and_size(group: Any = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size (``None``: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ProblemError("torch.distributed is not initialized (deepspeed.initialize or "
                           "deepspeed.init_distributed does that)")
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum(t: Tensor, group: Any = None) -> Tensor:
    """Sum ``t`` over the ranks of ``group`` in place and return it."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def shard(X: Tensor, y: Tensor, rank: int, size: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s contiguous share of the samples (shares differ in size by at most one)."""
    if X.shape[0] != y.shape[0]:
        raise DataError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
    if X.shape[0] < size:
        raise DataError(f"a batch of {X.shape[0]} samples cannot be split over {size} data-parallel ranks; hold at "
                        f"least one sample per rank")
    idx = torch.tensor_split(torch.arange(X.shape[0]), size)[rank]
    return X[idx], y[idx]


def concatenate(data: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """One (X, y) pair from a sequence of (X, y) batches."""
    pairs = [unpack(b, i, check_values=False) for i, b in enumerate(data)]
    if not pairs:
        raise DataError("the data set is empty")
    return torch.cat([X for X, _ in pairs]), torch.cat([y for _, y in pairs])


def split_problem(model: nn.Module, loss: str | Loss, X: Tensor, y: Tensor, group: Any = None,
                  params: Sequence[str] | None = None, reduction: str = "mean",
                  batch_size: int | None = None) -> ProcessGroupProblem:
    """The data-parallel problem of ``model`` on the batch (X, y), which every rank passes in full: each rank keeps
    its contiguous shard (see :func:`shard`)."""
    rank, size = group_rank_and_size(group)
    Xr, yr = shard(X, y, rank, size)
    local = Problem(model, loss, (Xr, yr), params=params, reduction="sum", batch_size=batch_size)
    return ProcessGroupProblem(local, group, reduction)


class ProcessGroupProblem(Problem):
    """The risk over a batch split across the ranks of a process group.

    ``local`` is this rank's shard as a sum-reduced :class:`Problem`; parameters, shapes and dtype are its, the
    sample count and scale are global. Operators, gradients, loss values and the BackPACK/Kronecker metric
    statistics are reduced with ``all_reduce`` over ``group``; every rank must make the same calls in the same
    order (collectives).
    """

    def __init__(self, local: Problem, group: Any = None, reduction: str = "mean") -> None:  # noqa: D107
        if local.reduction != "sum":
            raise ProblemError("the local shard problem must use reduction='sum' (the global scale is applied "
                               "after the reduction)")
        if reduction not in ("mean", "sum"):
            raise ProblemError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.local, self.group = local, group
        self.rank, self.world_size = group_rank_and_size(group)
        self.model, self.loss, self.reduction = local.model, local.loss, reduction
        self.data = None  # type: ignore[assignment]
        self.param_names, self.params, self.shapes, self.dim = local.param_names, local.params, local.shapes, local.dim
        self.dtype, self.device = local.dtype, local.device
        self._frozen = local._frozen
        counts = torch.tensor([local.num_samples, local.num_batches], dtype=torch.float64, device=self.device)
        counts = all_reduce_sum(counts, group)
        self.num_samples, self.num_batches = int(counts[0]), int(counts[1])

    # ------------------------------------------------------------- reductions
    def reduce(self, t: Tensor) -> Tensor:
        """Σ over the ranks of a tensor (in place)."""
        return all_reduce_sum(t, self.group)

    def build_operator(self, kind: str, check_determinism: bool = True, **options: Any) -> AllReduceOperator:
        return AllReduceOperator(self, kind, check_determinism, **options)

    def diagonal_sum(self, kind: str, **options: Any) -> Tensor:
        """Σ_n over all shards of the undamped diagonal statistic ``kind`` (diag_ggn, diag_fisher_mc,
        empirical_fisher_diag), unscaled. Monte-Carlo draws are made per shard (a different sample than one
        process on the whole batch draws)."""
        from ...geometry.metrics.backpack_metrics import raw_diagonal

        return self.reduce(raw_diagonal(self.local, kind, **options).detach().clone())

    def reduce_diagonal(self, kind: str, **options: Any) -> Tensor:
        """The diagonal of a diagonal metric: the shards' sums, reduced, × s (the hook ``cd.metric`` calls)."""
        return self.diagonal_sum(kind, **options) * self.scale

    def kronecker_sums(self, exact: bool, **options: Any) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
        """The Kronecker statistics G = Σ_n B_n B_nᵀ and A = Σ_n a_n a_nᵀ (None for biases) summed over all shards
        (see :func:`curvdist.geometry.metrics.kfac.kfac_sums`); KFAC's sampled labels are drawn per shard."""
        G, A = kfac_sums(self.local, exact=exact, **options)
        G = {n: self.reduce(g.detach().clone()) for n, g in G.items()}
        A = {n: None if a is None else self.reduce(a.detach().clone()) for n, a in A.items()}
        return G, A

    def kronecker_metric(self, G: dict[str, Tensor], A: dict[str, Tensor | None], damping: float,
                         exact: bool) -> KFACMetric:
        """KFAC/KFLR from statistics summed over all shards, normalized with the global scale and count."""
        return kfac_from_sums(self.param_names, self.shapes, G, A, self.scale, self.num_samples, damping,
                              "kflr" if exact else "kfac")

    def reduce_kfac(self, damping: float, exact: bool, **options: Any) -> KFACMetric:
        """The hook ``cd.metric`` calls for ``kfac``/``kflr``."""
        G, A = self.kronecker_sums(exact, **options)
        return self.kronecker_metric(G, A, damping, exact)

    def diagonal_metric(self, kind: str, diagonal_sum: Tensor, damping: float) -> DiagonalMetric:
        return DiagonalMetric(diagonal_sum * self.scale, damping, kind=kind)

    # ------------------------------------------------------------- data passes
    def batches(self, validate: bool = False) -> Any:
        raise ProblemError("a ProcessGroupProblem's data are split across ranks; use its operators, value() and "
                           "gradient(), or .local for this rank's shard")

    def value(self, params: Params | None = None) -> float:
        if params is not None:
            raise ProblemError("a ProcessGroupProblem is evaluated at its own parameters only")
        total = torch.tensor([self.local.value()], dtype=torch.float64, device=self.device)
        return self.scale * float(self.reduce(total)[0])

    def gradient(self, params: Params | None = None) -> Params:
        if params is not None:
            raise ProblemError("a ProcessGroupProblem is evaluated at its own parameters only")
        flat = self.local.flatten(self.local.gradient()).detach().clone()
        return self.unflatten(self.reduce(flat).mul_(self.scale))


class AllReduceOperator(CurvatureOperator):
    """C v = s · all_reduce_sum(Σ_{n in shard} C_n v): the shard's operator of ``kind``, reduced over the group."""

    backend = "deepspeed-data-parallel"

    def __init__(self, problem: ProcessGroupProblem, kind: str, check_determinism: bool = True,
                 **options: Any) -> None:
        self.kind = kind
        self.local_op = operator(problem.local, kind, check_determinism=False, **options)
        super().__init__(problem, check_determinism)

    def batch_matvec(self, params: Params, v: Params, X: Tensor, y: Tensor, ctx: Any) -> Params:
        raise NotImplementedError  # products are assembled across ranks

    def matvec_params(self, v: Params) -> Params:
        p: ProcessGroupProblem = self.problem  # type: ignore[assignment]
        flat = p.local.flatten(self.local_op.matvec_params(v))
        return p.unflatten(p.reduce(flat).mul_(p.scale))

    def matmat_params(self, V: Params) -> Params:
        p: ProcessGroupProblem = self.problem  # type: ignore[assignment]
        k = V[0].shape[0]
        flat = torch.cat([t.reshape(k, -1) for t in self.local_op.matmat_params(V)], 1)
        flat = p.reduce(flat).mul_(p.scale)
        return tuple(t.reshape(k, *s) for t, s in zip(torch.split(flat, [s.numel() for s in p.shapes], 1),
                                                     p.shapes))
