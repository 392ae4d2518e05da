"""Run the CLI's query objects (``EigsQuery``, ``FlatnessQuery``, ...) on a problem and turn their results into
named scalars for DeepSpeed's monitor — the same wiring as :func:`curvdist.cli.runner.run_query`, for a problem
whose data are split across ranks (no coordinate systems, no checkpointed solves)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from ...cli.config import CurvatureSpec, DensityQuery, DiagQuery, MetricSpec
from ...cli.dispatch import answer
from ...errors import ConfigError
from ...geometry.metrics import Metric, metric
from ...operators import CurvatureOperator, operator
from ...problem.problem import Problem
from ...queries import Result

#: metrics a monitor cannot build, with the reason
UNSERVED_METRICS = {
    "pullback": "a pull-back metric needs a reparametrization, and a training run has a single parametrization",
}


def check_query(q: Any, metric_spec: MetricSpec, zero_stage: int) -> None:
    """Refuse, before any computation, a query the monitor cannot serve (the message says why)."""
    if isinstance(q, DensityQuery):
        raise ConfigError("queries: 'density' returns a curve, not scalars; the monitor logs scalars (use eigs, "
                          "trace, logdet, flatness, grad_norm or diag)")
    if isinstance(q, DiagQuery) and metric_spec.kind != "euclidean":
        raise ConfigError("queries: diag is coordinate-dependent and takes no metric (only euclidean)")
    if metric_spec.kind in UNSERVED_METRICS:
        raise ConfigError(f"queries: the {metric_spec.kind} metric is not available in a DeepSpeed run: "
                          f"{UNSERVED_METRICS[metric_spec.kind]}")
    if metric_spec.kind == "adam":
        where = (f"ZeRO stage {zero_stage} partitions the optimizer state (and, at stage 3, the parameters) "
                 f"across ranks, so no rank holds Adam's exp_avg_sq per parameter" if zero_stage >= 1 else
                 "DeepSpeed may wrap the optimizer (bf16 master copies), so its state is not keyed by the "
                 "module's parameters")
        raise ConfigError(f"queries: the adam metric cannot be served by the DeepSpeed monitor: {where}; use "
                          f"diag_fisher_mc or empirical_fisher_diag for a diagonal metric")


class QueryContext:
    """Operators and metrics of one problem, built on demand and shared by the queries of one measurement."""

    def __init__(self, problem: Problem, seed: int) -> None:
        self.problem, self.seed = problem, seed
        self._ops: dict[str, CurvatureOperator] = {}
        self._metrics: dict[str, Metric | None] = {}

    def operator(self, spec: CurvatureSpec) -> CurvatureOperator:
        key = spec.model_dump_json()
        if key not in self._ops:
            self._ops[key] = operator(self.problem, spec.kind, **spec.options(self.seed))
        return self._ops[key]

    def metric(self, spec: MetricSpec) -> Metric | None:
        key = spec.model_dump_json()
        if key not in self._metrics:
            if spec.kind == "euclidean" and spec.damping == 0:
                self._metrics[key] = None
            else:
                self._metrics[key] = metric(self.problem, spec.kind, spec.damping, **spec.options)
        return self._metrics[key]


def run_query(q: Any, ctx: QueryContext, curvature: CurvatureSpec, metric_spec: MetricSpec, seed: int) -> Result:
    """One query with its own curvature/metric/seed or the defaults given."""
    r = answer(q, ctx.operator(curvature), ctx.metric(metric_spec), seed)
    return replace(r, metric=metric_spec.label())


def default_name(q: Any, curvature: CurvatureSpec, metric_spec: MetricSpec) -> str:
    """``kind_curvature_metric``, e.g. ``flatness_hessian_fisher+0.01``."""
    return f"{q.kind}_{curvature.kind}_{metric_spec.label()}"


def clean_name(name: str) -> str:
    """A name safe in file names (DeepSpeed's CSV monitor makes one file per scalar): no '/', no spaces."""
    return re.sub(r"[^A-Za-z0-9_.+\-\[\]]", "_", name)
