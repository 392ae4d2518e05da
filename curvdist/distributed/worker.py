"""The data-parallel Ray worker: a model replica and one disjoint data shard, built from a :class:`ProblemSpec`.

A worker holds its shard as a :class:`~curvdist.problem.reducers.Shard` (a sum-reduced problem) and evaluates the
statistics the coordinator's :class:`~curvdist.distributed.data_parallel.RayReducer` sends it — module-level
functions ``statistic(shard, *args)`` (products, gradients, loss sums, metric statistics), which Ray ships by
reference — returning the results on the CPU. A worker that dies is restarted by Ray (``max_restarts``), rebuilds
itself from its spec and shard in ``__init__``, and the coordinator retries the call. The fault-injection switch
(:mod:`curvdist.faults`) counts the calls of :meth:`ShardWorker.run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..faults import maybe_fail
from ..problem.reducers import Shard, shard_counts, tree_map
from ..problem.spec import ProblemSpec
from ..resources import memory_record, reset_peak


class ShardWorker:
    """Holds ``spec.build(shard, shards, reduction="sum")`` and runs statistics on it."""

    def __init__(self, spec: ProblemSpec, shard: int, shards: int) -> None:
        import ray

        self.index = shard
        self.shard = Shard(spec.build(shard, shards, reduction="sum",
                                      device="cuda" if torch.cuda.is_available() else "cpu"))
        self.calls = 0
        ctx = ray.get_runtime_context()
        self.restarted = bool(getattr(ctx, "was_current_actor_reconstructed", False))

    def info(self) -> dict[str, Any]:
        samples, batches = shard_counts(self.shard)
        return {"samples": samples, "batches": batches, "dim": self.shard.problem.dim, "restarted": self.restarted}

    def run(self, statistic: Callable[..., Any], *args: Any) -> Any:
        """statistic(shard, *args), tensors moved to the CPU."""
        self.calls += 1
        maybe_fail(self.index, self.calls, self.restarted)
        return tree_map(lambda t: t.detach().cpu(), statistic(self.shard, *args))

    def apply(self, fn: Callable[[Any], Any], jobs: Any) -> Any:
        """fn(jobs) on this worker's process (a share of work that needs no samples, e.g. factor eigh)."""
        return tree_map(lambda t: t.detach().cpu(), fn(jobs))

    def seconds(self, statistic: Callable[..., Any], *args: Any, repeats: int = 3) -> float:
        """Best wall time of statistic(shard, *args) inside this worker (benchmarks: compute without Ray)."""
        statistic(self.shard, *args)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            statistic(self.shard, *args)
            best = min(best, time.perf_counter() - t0)
        return best

    def memory_reset(self) -> None:
        """Start a peak-memory window in this worker's process."""
        self._windowed = reset_peak(self.shard.problem.device)

    def memory_record(self) -> dict[str, Any]:
        """This worker's memory line: its replica's parameters and its peak resident memory in the window."""
        p = self.shard.problem
        return memory_record(f"worker {self.index}", sum(t.numel() for t in p.params),
                             getattr(self, "_windowed", False), p.device)

    def set_params(self, flat: Tensor) -> None:
        """Overwrite the replica's selected parameters (the problem aliases them, so products follow)."""
        self.shard.set_params(flat)
