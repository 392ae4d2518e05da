"""The ``evidence`` query: the invariant Laplace log-evidence at the invariant MAP (Kristiadi, Dangel & Hennig 2023,
§5), with a structured metric M = F + α·R (DESIGN §8).

    log Z ≈ log p̃(θ*) + (d/2) log 2π − ½ log det(M(θ*)⁻¹ A(θ*)),

θ* = argmax log p̃ reached from the current parameters by L-BFGS on the differentiable
:func:`~curvdist.geometry.laplace.riemannian_log_posterior` (log det M structured: :mod:`curvdist.geometry.laplace`);
M(θ*) is :func:`curvdist.metric` of the same kind with damping α (the prior precision, R = I_θ pulled back in ψ);
A ≈ −∇² log p̃(θ*) is applied matrix-free as C + α·R with C (``curvature``) the GGN of Σ_n ℓ_n (default) or its
Hessian.

Approximation (stated in every result): A leaves out ½∇² log det M(θ), the curvature of the volume term (third
derivatives of the network), and with ``curvature="ggn"`` the GGN's residual term too — the generalized Gauss-Newton
Laplace (as laplace-torch's). The GGN is a tensor under every reparametrization and GGN + αR is positive definite,
so log det(M⁻¹A) is invariant and defined everywhere; with the Hessian, A is a tensor only under reparametrizations
with a constant Jacobian and need not be positive definite away from the ordinary MAP (the invariant mode is not it).

log det(M⁻¹A): ``exact`` (dense A and the structured log det M; d ≤ ``dense_max``) or ``slq`` (stochastic Lanczos
quadrature on W⁻ᵀAW⁻¹, M = WᵀW the metric's factor, with a standard error: Ubaru, Chen & Saad 2017). The metric kind
``fisher`` takes the dense route of :mod:`curvdist.geometry.densities` (full Fisher, full ∇² log p̃ with the third
derivatives, small models only; refused past its memory with the structured kinds named).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from ..errors import MetricError, ProblemError
from ..geometry.laplace import STRUCTURED_EVIDENCE_METRICS, riemannian_log_posterior
from ..geometry.metrics import Metric, metric
from ..operators import operator
from ..problem.problem import Problem
from ..resources import check_allocation
from .api import coordinates_of, logdet
from .result import Result

#: log det(M⁻¹A) is exact (dense A) up to this dimension under ``logdet="auto"``
DENSE_MAX = 2048

APPROXIMATION = {
    "ggn": "A = GGN(Σ ℓ) + αR: the residual (Hessian − GGN) and the curvature of ½ log det M(θ) are left out",
    "hessian": "A = ∇²(Σ ℓ) + αR: the curvature of ½ log det M(θ) (third derivatives) is left out",
}


class _PosteriorHessian:
    """C + (M_δ − M)·: the problem's curvature (GGN or Hessian) plus the metric's damping term δ·R — the negative
    log posterior's (generalized) Hessian times the problem's scale s, matrix-free, for the log-det solvers."""

    kind = "posterior_hessian"

    def __init__(self, hessian: Any, M: Metric) -> None:
        self.hessian, self.metric = hessian, M
        self.dim, self.dtype = hessian.dim, hessian.dtype

    def vector_space(self) -> Any:
        return self.hessian.vector_space()

    def apply_vector(self, v: Tensor) -> Tensor:
        return self.hessian.apply_vector(v) + (self.metric.apply(v) - self.metric.apply_undamped(v))

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.metric.device)
        R = torch.stack([self.metric.apply(e) - self.metric.apply_undamped(e) for e in eye], dim=1)
        H = self.hessian.to_dense()
        return 0.5 * (H + H.T) + R


def evidence(problem: Problem, prior_precision: float = 1.0, metric_kind: str = "kflr", *, curvature: str = "ggn",
             logdet_method: str = "auto", probes: int = 30, steps: int = 40, seed: int = 0, max_iter: int = 2000,
             tol: float = 1e-9, dense_max: int = DENSE_MAX) -> Result:
    """The invariant Laplace log-evidence (see the module docstring) of ``problem`` with a Gaussian prior of
    precision α = ``prior_precision`` in θ and the metric ``metric_kind`` (``kflr``, ``diag_ggn``; ``fisher``: the
    dense route). The problem's parameters are left where they were; the mode is reported in ``info``.

    ``value``: log Z; ``vectors``: the mode (flat, in memory only); ``stderr``: from the SLQ estimate of log det(M⁻¹A) (0 for ``exact``); ``info``:
    ``log_evidence``, ``log_p_tilde`` (at the mode), ``log_det_metric``, ``log_det_MinvA``, ``logdet_method``,
    ``mode_grad_norm`` (‖W₀⁻ᵀ∇ log p̃‖ at the mode, the gradient's norm in the start's metric M₀ = W₀ᵀW₀ — an
    invariant: how well the mode was reached), ``mode_iterations``, ``mode_distance`` (‖θ* − θ₀‖ in the problem's
    coordinates), ``prior_precision``, ``curvature``, ``approximation``.

    The mode is found by L-BFGS in the coordinates whitened by the start's metric, z = W₀(x − x₀): the same problem
    in θ and ψ, so that both runs take the same path (L-BFGS itself is not invariant) and converge alike."""
    if not isinstance(problem, Problem):
        raise ProblemError("the evidence query needs the parameters in this process (a local curvdist.Problem)")
    if not (isinstance(prior_precision, (int, float)) and prior_precision > 0):
        raise MetricError(f"the evidence needs a prior precision α > 0, got {prior_precision!r}")
    if curvature not in APPROXIMATION:
        raise MetricError(f"the evidence's curvature must be 'ggn' or 'hessian', got {curvature!r}")
    if logdet_method not in ("auto", "exact", "slq"):
        raise MetricError(f"logdet_method must be 'auto', 'exact' or 'slq', got {logdet_method!r}")
    if metric_kind == "fisher":
        return _dense_route(problem, float(prior_precision), max_iter, tol)
    if metric_kind not in STRUCTURED_EVIDENCE_METRICS:
        raise MetricError(f"the evidence query takes metric kind {list(STRUCTURED_EVIDENCE_METRICS)} (structured) or "
                          f"'fisher' (dense, small models), not {metric_kind!r}")
    from ..geometry.densities import maximize

    t0 = time.perf_counter()
    alpha, s, d = float(prior_precision), problem.scale, problem.dim
    start = problem.flatten(problem.params).detach().clone()
    objective = riemannian_log_posterior(problem, metric_kind, alpha)
    reference = "pullback" if coordinates_of(problem) == "psi" else "identity"
    # L-BFGS in the coordinates z whitened by the metric at the start, x = x₀ + W₀⁻¹z (M₀ = W₀ᵀW₀): the same
    # problem in θ and in ψ (W₀,ψ = W₀,θ J), so both take the same path, and a well-conditioned one (M ≈ A)
    W0 = metric(problem, metric_kind, alpha * s, damping_reference=reference)
    mode = maximize(lambda z: objective(start + W0.inv_factor_apply(z)), torch.zeros_like(start),
                    max_iter=max_iter, tol=tol)
    point = (start + W0.inv_factor_apply(mode.point)).detach()
    problem.set_params(problem.unflatten(point))
    try:
        M = metric(problem, metric_kind, alpha * s, damping_reference=reference)  # s·(F + αR) at the mode
        log_det_metric = M.logdet() - d * math.log(s)
        C = _PosteriorHessian(operator(problem, curvature), M)  # s·A
        method = ("exact" if d <= dense_max else "slq") if logdet_method == "auto" else logdet_method
        if method == "exact":
            check_allocation(3 * d * d * 8, f"the dense {d} × {d} posterior Hessian of the evidence",
                             "use logdet_method='slq'")
            sign, logabsdet = torch.linalg.slogdet(C.to_dense().double())
            if float(sign) <= 0:
                raise MetricError(f"the Laplace approximation needs A = {curvature} + αR positive definite at the "
                                  f"invariant mode; it is not (use curvature 'ggn', or a larger prior precision)")
            ld, err, matvecs = float(logabsdet) - M.logdet(), 0.0, d
        else:
            r = logdet(C, metric=M, probes=probes, steps=steps, seed=seed)
            ld, err, matvecs = float(r.value), float(r.stderr), r.matvecs
    finally:
        problem.set_params(problem.unflatten(start))
    log_z = mode.log_density + 0.5 * d * math.log(2 * math.pi) - 0.5 * ld
    info = {"log_evidence": log_z, "log_p_tilde": mode.log_density, "log_det_metric": log_det_metric,
            "log_det_MinvA": ld, "logdet_method": method, "mode_grad_norm": mode.grad_norm,
            "mode_iterations": mode.iterations, "mode_distance": float((point - start).norm()),
            "prior_precision": alpha, "curvature": curvature,
            "approximation": APPROXIMATION[curvature]}
    if method == "slq":
        info.update(probes=probes, steps=steps)
    return Result(query="evidence", value=log_z, stderr=0.5 * err, matvecs=matvecs,
                  seconds=time.perf_counter() - t0, seed=seed if method == "slq" else None,
                  dtype=str(problem.dtype).replace("torch.", ""), curvature=curvature,
                  metric=f"{metric_kind}+{alpha:g}", coordinates=coordinates_of(problem), backend=problem.backend,
                  converged=mode.grad_norm <= max(1e3 * tol, 1e-6) * max(1.0, abs(mode.log_density)), info=info,
                  vectors=point)


def _dense_route(problem: Problem, alpha: float, max_iter: int, tol: float) -> Result:
    """The full-Fisher evidence of :mod:`curvdist.geometry.densities` (dense, with the third-derivative term)."""
    from ..geometry.densities import (
        gaussian_log_prior,
        invariant_map,
        laplace_log_evidence,
        log_likelihood,
        pulled_back_log_density,
    )

    d, n = problem.dim, problem.num_samples
    out = problem.forward(problem.params, next(iter(problem.batches()))[0])
    width = out[0].numel() if out.ndim > 1 else 1
    check_allocation(3.0 * n * width * d * d * 8,
                     f"the dense route of the evidence ({d} parameters, {n} samples: ∇² of log det F by autodiff)",
                     f"use metric kind {' or '.join(STRUCTURED_EVIDENCE_METRICS)} (structured, differentiable log det)")
    t0 = time.perf_counter()
    def prior_theta(x: Tensor) -> Tensor:  # normalized N(0, α⁻¹I) in θ
        return gaussian_log_prior(alpha)(x) + 0.5 * x.numel() * math.log(alpha / (2 * math.pi))

    ll = log_likelihood(problem)
    prior = pulled_back_log_density(prior_theta, problem) if coordinates_of(problem) == "psi" else prior_theta

    mode = invariant_map(problem, prior, alpha, max_iter=max_iter, tol=tol)
    log_z = laplace_log_evidence(problem, lambda x: ll(x) + prior(x), mode.point, alpha)
    info = {"log_evidence": log_z, "logdet_method": "dense", "mode_grad_norm": mode.grad_norm,
            "mode_iterations": mode.iterations, "prior_precision": alpha,
            "approximation": "none: full Fisher metric, A = −∇² log p̃ with the third-derivative term (dense)"}
    return Result(query="evidence", value=log_z, stderr=0.0, seconds=time.perf_counter() - t0,
                  dtype=str(problem.dtype).replace("torch.", ""), curvature="hessian", metric=f"fisher+{alpha:g}",
                  coordinates=coordinates_of(problem), backend=problem.backend, info=info)
