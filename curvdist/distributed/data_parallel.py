"""Data mode: every Ray actor holds a model replica and a disjoint data shard.

An operator product broadcasts v once (``ray.put``) and returns the sum of the actors' sum-reduced partial
products times the problem's scale, C v = s·Σ_workers Σ_{n in shard} C_n v. The coordinator holds the model
(for shapes and parameter values) but no data: :class:`RemoteProblem` is a :class:`Problem` whose data passes —
products, gradients, loss values — run on the workers.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..errors import ProblemError
from ..operators.base import CurvatureOperator
from ..problem.problem import Params, Problem
from ..problem.spec import ProblemSpec
from .cluster import ClusterError, resources_per_worker, wait_scheduled
from .worker import ShardWorker

RETRIES = 2
RESTART_DEADLINE = 120.0


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
                self._wait_alive(i)
            self.retries += len(failed)
            refs = {i: getattr(self.actors[i], method).remote(*args[i]) for i in failed}
        raise AssertionError("unreachable")

    def _wait_alive(self, i: int, deadline: float = RESTART_DEADLINE) -> None:
        """Block until Ray has restarted actor i (it rebuilds its problem from the spec in ``__init__``)."""
        ray, t0 = self.ray, time.monotonic()
        while True:
            try:
                ray.get(self.actors[i].__ray_ready__.remote(), timeout=10)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                if time.monotonic() - t0 > deadline:
                    raise ClusterError(f"worker {i} did not come back within {deadline:.0f} s: {e}") from None
                time.sleep(0.5)

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


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


class RemoteProblem(Problem):
    """A Problem whose data live on the workers: same parameters, shapes and scale as the local problem."""

    def __init__(self, spec: ProblemSpec, pool: WorkerPool) -> None:  # noqa: D107 — no data scan here
        self.spec, self.pool = spec, pool
        model = spec.build_model()
        names = list(spec.params) if spec.params else [n for n, p in model.named_parameters() if p.requires_grad]
        named = dict(model.named_parameters())
        self.model = model
        from ..problem.losses import make_loss

        self.loss = make_loss(spec.loss)
        self.reduction = spec.reduction
        self.data = None  # type: ignore[assignment]
        self.param_names = tuple(names)
        self.params = tuple(named[n].detach() for n in names)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self._frozen = {n: p.detach() for n, p in named.items() if n not in self.param_names}
        self._frozen.update(dict(model.named_buffers()))
        self.shapes = tuple(p.shape for p in self.params)
        self.dim = sum(p.numel() for p in self.params)
        self.num_samples = sum(i["samples"] for i in pool.infos)
        self.num_batches = len(pool.infos)

    def build_operator(self, kind: str, check_determinism: bool = True, **options: Any) -> DataParallelOperator:
        return DataParallelOperator(self, kind, check_determinism, **options)

    def reduce_diagonal(self, kind: str, **options: Any) -> Tensor:
        """The diagonal of a BackPACK diagonal metric: the workers' sum-reduced shard diagonals, summed, × s."""
        return _ordered_sum(self.pool.call("diag_metric", kind, options)).to(self.dtype) * self.scale

    def reduce_kfac(self, damping: float, exact: bool, **options: Any) -> Any:
        """KFAC/KFLR: the workers' summed Kronecker statistics, added in worker order, normalized, and
        eigendecomposed on the workers, the layers spread over them (as in distributed K-FAC, Osawa et al. 2019;
        Pauloski et al. 2020) — the coordinator only adds.

        KFLR equals the local metric; sampled KFAC draws its labels per shard, so it is a different sample."""
        from ..geometry.metrics.kfac import KFACMetric, normalized_factors

        parts = self.pool.call("kfac_sums", exact, options)
        G = {n: _ordered_sum([p[0][n] for p in parts]).to(self.dtype) for n in self.param_names}
        A = {n: (None if parts[0][1][n] is None else _ordered_sum([p[1][n] for p in parts]).to(self.dtype))
             for n in self.param_names}
        factors = normalized_factors(self.param_names, G, A, self.scale, self.num_samples)
        shares = assign_by_cost({n: sum(f.shape[0] ** 3 for f in fs) for n, fs in factors.items()},
                                len(self.pool.actors))
        self.last_eigh_assignment = shares
        results = self.pool.call_each("factor_eigh", [({n: factors[n] for n in share},) for share in shares])
        eigh = {n: r for part in results for n, r in part.items()}
        return KFACMetric(self.param_names, self.shapes, factors, damping=damping, kind="kflr" if exact else "kfac",
                          eigh=eigh)

    def set_params(self, params: Params) -> None:
        """Move the coordinator's and every worker's selected parameters to ``params`` (one broadcast)."""
        flat = self.flatten(params).detach()
        with torch.no_grad():
            for p, new in zip(self.params, self.unflatten(flat.to(self.device, self.dtype))):
                p.copy_(new)
        self.pool.call("set_params", self.pool.ray.put(flat.cpu()))

    def batches(self, validate: bool = False) -> Any:
        raise ProblemError("a RemoteProblem's data live on its Ray workers; use its operators and gradient()")

    def value(self, params: Params | None = None) -> float:
        if params is not None:
            raise ProblemError("a RemoteProblem is evaluated at its own parameters only")
        return self.scale * sum(self.pool.call("loss_sum"))

    def gradient(self, params: Params | None = None) -> Params:
        if params is not None:
            raise ProblemError("a RemoteProblem is evaluated at its own parameters only")
        return self.unflatten(_ordered_sum(self.pool.call("gradient")).to(self.dtype) * self.scale)


def _ordered_sum(parts: list[Tensor]) -> Tensor:
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


class DataParallelOperator(CurvatureOperator):
    """C v = s · Σ_workers (shard partial product), one ``ray.put`` of v per product."""

    backend = "ray-data"

    def __init__(self, problem: RemoteProblem, kind: str, check_determinism: bool = True, **options: Any) -> None:
        self.kind = kind
        self.options = options
        super().__init__(problem, check_determinism)

    def batch_matvec(self, params: Params, v: Params, X: Tensor, y: Tensor, ctx: Any) -> Params:
        raise NotImplementedError  # products are assembled across workers

    def matvec_params(self, v: Params) -> Params:
        p = self.problem
        ref = p.pool.ray.put(p.flatten(v).detach().cpu())
        total = _ordered_sum(p.pool.call("matvec", self.kind, self.options, ref))
        return p.unflatten(total.to(p.device, p.dtype) * p.scale)

    def matmat_params(self, V: Params) -> Params:
        p = self.problem
        k = V[0].shape[0]
        flat = torch.cat([t.reshape(k, -1) for t in V], 1).detach().cpu()
        total = _ordered_sum(p.pool.call("matmat", self.kind, self.options, p.pool.ray.put(flat)))
        total = total.to(p.device, p.dtype) * p.scale
        return tuple(t.reshape(k, *s) for t, s in zip(torch.split(total, [s.numel() for s in p.shapes], 1), p.shapes))
