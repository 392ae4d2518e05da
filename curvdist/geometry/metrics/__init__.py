"""Metrics on parameter space and the factory ``cd.metric(problem, kind, damping=...)``."""

from __future__ import annotations

from typing import Any

from ...errors import MetricError
from ...problem.problem import Problem
from .base import DiagonalMetric, Metric
from .curvature import CurvatureMetric
from .euclidean import EuclideanMetric
from .pullback import PullbackMetric

KINDS = ("euclidean", "fisher", "ggn", "fisher_mc", "empirical_fisher", "diag_ggn", "diag_fisher_mc",
         "empirical_fisher_diag", "kfac", "kflr", "adam", "pullback")


def metric(problem: Problem, kind: str = "euclidean", damping: float = 0.0, **options: Any) -> Metric:
    """Build the metric ``kind`` of ``problem`` with damping δ (M_δ = M + δI).

    ``euclidean``; ``fisher``/``ggn``/``fisher_mc``/``empirical_fisher`` (options: ``method`` auto|dense|cg,
    ``cg_tol``, ``damping_metric``, operator options); ``diag_ggn``, ``diag_fisher_mc``, ``empirical_fisher_diag``
    (BackPACK); ``kfac``/``kflr`` (BackPACK Kronecker factors); ``adam`` (option ``optimizer``); ``pullback``
    (options ``of``: the θ metric or its kind, and, unless ``problem`` was made by ``cd.reparametrize``,
    ``reparam`` and ``psi``).
    """
    if not isinstance(problem, Problem):
        raise MetricError(f"metric() needs a curvdist.Problem, got {type(problem).__name__}")
    if kind == "euclidean":
        _no_options(kind, options)
        return EuclideanMetric(problem.dim, problem.dtype, problem.device, damping)
    if kind in ("fisher", "ggn", "fisher_mc", "empirical_fisher"):
        return CurvatureMetric(problem, kind, damping, **options)
    if kind in ("diag_ggn", "diag_fisher_mc", "empirical_fisher_diag"):
        if hasattr(problem, "reduce_diagonal"):  # data on Ray workers: shard diagonals reduced by the coordinator
            return DiagonalMetric(problem.reduce_diagonal(kind, **options), damping, kind=kind)
        from . import backpack_metrics

        return getattr(backpack_metrics, kind)(problem, damping=damping, **options)
    if kind in ("kfac", "kflr"):
        if hasattr(problem, "reduce_kfac"):  # data on Ray workers: per-shard statistics reduced here
            return problem.reduce_kfac(damping, kind == "kflr", **options)
        from .kfac import kfac

        return kfac(problem, damping=damping, exact=(kind == "kflr"), **options)
    if kind == "adam":
        from .adam import adam

        if "optimizer" not in options:
            raise MetricError("the adam metric needs optimizer=<a torch.optim.Adam/AdamW with state>")
        return adam(problem, damping=damping, **options)
    if kind == "pullback":
        return _pullback(problem, damping, **options)
    raise MetricError(f"unknown metric kind {kind!r}; choose one of {KINDS}")


def _no_options(kind: str, options: dict[str, Any]) -> None:
    if options:
        raise MetricError(f"the {kind} metric takes no options, got {sorted(options)}")


def _pullback(problem: Problem, damping: float, of: Metric | str = "euclidean", reparam: Any = None,
              psi: Any = None, **of_options: Any) -> Metric:
    if reparam is None:
        reparam = getattr(problem.model, "reparam", None)
        theta_problem = getattr(problem.model, "theta_problem", None)
        if reparam is None or theta_problem is None:
            raise MetricError("a pullback metric needs a problem made by cd.reparametrize, or reparam= and psi=")
        psi = problem.params
    else:
        theta_problem = None
        if psi is None:
            raise MetricError("a pullback metric with reparam= also needs the point psi=")
    if isinstance(of, str):
        if theta_problem is None:
            raise MetricError("pass the θ metric itself as of=<Metric> when giving reparam= explicitly")
        of = metric(theta_problem, of, damping, **of_options)
    elif damping or of_options:
        raise MetricError("damping/options belong to the θ metric when of= is a Metric")
    return PullbackMetric(of, reparam, psi)


__all__ = ["KINDS", "CurvatureMetric", "DiagonalMetric", "EuclideanMetric", "Metric", "PullbackMetric", "metric"]
