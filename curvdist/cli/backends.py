"""Where a run's θ coordinates live: the local process, Ray data mode, or Ray pipeline mode."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..problem import Problem
from ..problem.spec import ProblemSpec
from .config import Config, CurvatureSpec, MetricSpec
from .coordinates import Coordinates


class PipelineCoordinates(Coordinates):
    """θ coordinates whose operators run through pipeline stages and whose vectors live on the stage actors."""

    def __init__(self, pool: Any, reduction: str, seed: int) -> None:
        self.name, self.seed, self.theta, self.optimizer = "theta", seed, None, None
        self.pool, self.reduction = pool, reduction
        self.problem = None  # type: ignore[assignment]
        self._ops, self._metrics = {}, {}

    def operator(self, spec: CurvatureSpec, metric_spec: MetricSpec) -> Any:
        from ..distributed.pipeline import PipelineOperator

        if spec.kind not in self._ops:
            if spec.kind not in ("hessian", "ggn", "fisher"):
                raise ConfigError(f"pipeline mode supports curvature hessian, ggn, fisher; got {spec.kind!r}")
            self._ops[spec.kind] = PipelineOperator(self.pool, spec.kind, self.reduction)
        return self._ops[spec.kind]

    def _build(self, spec: MetricSpec) -> Any:
        from ..distributed.pipeline import PipelineMetric, PipelineOperator

        if spec.kind == "euclidean" and not spec.damping:
            return None
        if spec.kind in ("ggn", "fisher"):
            return PipelineMetric(PipelineOperator(self.pool, spec.kind, self.reduction), spec.damping)
        raise ConfigError(f"pipeline mode supports the metrics euclidean, ggn, fisher (CG-solved); got {spec.kind!r}")


@contextmanager
def theta_coordinates(cfg: Config, problem: Problem, spec: ProblemSpec, optimizer: Any) -> Iterator[Coordinates]:
    """The θ coordinates of a run on its backend (Ray started and stopped around the block)."""
    b = cfg.backend
    if b.kind == "local":
        yield Coordinates("theta", problem, cfg.seed, optimizer=optimizer)
        return
    if cfg.reparam is not None:
        raise ConfigError("reparam runs on the local backend only (the ψ problem is built by autodiff through φ "
                          "in the coordinator's process)")
    from ..distributed.cluster import ray_session

    actors = b.workers if b.mode == "data" else b.stages
    with ray_session(b.address, num_cpus=max(os.cpu_count() or 1, actors)):
        if b.mode == "data":
            from ..distributed.data_parallel import RemoteProblem, WorkerPool

            pool = WorkerPool(spec, b.workers, max_restarts=b.max_restarts)
            try:
                yield Coordinates("theta", RemoteProblem(spec, pool), cfg.seed, optimizer=optimizer)
            finally:
                pool.shutdown()
        else:
            from ..distributed.pipeline import StagePool

            pool = StagePool(spec, b.stages, max_restarts=b.max_restarts)
            try:
                yield PipelineCoordinates(pool, cfg.reduction, cfg.seed)
            finally:
                pool.shutdown()


def trained_spec(spec: ProblemSpec, model: nn.Module, trained: bool) -> ProblemSpec:
    """Workers rebuild the model from the spec; after training they also need the trained parameters."""
    return spec.with_state(model) if trained else spec
