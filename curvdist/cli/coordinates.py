"""One coordinate system of a run: its problem, operators and metrics, built on demand and cached.

θ is the problem as configured. ψ (when the config has a ``reparam``) is ``cd.reparametrize(θ, r)``: every
operator and metric there is computed by autodiff on the reparametrized model, independently of θ, except what a
metric's definition takes from θ on purpose:

* ``pullback``: M_ψ = Jᵀ M_θ J of the θ metric ``of`` — paired with the Hessian it uses the Riemannian Hessian;
* the damping of a curvature metric: δ·I_θ pulled back to δ·JᵀJ (``damping_reference: pullback``, the default), so
  that the damped metric is a tensor; ``identity`` damps with δ·I_ψ instead (needed when J is not invertible).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..geometry.metrics import EuclideanMetric, Metric, PullbackMetric, metric
from ..geometry.riemannian import RiemannianHessian
from ..operators import CurvatureOperator, operator
from ..problem import Problem
from .config import CurvatureSpec, MetricSpec


class Coordinates:
    def __init__(self, name: str, problem: Problem, seed: int, theta: Coordinates | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.name, self.problem, self.seed, self.theta, self.optimizer = name, problem, seed, theta, optimizer
        self._ops: dict[str, CurvatureOperator] = {}
        self._metrics: dict[str, Metric | None] = {}

    @property
    def reparam(self) -> Any:
        return getattr(self.problem.model, "reparam", None)

    def operator(self, spec: CurvatureSpec, metric_spec: MetricSpec) -> CurvatureOperator:
        riemannian = self.theta is not None and spec.kind == "hessian" and metric_spec.kind == "pullback"
        key = "riemannian" if riemannian else spec.model_dump_json()
        if key not in self._ops:
            self._ops[key] = RiemannianHessian(self.problem) if riemannian else \
                operator(self.problem, spec.kind, **spec.options(self.seed))
        return self._ops[key]

    def metric(self, spec: MetricSpec) -> Metric | None:
        key = spec.model_dump_json()
        if key not in self._metrics:
            self._metrics[key] = self._build(spec)
        return self._metrics[key]

    def _build(self, spec: MetricSpec) -> Metric | None:
        kind, damping, opts = spec.kind, spec.damping, dict(spec.options)
        if kind == "pullback":
            if self.theta is None:  # in θ the pulled-back metric is the θ metric itself
                return self.metric(spec.model_copy(update={"kind": spec.of}))
            of = self.theta.metric(spec.model_copy(update={"kind": spec.of})) or \
                EuclideanMetric(self.theta.problem.dim, self.theta.problem.dtype, self.theta.problem.device)
            return PullbackMetric(of, self.reparam, self.problem.params)
        if kind == "euclidean":
            return None if damping == 0 else EuclideanMetric(self.problem.dim, self.problem.dtype,
                                                            self.problem.device, damping)
        if kind == "adam":
            if self.optimizer is None or not isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                raise ConfigError("metric kind 'adam' needs train.optimizer adam or adamw (it reads their state)")
            if self.theta is not None:
                raise ConfigError("metric kind 'adam' exists only in the coordinates the optimizer trained in (θ)")
            opts["optimizer"] = self.optimizer
        if kind in ("fisher", "ggn", "fisher_mc", "empirical_fisher") and self.theta is not None and damping \
                and spec.damping_reference == "pullback":
            opts["damping_metric"] = PullbackMetric(
                EuclideanMetric(self.theta.problem.dim, self.theta.problem.dtype, self.theta.problem.device),
                self.reparam, self.problem.params)
        return metric(self.problem, kind, damping, **opts)
