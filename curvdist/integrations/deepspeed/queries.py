"""The monitor's use of the library's query layer (:mod:`curvdist.queries.session`): which queries a DeepSpeed run
can serve, and the names under which their scalars are logged."""

from __future__ import annotations

import re
from typing import Any

from ...errors import ConfigError
from ...queries.specs import CurvatureSpec, DensityQuery, DiagQuery, MetricSpec

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


#: what ZeRO-3 partitioned curvature serves: finite-difference products, in the Euclidean metric, the Kronecker and
#: diagonal block metrics on the partitions, or the ggn/fisher metric solved by CG
PARTITIONED_QUERIES = ("eigs", "trace", "logdet", "flatness")
PARTITIONED_CURVATURES = ("hessian", "ggn")
PARTITIONED_METRICS = ("euclidean", "kfac", "kflr", "ekfac", "diag_ggn", "diag_fisher_mc", "empirical_fisher_diag",
                       "ggn", "fisher")


def check_partitioned(q: Any, curvature: CurvatureSpec, metric_spec: MetricSpec) -> None:
    """Refuse, before any computation, a query that ZeRO-3 partitioned curvature cannot serve."""
    hint = "set the monitor's zero3: gather to measure it on a gathered replica (the whole model on every rank)"
    if q.kind not in PARTITIONED_QUERIES:
        raise ConfigError(f"queries: {q.kind} is not served by ZeRO-3 partitioned curvature (it serves "
                          f"{', '.join(PARTITIONED_QUERIES)}); {hint}")
    if curvature.kind not in PARTITIONED_CURVATURES:
        raise ConfigError(f"queries: the {curvature.kind} curvature is not served by ZeRO-3 partitioned curvature "
                          f"(finite differences of the engine's forward and backward give "
                          f"{' and '.join(PARTITIONED_CURVATURES)}); {hint}")
    if metric_spec.kind not in PARTITIONED_METRICS or (metric_spec.kind == "euclidean" and metric_spec.damping):
        raise ConfigError(f"queries: the metric {metric_spec.label()} is not served by ZeRO-3 partitioned curvature "
                          f"(it serves euclidean without damping and {', '.join(PARTITIONED_METRICS[1:])}); {hint}")


def default_name(q: Any, curvature: CurvatureSpec, metric_spec: MetricSpec) -> str:
    """``kind_curvature_metric``, e.g. ``flatness_hessian_fisher+0.01``."""
    return f"{q.kind}_{curvature.kind}_{metric_spec.label()}"


def clean_name(name: str) -> str:
    """A name safe in file names (DeepSpeed's CSV monitor makes one file per scalar): no '/', no spaces."""
    return re.sub(r"[^A-Za-z0-9_.+\-\[\]]", "_", name)
