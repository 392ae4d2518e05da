"""The one seam of data parallelism: shards that each compute a sum-reduced statistic of their own samples, and a
reducer that adds the shards' results in a fixed order.

A *statistic* is a module-level function ``statistic(shard, *args)`` of a :class:`Shard` — a sum-reduced
:class:`~curvdist.problem.problem.Problem` over one disjoint part of the samples, with its own cache of operators —
returning a tree of tensors (tensors, numbers, ``None``, and dicts/tuples/lists of them): a curvature product
Σ_{n∈shard} C_n v, a gradient, BackPACK diagonal sums, Kronecker factor sums. A :class:`ShardReducer` evaluates it
on every shard and returns Σ_shards, added in shard order so that the result is deterministic. Implementations:

* :class:`InProcessReducer` — one shard in this process;
* :class:`ProcessGroupReducer` — this rank's shard, ``all_reduce``-d over a ``torch.distributed`` group (e.g. the
  data-parallel group of a DeepSpeed engine); every rank receives the same sum;
* :class:`curvdist.distributed.data_parallel.RayReducer` — shards on Ray actors (restarts and retries included).

Operators and metrics are written once against this interface (:mod:`curvdist.problem.sharded`), as kfac-pytorch
passes one communicator to its layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ProblemError

Tree = Any
Statistic = Callable[..., Tree]


class Shard:
    """One shard of the samples: a sum-reduced problem and its operators, built once and reused."""

    def __init__(self, problem: Any) -> None:
        if problem.reduction != "sum":
            raise ProblemError("a shard's problem must use reduction='sum' (the global scale is applied after the "
                               "reduction)")
        self.problem = problem
        self._operators: dict[str, Any] = {}
        self._subsets: dict[tuple[str, ...], Shard] = {}

    def subset(self, params: tuple[str, ...]) -> Shard:
        """The same samples over a subset of the parameters (cached)."""
        if params not in self._subsets:
            self._subsets[params] = Shard(self.problem.restricted(params))
        return self._subsets[params]

    def set_params(self, flat: Tensor) -> None:
        """Move the shard's selected parameters to the flat vector ``flat``."""
        p = self.problem
        p.set_params(p.unflatten(flat.to(p.device, p.dtype)))

    def operator(self, kind: str, options: Mapping[str, Any]) -> Any:
        """The shard's curvature operator ``kind`` (no determinism check: the sharded operator checks the sum)."""
        key = repr((kind, sorted(options.items())))
        if key not in self._operators:
            from ..operators import operator

            self._operators[key] = operator(self.problem, kind, check_determinism=False, **options)
        return self._operators[key]


def tree_map(fn: Callable[[Tensor], Tensor], tree: Tree) -> Tree:
    """``fn`` applied to every tensor of a tree (numbers and ``None`` pass through; an object with a ``map_tensors``
    method, such as a structured Kronecker factor, maps its own tensors)."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if hasattr(tree, "map_tensors"):
        return tree.map_tensors(fn)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_sum(parts: list[Tree]) -> Tree:
    """Σ of trees of one structure, added left to right (tensors cloned: the inputs are not modified)."""
    first = parts[0]
    if isinstance(first, Tensor):
        total = first.clone()
        for p in parts[1:]:
            total += p
        return total
    if isinstance(first, dict):
        return {k: tree_sum([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(tree_sum([p[i] for p in parts]) for i in range(len(first)))
    if first is None:
        return None
    return sum(parts[1:], first)


def shard_counts(shard: Shard) -> tuple[int, int]:
    """(samples, batches) of a shard."""
    return shard.problem.num_samples, shard.problem.num_batches


class ShardReducer(ABC):
    """Σ over the shards of a statistic; see the module docstring."""

    #: where the shards live, e.g. ``local``, ``ray-data[4]``; recorded in every result
    label: str = "local"

    @property
    @abstractmethod
    def shards(self) -> int:
        """The number of shards."""

    @abstractmethod
    def sum(self, statistic: Statistic, *args: Any) -> Tree:
        """Σ_shards statistic(shard, *args), in shard order."""

    @abstractmethod
    def set_params(self, flat: Tensor) -> None:
        """Move every shard's selected parameters to the flat vector ``flat``."""

    def counts(self) -> tuple[int, int]:
        """(samples, batches) over all shards."""
        return self.sum(shard_counts)

    def map(self, fn: Callable[[dict[str, Any]], dict[str, Any]], jobs: dict[str, Any],
            costs: Mapping[str, float]) -> dict[str, Any]:
        """``fn`` over named jobs (a dict in, a dict of results out), spread over the shards by cost where the
        shards are separate processes; here, in this process."""
        return fn(jobs)

    def stats(self) -> dict[str, Any] | None:
        """Backend statistics for the report (e.g. retried calls), or None."""
        return None

    def memory_reset(self) -> None:
        """Start a peak-memory window in the processes holding the shards (none besides this one here)."""

    def memory_records(self) -> list[dict[str, Any]]:
        """One memory line per remote process holding shards (none here)."""
        return []


def assign_by_cost(costs: dict[str, float], workers: int) -> list[list[str]]:
    """Greedy longest-processing-time assignment of named jobs to workers: each job, most expensive first, to the
    worker with the least work so far (ties to the lowest index). Deterministic."""
    loads = [0.0] * workers
    shares: list[list[str]] = [[] for _ in range(workers)]
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        i = min(range(workers), key=lambda j: (loads[j], j))
        shares[i].append(name)
        loads[i] += costs[name]
    return shares


def on_subset(shard: Shard, params: tuple[str, ...], statistic: Statistic, *args: Any) -> Tree:
    """statistic on the shard's samples over the parameter subset ``params``."""
    return statistic(shard.subset(params), *args)


class SubsetReducer(ShardReducer):
    """A reducer's shards restricted to a subset of the parameters (e.g. one layer's block)."""

    def __init__(self, parent: ShardReducer, params: tuple[str, ...]) -> None:
        self.parent, self.params, self.label = parent, tuple(params), parent.label

    @property
    def shards(self) -> int:
        return self.parent.shards

    def counts(self) -> tuple[int, int]:
        return self.parent.counts()

    def sum(self, statistic: Statistic, *args: Any) -> Tree:
        return self.parent.sum(on_subset, self.params, statistic, *args)

    def set_params(self, flat: Tensor) -> None:
        raise ProblemError("a parameter subset of a sharded problem cannot move the parameters; move the full "
                           "problem's with set_params")

    def map(self, fn: Callable[[dict[str, Any]], dict[str, Any]], jobs: dict[str, Any],
            costs: Mapping[str, float]) -> dict[str, Any]:
        return self.parent.map(fn, jobs, costs)


class InProcessReducer(ShardReducer):
    """One shard, in this process."""

    def __init__(self, local: Any) -> None:
        self.shard = Shard(local)

    @property
    def shards(self) -> int:
        return 1

    def sum(self, statistic: Statistic, *args: Any) -> Tree:
        return statistic(self.shard, *args)

    def set_params(self, flat: Tensor) -> None:
        self.shard.set_params(flat)


class ProcessGroupReducer(ShardReducer):
    """This rank's shard, summed over the ranks of a ``torch.distributed`` group with ``all_reduce`` (every rank
    must make the same calls in the same order: they are collectives)."""

    def __init__(self, local: Any, group: Any = None, label: str = "process-group") -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ProblemError("torch.distributed is not initialized (deepspeed.initialize or "
                               "deepspeed.init_distributed does that)")
        self.dist, self.group = dist, group
        self.shard = Shard(local)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.label = f"{label}[{self.world_size}]"

    @property
    def shards(self) -> int:
        return self.world_size

    def _all_reduce(self, t: Tensor) -> Tensor:
        """Σ over the ranks, in place: a statistic's result is its own fresh tensor."""
        t = t.detach()
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        return t

    def sum(self, statistic: Statistic, *args: Any) -> Tree:
        local = statistic(self.shard, *args)
        return self._reduce_tree(self._agree_on_structure(local))

    def _agree_on_structure(self, tree: Tree) -> Tree:
        """Every rank the same kind of leaf at every place, so that the collectives match: a structured leaf (one
        with ``reduce_with``) that another rank holds dense (its rows outnumbered its dimension there) is densified
        here too. One ``all_gather_object`` of the leaf kinds, only when the tree has a structured leaf anywhere."""
        kinds: list[bool] = []

        def visit(t: Tree) -> None:
            if isinstance(t, dict):
                for v in t.values():
                    visit(v)
            elif isinstance(t, (tuple, list)):
                for v in t:
                    visit(v)
            else:
                kinds.append(hasattr(t, "reduce_with"))

        visit(tree)
        device = self.shard.problem.device
        anywhere = self._all_reduce(torch.tensor([float(any(kinds))], dtype=torch.float64, device=device))
        if not float(anywhere[0]):
            return tree
        every: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(every, kinds, group=self.group)
        keep = [all(k[i] for k in every) for i in range(len(kinds))]
        position = iter(range(len(kinds)))

        def mend(t: Tree) -> Tree:
            if isinstance(t, dict):
                return {k: mend(v) for k, v in t.items()}
            if isinstance(t, (tuple, list)):
                return type(t)(mend(v) for v in t)
            i = next(position)
            return t.dense() if hasattr(t, "reduce_with") and not keep[i] else t

        return mend(tree)

    def _gather_rows(self, t: Tensor) -> Tensor:
        """The ranks' tensors concatenated along the first axis in rank order (their lengths may differ)."""
        t = t.detach().contiguous()
        size = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        self.dist.all_gather(sizes, size, group=self.group)
        longest = int(max(int(x) for x in sizes))
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self.dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])

    def _reduce_tree(self, tree: Tree) -> Tree:
        if isinstance(tree, (int, float)) and not isinstance(tree, bool):
            device = self.shard.problem.device
            out = self._all_reduce(torch.tensor([float(tree)], dtype=torch.float64, device=device))
            return type(tree)(out[0].item()) if isinstance(tree, int) else float(out[0])
        if isinstance(tree, dict):
            return {k: self._reduce_tree(v) for k, v in tree.items()}
        if isinstance(tree, (tuple, list)):
            return type(tree)(self._reduce_tree(v) for v in tree)
        if hasattr(tree, "reduce_with"):  # a structured Kronecker factor: its rows add by concatenation
            return tree.reduce_with(self._all_reduce, self._gather_rows)
        return tree_map(self._all_reduce, tree)

    def set_params(self, flat: Tensor) -> None:
        self.shard.set_params(flat)
