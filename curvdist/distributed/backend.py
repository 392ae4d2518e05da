"""Backends in the Python API: where a problem's samples or stages live.

::

    spec = cd.ProblemSpec("mymodels:net", "mymodels:data", loss="cross_entropy", batch_size=256)
    with cd.ray_backend(workers=4) as backend:          # address="auto" joins a running cluster
        problem = backend.data_parallel(spec)           # a ShardedProblem: one data shard per Ray actor
        staged = backend.pipeline(spec, stages=3)       # a PipelineProblem: the model split over 3 actors
        cd.eigs(cd.operator(problem, "hessian"), k=5, metric=cd.metric(problem, "kfac", damping=1e-3))

Operators, metrics, every query, ``block_spectra`` and ``RiemannianSGD`` take the data-parallel problem like a
local one; the pipeline problem serves what its stages compute and refuses the rest when asked. Leaving the block
shuts the actors down and stops the embedded Ray instance if the block started one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ProblemError
from ..problem.sharded import ShardedProblem
from ..problem.spec import ProblemSpec

if TYPE_CHECKING:
    from .stacks import Balance


class RayBackend:
    """Builds problems whose shards or stages are Ray actors; created by :func:`ray_backend`."""

    def __init__(self, workers: int = 2, max_restarts: int = 2) -> None:
        self.workers, self.max_restarts = workers, max_restarts
        self._pools: list[Any] = []

    def data_parallel(self, spec: ProblemSpec, workers: int | None = None) -> ShardedProblem:
        """``spec``'s problem with its samples split over ``workers`` actors (contiguous, disjoint shards), each
        holding a replica of the model: products, gradients and metric statistics are summed over the actors."""
        from .data_parallel import RayReducer, WorkerPool

        _check_spec(spec)
        pool = WorkerPool(spec, self.workers if workers is None else workers, max_restarts=self.max_restarts)
        self._pools.append(pool)
        with torch.random.fork_rng(devices=[]):  # the spec seeds its factory: leave the caller's generator alone
            model = spec.build_model()
        return ShardedProblem(model, spec.loss, RayReducer(pool), list(spec.params) if spec.params else None,
                              spec.reduction)

    def pipeline(self, spec: ProblemSpec, stages: int = 2, micro_batches: int | None = None,
                 snapshots: bool = True, snapshot_every: int = 1, balance: Balance = "parameters",
                 basis_on_disk: bool = False, threads: int | None = None) -> Any:
        """``spec``'s problem with its model split into ``stages`` consecutive stages balanced by the parameters
        each holds, stage i on actor i with only its parameters: an ``nn.Sequential``, a model with a
        ``stages()`` method, or a block stack such as a Hugging Face decoder (traced and cut at its blocks).
        ``micro_batches``: each batch is split into this many micro-batches that flow through the stages
        GPipe-style (default: ``spec.micro_batch_size``, else whole batches). ``snapshots``: each stage writes
        its new vector shards to a temporary directory at the start of every ``snapshot_every``-th product, so a
        lost stage is restarted, the operations since replayed on it and the interrupted call run again (off: a
        lost stage ends the solve, which restarts from its checkpoint). A larger ``snapshot_every`` writes less
        (at 124M parameters a shard takes seconds to write) and keeps up to that many product inputs alive.
        ``balance``: ``parameters`` (the stages hold near-equal parameters), ``compute`` (near-equal parameters
        multiplied with: an estimate of the work, less even memory), ``time`` (near-equal seconds of each block's
        forward and backward pass, measured once on the coordinator: :mod:`~curvdist.distributed.unit_times`), or
        the number of blocks (modules of a sequential stack) of each stage, as a list.
        ``basis_on_disk``: the stages keep their Lanczos basis rows in memory-mapped files (page cache) instead of
        their working memory (CPU stages; :class:`~curvdist.distributed.pipeline.StagePool`). ``threads``: torch
        threads per stage (default one per CPU Ray gives it); more lets a stage use the cores the others leave idle
        (with passive OpenMP waiting; :class:`~curvdist.distributed.pipeline.StagePool`)."""
        from .pipeline import PipelineProblem, StagePool

        _check_spec(spec)
        pool = StagePool(spec, stages, max_restarts=self.max_restarts, micro_batches=micro_batches,
                         snapshots=snapshots, snapshot_every=snapshot_every, balance=balance,
                         basis_on_disk=basis_on_disk, threads=threads)
        self._pools.append(pool)
        return PipelineProblem(pool)

    def shutdown(self) -> None:
        """Kill every actor this backend started."""
        for pool in self._pools:
            pool.shutdown()
        self._pools.clear()


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, ProblemSpec):
        raise ProblemError(f"a backend builds problems from a curvdist.ProblemSpec (import paths, not live modules), "
                           f"got {type(spec).__name__}")


@contextmanager
def ray_backend(workers: int = 2, address: str | None = None, max_restarts: int = 2,
                num_cpus: int | None = None) -> Iterator[RayBackend]:
    """A Ray backend for the block: an embedded Ray instance unless ``address`` names a cluster (``"auto"``, ``host:port``; ``RAY_ADDRESS``
    is honoured too). Actors restart up to ``max_restarts`` times, rebuild themselves from the spec and the
    coordinator retries the call. ``num_cpus``: the embedded instance's logical CPUs, which place the actors (one
    each); the default, the machine's cores + 8, leaves room for the data workers and a pipeline of up to 8 stages
    at once (Ray oversubscribes the physical cores then; give the count your actors need)."""
    from .cluster import ray_session

    if not isinstance(workers, int) or workers < 1:
        raise ProblemError(f"workers must be a positive integer, got {workers!r}")
    backend = RayBackend(workers, max_restarts)
    with ray_session(address, num_cpus=num_cpus or max(os.cpu_count() or 1, workers) + 8):
        try:
            yield backend
        finally:
            backend.shutdown()
