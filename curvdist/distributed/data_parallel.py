"""Data mode: every Ray actor holds a model replica and a disjoint data shard; :class:`RayReducer` is the
:class:`~curvdist.problem.reducers.ShardReducer` over them.

A statistic (a product, a gradient, metric sums) is one call per worker — its tensor arguments broadcast once with
``ray.put`` — and the sum of the workers' results in worker order, e.g. C v = s·Σ_workers Σ_{n in shard} C_n v.
The coordinator holds the model (for shapes and parameter values) but no data: its problem is a
:class:`~curvdist.problem.sharded.ShardedProblem` over a :class:`RayReducer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..errors import ProblemError
from ..problem.reducers import ShardReducer, Statistic, Tree, assign_by_cost, tree_sum
from ..problem.spec import ProblemSpec
from .cluster import ClusterError, resources_per_worker, wait_alive, wait_scheduled
from .worker import ShardWorker

RETRIES = 2


class WorkerPool:
    """N :class:`ShardWorker` actors with restarts; ``call`` retries a call on workers that died."""

    def __init__(self, spec: ProblemSpec, workers: int, max_restarts: int = 2) -> None:
        import ray

        if not isinstance(workers, int) or workers < 1:
            raise ProblemError(f"workers must be a positive integer, got {workers!r}")
        cls = ray.remote(max_restarts=max_restarts, max_task_retries=0, **resources_per_worker())(ShardWorker)
        self.ray = ray
        self.spec = spec
        self.actors = [cls.remote(spec, i, workers) for i in range(workers)]
        self.retries = 0
        self._params: Any = None  # the object ref of the last parameters broadcast (replayed on restarted workers)
        wait_scheduled(ray, self.actors, "data-mode workers")
        self.infos = self.call("info")

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run ``method(*args)`` on every worker; a worker that died is retried (Ray restarts it from its spec)."""
        return self.call_each(method, [args] * len(self.actors))

    def call_each(self, method: str, args: list[tuple[Any, ...]]) -> list[Any]:
        """Run ``method(*args[i])`` on worker i, with the retries of :meth:`call`."""
        ray = self.ray
        if len(args) != len(self.actors):
            raise ProblemError(f"call_each needs {len(self.actors)} argument tuples, got {len(args)}")
        refs = {i: getattr(a, method).remote(*args[i]) for i, a in enumerate(self.actors)}
        out: dict[int, Any] = {}
        for attempt in range(RETRIES + 1):
            failed = {}
            for i, ref in refs.items():
                try:
                    out[i] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    failed[i] = e
                except ray.exceptions.RayTaskError as e:  # an exception inside the worker: surface its cause
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    raise cause from None
            if not failed:
                return [out[i] for i in range(len(self.actors))]
            if attempt == RETRIES:
                raise ClusterError(f"workers {sorted(failed)} failed {RETRIES + 1} times: {next(iter(failed.values()))}")
            for i in failed:
                wait_alive(ray, self.actors[i], f"worker {i}")
                if self._params is not None:  # rebuilt from the spec: move it to the current point first
                    ray.get(self.actors[i].set_params.remote(self._params))
            self.retries += len(failed)
            refs = {i: getattr(self.actors[i], method).remote(*args[i]) for i in failed}
        raise AssertionError("unreachable")

    def set_params(self, flat: Any) -> None:
        """Move every worker's selected parameters to the flat vector ``flat``; a worker restarted later gets them
        again before its retried call, so no result is computed at the spec's initial point."""
        self._params = self.ray.put(flat)
        self.call("set_params", self._params)

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


class RayReducer(ShardReducer):
    """Σ over the shards held by a :class:`WorkerPool`'s actors, added in worker order."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.label = f"ray-data[{len(pool.actors)}]"

    @property
    def shards(self) -> int:
        return len(self.pool.actors)

    def counts(self) -> tuple[int, int]:
        return (sum(int(i["samples"]) for i in self.pool.infos), sum(int(i["batches"]) for i in self.pool.infos))

    def sum(self, statistic: Statistic, *args: Any) -> Tree:
        ray = self.pool.ray
        args = tuple(ray.put(a.detach().cpu()) if isinstance(a, Tensor) else a for a in args)
        return tree_sum(self.pool.call("run", statistic, *args))

    def set_params(self, flat: Tensor) -> None:
        self.pool.set_params(flat.detach().cpu())

    def map(self, fn: Callable[[dict[str, Any]], dict[str, Any]], jobs: dict[str, Any],
            costs: Mapping[str, float]) -> dict[str, Any]:
        """The jobs spread over the workers by cost (:func:`assign_by_cost`); results merged by name."""
        shares = assign_by_cost(dict(costs), len(self.pool.actors))
        self.last_assignment = shares
        results = self.pool.call_each("apply", [(fn, {n: jobs[n] for n in share}) for share in shares])
        return {n: r for part in results for n, r in part.items()}

    def stats(self) -> dict[str, Any] | None:
        return {"retried_worker_calls": self.pool.retries}

    def memory_reset(self) -> None:
        self.pool.call("memory_reset")

    def memory_records(self) -> list[dict[str, Any]]:
        return list(self.pool.call("memory_record"))
