"""Data parallelism over a ``torch.distributed`` process group (the DeepSpeed engine's data-parallel group).

Every rank holds a replica of the model and one disjoint shard of a batch. The risk over the whole batch is

    L(θ) = s · Σ_ranks Σ_{n in shard} ℓ_n,      s = 1/N (mean over all N samples of all shards) or 1 (sum),

so a curvature product is C v = s · all_reduce_sum(Σ_{n in shard} C_n v): each rank applies its shard's
sum-reduced operator and one ``all_reduce`` adds the partial products. All ranks then hold the same product and
run the same solver with the same seeds, so every rank computes the same numbers — no coordinator, and no second
communication stack next to DeepSpeed's.

The problem is the library's :class:`~curvdist.problem.sharded.ShardedProblem` over a
:class:`~curvdist.problem.reducers.ProcessGroupReducer` — the same sharded operator and metric statistics as Ray's
data mode, with ``all_reduce`` as the reduction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...errors import DataError, ProblemError
from ...problem.data import unpack
from ...problem.losses import Loss
from ...problem.problem import Problem
from ...problem.reducers import ProcessGroupReducer
from ...problem.sharded import ShardedProblem


def group_rank_and_size(group: Any = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size (``None``: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ProblemError("torch.distributed is not initialized (deepspeed.initialize or "
                           "deepspeed.init_distributed does that)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_start(n: int, rank: int, size: int) -> int:
    """The index of the first sample of rank ``rank``'s share (:func:`shard`) of n samples."""
    return int(torch.tensor_split(torch.arange(n), size)[rank][0]) if n >= size else 0


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
                  batch_size: int | None = None) -> ShardedProblem:
    """The data-parallel problem of ``model`` on the batch (X, y), which every rank passes in full: each rank keeps
    its contiguous shard (see :func:`shard`), and statistics are ``all_reduce``-d over ``group``."""
    rank, size = group_rank_and_size(group)
    Xr, yr = shard(X, y, rank, size)
    local = Problem(model, loss, (Xr, yr), params=params, reduction="sum", batch_size=batch_size,
                    sample_offset=shard_start(X.shape[0], rank, size))  # sampled labels: one process's
    reducer = ProcessGroupReducer(local, group, label="deepspeed-data-parallel")
    return ShardedProblem(model, loss, reducer, params=list(local.param_names), reduction=reduction)
