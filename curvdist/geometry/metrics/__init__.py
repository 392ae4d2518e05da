"""Metrics on parameter space and the factory ``cd.metric(problem, kind, damping=...)``."""

from __future__ import annotations

from typing import Any

from ...catalogue import CURVATURE_METRICS, DIAGONAL_METRICS, KRONECKER_METRICS, MetricKind, names, parse
from ...errors import MetricError
from ...problem.base import BaseProblem, StagedProblem
from ...problem.sharded import ShardedProblem
from .base import DiagonalMetric, Metric
from .curvature import CurvatureMetric
from .euclidean import EuclideanMetric
from .pullback import PullbackMetric

KINDS = tuple(names(MetricKind))


def metric(problem: BaseProblem | StagedProblem, kind: str = "euclidean", damping: float = 0.0,
           damping_reference: str = "identity", **options: Any) -> Metric:
    """Build the metric ``kind`` of ``problem`` with damping δ (M_δ = M + δI).

    ``damping_reference``: ``"identity"`` (δ·I of the problem's coordinates) or ``"pullback"`` (for a problem made
    by ``cd.reparametrize``: δ·JᵀJ, the θ-identity pulled back, so that the damped metric is a tensor; kept in the
    metric's structure or refused, see :mod:`curvdist.geometry.damping`).

    ``euclidean``; ``fisher``/``ggn``/``fisher_mc``/``empirical_fisher`` (options: ``method`` auto|dense|cg,
    ``cg_tol``, ``damping_metric``, operator options); ``diag_ggn``, ``diag_fisher_mc``, ``empirical_fisher_diag``
    (options ``backend``, ``mc_samples``, ``seed``); ``kfac``/``kflr`` (options ``kfac_approx`` expand|reduce, the
    weight-sharing approximation of :mod:`.kfac`; ``dense_max``, ``backend``, ``mc_samples``, ``seed``,
    ``damping_weights``); ``ekfac`` (eigenvalue-corrected KFAC, :mod:`.ekfac`: option ``fisher_type``
    type2|mc|empirical, and the kfac options); ``adam`` (option ``optimizer``); ``pullback`` (options ``of``: the θ metric or its kind,
    and, unless ``problem`` was made by ``cd.reparametrize``, ``reparam`` and ``psi``). Kinds are
    :class:`curvdist.catalogue.MetricKind`. On a sharded problem the statistics are per-shard sums reduced by its
    reducer (:mod:`.statistics`); a staged (pipeline) problem builds the metrics its stages can.
    """
    if not isinstance(problem, (BaseProblem, StagedProblem)):
        raise MetricError(f"metric() needs a curvdist.Problem, got {type(problem).__name__}")
    kind = parse(MetricKind, kind, "metric kind").value
    if damping_reference != "identity":
        from ..damping import with_damping_reference

        options = with_damping_reference(kind, damping, problem, damping_reference, options)
    if isinstance(problem, StagedProblem):
        return problem.curvature_metric(kind, damping, **options)
    if kind == "euclidean":
        _no_options(kind, options)
        return EuclideanMetric(problem.dim, problem.dtype, problem.device, damping)
    if kind in CURVATURE_METRICS:
        return CurvatureMetric(problem, kind, damping, **options)
    if kind in DIAGONAL_METRICS:
        if isinstance(problem, ShardedProblem):
            from .statistics import diagonal_metric

            return diagonal_metric(problem, kind, damping, **options)
        from . import backpack_metrics

        return getattr(backpack_metrics, kind)(problem, damping=damping, **options)
    if kind in KRONECKER_METRICS:
        if isinstance(problem, ShardedProblem):
            from .statistics import kronecker_metric

            return kronecker_metric(problem, damping, kind == "kflr", **options)
        from .kfac import kfac

        return kfac(problem, damping=damping, exact=(kind == "kflr"), **options)
    if kind == "ekfac":
        if isinstance(problem, ShardedProblem):
            from .statistics import ekfac_metric

            return ekfac_metric(problem, damping, **options)
        from .ekfac import ekfac

        return ekfac(problem, damping=damping, **options)
    if kind == "adam":
        from .adam import adam

        if "optimizer" not in options:
            raise MetricError("the adam metric needs optimizer=<a torch.optim.Adam/AdamW with state>")
        return adam(problem, damping=damping, **options)
    assert kind == "pullback"
    return _pullback(problem, damping, **options)


def _no_options(kind: str, options: dict[str, Any]) -> None:
    if options:
        raise MetricError(f"the {kind} metric takes no options, got {sorted(options)}")


def _pullback(problem: BaseProblem, damping: float, of: Metric | str = "euclidean", reparam: Any = None,
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
