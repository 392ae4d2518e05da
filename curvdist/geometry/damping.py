"""The damping reference of a metric in reparametrized coordinates: δ·I_θ pulled back to δ·JᵀJ.

Every metric is M_δ = M + δR (DESIGN.md §2). In θ the reference is R = I. Under θ = φ(ψ) with Jacobian J a metric
is a tensor when M_ψ = Jᵀ M_θ J; the *damped* metric stays one only if the reference is pulled back too,
R_ψ = Jᵀ I_θ J = JᵀJ (``damping_reference: pullback``). The identity of ψ (``identity``) damps with δ·I_ψ instead,
and then M_ψ⁻¹C_ψ and M_θ⁻¹C_θ have different spectra (for δ > 0).

:func:`pulled_back_damping` returns, for a problem made by ``cd.reparametrize``, the keyword options with which
``cd.metric(problem, kind, δ, **options)`` damps by δ·JᵀJ *in the metric's own structure*, or refuses where that
structure cannot hold δ·JᵀJ:

==========================================  ======================================  ===============================
kind                                        J                                       option / outcome
==========================================  ======================================  ===============================
fisher, ggn, fisher_mc, empirical_fisher    any (dense is fine)                     ``damping_metric`` = JᵀI_θJ
                                                                                    (a :class:`PullbackMetric`)
diag_ggn, diag_fisher_mc,                   diagonal (scale, exp, softplus, ntk,    ``damping_diagonal`` = J_ii²
empirical_fisher_diag                       compose of those)                       (diag(d) + δ·diag(J²))
kfac, kflr                                  c_p·I on every tensor (scale by         ``damping_weights`` = {p: c_p²}
                                            numbers, ntk, compose of those)         (block p damped by δc_p²)
diagonal kinds                              dense (linear, weight_norm)             MetricError
kfac, kflr                                  entrywise diagonal or dense             MetricError
adam                                        any                                     MetricError
euclidean, pullback                         any                                     no option: ``euclidean`` is the
                                                                                    identity of ψ by definition;
                                                                                    ``pullback`` damps its θ metric
==========================================  ======================================  ===============================

A problem that is not reparametrized (θ coordinates, J = I) and δ = 0 need no option: the result is ``{}``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..catalogue import (
    CURVATURE_METRICS,
    DIAGONAL_METRICS,
    KRONECKER_METRICS,
    DampingReference,
    MetricKind,
    names,
    parse,
)
from ..errors import MetricError
from ..problem.problem import Problem
from .metrics.euclidean import EuclideanMetric
from .metrics.pullback import PullbackMetric
from .reparam.reparametrize import not_scalar_per_tensor, psi_jacobian

__all__ = ["DAMPING_REFERENCES", "pulled_back_damping", "with_damping_reference"]

DAMPING_REFERENCES = tuple(names(DampingReference))
_CURVATURE = tuple(names(CURVATURE_METRICS))
_DIAGONAL = tuple(names(DIAGONAL_METRICS))
_KRONECKER = tuple(names(KRONECKER_METRICS))
_NONE_NEEDED = (MetricKind.EUCLIDEAN.value, MetricKind.PULLBACK.value)


def pulled_back_damping(kind: str, damping: float, problem: Problem) -> dict[str, Any]:
    """The options of ``cd.metric(problem, kind, damping, **options)`` that damp with δ·JᵀJ, the θ-identity
    pulled back to ψ (see the module docstring for the table).

    Args:
        kind: a metric kind of ``cd.metric``.
        damping: δ ≥ 0.
        problem: the problem the metric is built for; only a problem made by ``cd.reparametrize`` (its model a
            ``ReparametrizedModel`` with ``reparam`` and ``theta_problem``) gets options.

    Returns:
        ``{}`` (θ coordinates, δ = 0, ``euclidean``, ``pullback``), ``{"damping_metric": PullbackMetric(I_θ)}``
        (fisher family), ``{"damping_diagonal": flat J_ii²}`` (diagonal kinds) or
        ``{"damping_weights": {ψ name: c_p²}}`` (kfac, kflr).

    Raises:
        MetricError: the kind cannot hold δ·JᵀJ in its structure (a diagonal kind with a non-diagonal J; kfac/kflr
            with a J that is not c·I on every tensor; adam), or ``problem`` selects only some of its ψ parameters.
    """
    kind = parse(MetricKind, kind, "metric kind").value
    if not damping or kind in _NONE_NEEDED:
        return {}
    found = psi_jacobian(problem, "damping_reference 'pullback'")
    if found is None:
        return {}
    model, diag = found
    r, theta = model.reparam, model.theta_problem
    if kind in _CURVATURE:
        return {"damping_metric": PullbackMetric(EuclideanMetric(theta.dim, theta.dtype, theta.device), r,
                                                 problem.params)}
    if kind == "adam":
        raise MetricError(
            f"the adam metric offers no pulled-back damping (δ·JᵀJ of the {r.kind} reparametrization); use "
            "damping_reference='identity', or metric 'pullback' of a θ metric"
        )
    if kind in _DIAGONAL:
        if diag is None:
            raise MetricError(
                f"the {kind} metric cannot be damped by the pulled-back θ-identity δ·JᵀJ under the {r.kind} "
                f"reparametrization: its Jacobian mixes parameter entries, so δ·JᵀJ is not diagonal and the damped "
                f"metric cannot stay diagonal (nor is a diagonal metric a tensor under it). Use "
                f"damping_reference='identity' (δ·I_ψ; not a tensor), metric 'pullback' with of='{kind}' "
                f"(Jᵀ(M_θ + δI)J, a tensor) or 'fisher'/'ggn' (tensors under every reparametrization)"
            )
        flat = [torch.broadcast_to(d, s).reshape(-1) for d, s in zip(diag, problem.shapes)]
        return {"damping_diagonal": torch.cat(flat).to(dtype=problem.dtype, device=problem.device) ** 2}
    why = not_scalar_per_tensor(r, diag)  # kfac, kflr
    if why is not None:
        raise MetricError(
            f"the {kind} metric cannot be damped by the pulled-back θ-identity δ·JᵀJ under the {r.kind} "
            f"reparametrization: {why}, so δ·JᵀJ is not a scalar on each block, and a Kronecker block G⊗A can "
            f"only carry a scalar damping. Use metric "
            f"'pullback' with of='{kind}' (Jᵀ(M_θ + δI)J, a tensor), a diagonal metric (diag_ggn, ...) or "
            f"'fisher'/'ggn'"
        )
    return {"damping_weights": {n: float(d.reshape(())) ** 2 for n, d in zip(problem.param_names, diag)}}


def with_damping_reference(kind: str, damping: float, problem: Problem, damping_reference: str,
                           options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``cd.metric`` with the damping reference applied: unchanged for ``"identity"`` (δ·I of the
    problem's coordinates), merged with :func:`pulled_back_damping` for ``"pullback"``. Raises MetricError for an
    unknown reference or when ``options`` already sets the damping reference itself."""
    damping_reference = parse(DampingReference, damping_reference, "damping reference").value
    if damping_reference == "identity":
        return options
    extra = pulled_back_damping(kind, damping, problem)
    clash = sorted(set(extra) & set(options))
    if clash:
        raise MetricError(f"damping_reference='pullback' sets {clash} itself; do not pass them as options too")
    return {**options, **extra}
