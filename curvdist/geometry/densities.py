"""Densities on parameter space that do not depend on the parametrization, invariant MAP and Laplace evidence.

A density p(θ) transforms as p_ψ(ψ) = p_θ(φ(ψ))·|det J(ψ)|, so its mode moves under a non-linear
reparametrization: "the MAP estimate" depends on the coordinates. The density with respect to the Riemannian
volume of a metric M that transforms as a tensor (M_ψ = JᵀM_θJ),

    log p̃(θ) = log p(θ) − ½ log det M(θ),

is a scalar, p̃_ψ(ψ) = p̃_θ(φ(ψ)), so its mode is the same point in every coordinate system (Kristiadi, Dangel,
Hennig 2023, "The Geometry of Neural Nets' Parameter Spaces Under Reparametrization", §5). With the Fisher metric
F(θ) = Σ_n J_nᵀ Λ_n J_n of the likelihood this is Jeffreys' construction applied to the posterior.

The Laplace approximation of the evidence expanded at the invariant mode θ* in the Riemannian volume,

    log Z ≈ log p̃(θ*) + (d/2) log 2π − ½ log det(M(θ*)⁻¹ A),   A = −∇² log p̃(θ*),

is invariant too. With a Gaussian prior of precision α in θ the metric used is M = F + α·I_θ (the GGN of the
negative log posterior), with α·I_θ pulled back to α·JᵀJ in ψ so that it stays a tensor and p̃ stays bounded
where the Fisher alone degenerates (A transforms as a tensor at the critical point θ*; M⁻¹A is a similarity invariant).

Everything here is dense and differentiated with ``torch.func`` on flat parameter vectors: it is meant for small
models (d up to a few thousand), where M and its log-determinant can be formed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from ..errors import NonFiniteError, ProblemError, SingularMetricError, SolverError
from ..problem.problem import Problem

LogDensity = Callable[[Tensor], Tensor]  # flat parameter vector → scalar


def log_likelihood(problem: Problem) -> LogDensity:
    """θ ↦ log p(D | θ) = −Σ_n ℓ(f(x_n; θ), y_n) (up to a constant; the sum, whatever the problem's reduction)."""

    def f(flat: Tensor) -> Tensor:
        params = problem.unflatten(flat)
        return -sum(problem.batch_loss(params, X, y) for X, y in problem.batches())

    return f


def gaussian_log_prior(precision: float = 1.0) -> LogDensity:
    """θ ↦ −(α/2)‖θ‖² (an isotropic Gaussian prior in the coordinates it is evaluated in, up to a constant)."""
    return lambda flat: -0.5 * precision * (flat * flat).sum()


def fisher_matrix(problem: Problem, flat: Tensor) -> Tensor:
    """The likelihood's Fisher F(θ) = Σ_n J_nᵀ Λ_n J_n (dense, differentiable in θ)."""

    def outputs(p: Tensor) -> Tensor:
        return torch.cat([problem.forward(problem.unflatten(p), X) for X, _ in problem.batches()])

    out = outputs(flat)
    J = jacrev(outputs)(flat).reshape(out.shape[0], -1, flat.numel())  # (N, C, d)
    ys = torch.cat([y for _, y in problem.batches()])
    eye = torch.eye(J.shape[1], dtype=flat.dtype, device=flat.device)
    # Λ_n columns: the loss's output-Hessian product applied to unit vectors, for every sample at once
    Lam = vmap(lambda e: problem.loss.output_hessian_apply(out, ys, e.expand_as(out)), out_dims=2)(eye)
    return torch.einsum("nci,ncd,ndj->ij", J, Lam, J)


def _theta_map(problem: Problem) -> Callable[[Tensor], Tensor] | None:
    r = getattr(problem.model, "reparam", None)
    if r is None:
        return None
    if not r.bijective:
        raise ProblemError(f"the {r.kind} reparametrization is not a bijection: densities do not transform")
    return lambda flat_psi: r.flatten_theta(r.forward(r.unflatten_psi(flat_psi)))


def metric_matrix(problem: Problem, flat: Tensor, prior_precision: float = 0.0) -> Tensor:
    """M = F + α·R: the likelihood's Fisher plus the prior precision α times the θ identity, R = I in θ and
    R = JᵀJ (pulled back) in the ψ coordinates of a problem made by ``cd.reparametrize`` — the GGN of the
    negative log posterior with a Gaussian prior in θ, a tensor in every coordinate system."""
    F = fisher_matrix(problem, flat)
    if not prior_precision:
        return F
    phi = _theta_map(problem)
    if phi is None:
        return F + prior_precision * torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
    J = jacrev(phi)(flat)
    return F + prior_precision * J.T @ J


def riemannian_log_density(problem: Problem, log_density: LogDensity, prior_precision: float = 0.0) -> LogDensity:
    """θ ↦ log p(θ) − ½ log det M(θ), M = F + α·R (:func:`metric_matrix`): the log-density w.r.t. the metric's
    Riemannian volume — a scalar, the same function of the point in every coordinate system."""

    def f(flat: Tensor) -> Tensor:
        sign, logdet = torch.linalg.slogdet(metric_matrix(problem, flat, prior_precision))
        if float(sign.detach()) <= 0:
            raise SingularMetricError("the Fisher metric is singular at this point: the Riemannian volume "
                                      "density needs a non-degenerate metric (more data than parameters)")
        return log_density(flat) - 0.5 * logdet

    return f


def pulled_back_log_density(log_density_theta: LogDensity, problem_psi: Problem) -> LogDensity:
    """ψ ↦ log p_θ(φ(ψ)) + log|det J(ψ)|: a density of θ written in ψ coordinates (change of variables).

    ``problem_psi`` is a problem made by ``cd.reparametrize``; J is formed densely by autodiff of φ.
    """
    phi = _theta_map(problem_psi)
    if phi is None:
        raise ProblemError("pulled_back_log_density needs a problem made by cd.reparametrize")

    def f(flat_psi: Tensor) -> Tensor:
        logabsdet = torch.linalg.slogdet(jacrev(phi)(flat_psi))[1]
        return log_density_theta(phi(flat_psi)) + logabsdet

    return f


@dataclass(frozen=True)
class Mode:
    """A maximizer of a log-density: the point (flat), the log-density there, its gradient norm, iterations."""

    point: Tensor
    log_density: float
    grad_norm: float
    iterations: int


def maximize(log_density: LogDensity, start: Tensor, *, max_iter: int = 500, tol: float = 1e-10) -> Mode:
    """The mode of a log-density by L-BFGS with strong-Wolfe line search, from ``start`` (flat)."""
    x = start.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = -log_density(x)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError("the log-density is NaN or inf during maximization")
        loss.backward()
        return loss

    opt.step(closure)
    x = x.detach()
    g = torch.func.grad(log_density)(x)
    iters = int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))
    return Mode(x, float(log_density(x).detach()), float(g.norm()), iters)


def laplace_log_evidence(problem: Problem, log_density: LogDensity, mode: Tensor, prior_precision: float = 0.0,
                         logdet: str = "dense") -> float:
    """log Z ≈ log p̃(θ*) + (d/2) log 2π − ½ log det(M(θ*)⁻¹ A), A = −∇² log p̃(θ*), p̃ the Riemannian density
    of M = F + α·R (:func:`metric_matrix`).

    ``log_density`` is the ordinary (Lebesgue) log posterior of these coordinates; ``mode`` should be the mode of
    its Riemannian version (:func:`invariant_map`). ``logdet``: ``dense`` (exact) or ``diag`` (diagonals of F and
    A only: cheap, invariant only under reparametrizations with a diagonal Jacobian).
    """
    if logdet not in ("dense", "diag"):
        raise SolverError(f"logdet must be 'dense' or 'diag', got {logdet!r}")
    riem = riemannian_log_density(problem, log_density, prior_precision)
    A = -hessian(riem)(mode)
    F = metric_matrix(problem, mode, prior_precision)
    if logdet == "dense":
        sa, la = torch.linalg.slogdet(A)
        sf, lf = torch.linalg.slogdet(F)
        if float(sa) <= 0 or float(sf) <= 0:
            raise SolverError("the Laplace approximation needs −∇² log p̃ and F positive definite at the mode")
        ld = float(la - lf)
    else:
        da, df = torch.diagonal(A), torch.diagonal(F)
        if not bool((da > 0).all() and (df > 0).all()):
            raise SolverError("diagonal Laplace needs positive diagonals of −∇² log p̃ and F at the mode")
        ld = float(torch.log(da).sum() - torch.log(df).sum())
    d = mode.numel()
    return float(riem(mode)) + 0.5 * d * math.log(2 * math.pi) - 0.5 * ld


def map_estimate(problem: Problem, log_prior: LogDensity, start: Tensor | None = None, **kw: object) -> Mode:
    """The ordinary MAP: argmax log p(D|θ) + log p(θ) in the problem's coordinates (moves under reparametrization
    when the prior is a density of other coordinates)."""
    ll = log_likelihood(problem)
    start = problem.flatten(problem.params) if start is None else start
    return maximize(lambda x: ll(x) + log_prior(x), start, **kw)  # type: ignore[arg-type]


def invariant_map(problem: Problem, log_prior: LogDensity, prior_precision: float = 0.0,
                  start: Tensor | None = None, **kw: object) -> Mode:
    """argmax log p(D|θ) + log p(θ) − ½ log det M(θ), M = F + α·R: the mode of the posterior w.r.t. the Riemannian
    volume — the same point in every coordinate system."""
    ll = log_likelihood(problem)
    start = problem.flatten(problem.params) if start is None else start
    dens = riemannian_log_density(problem, lambda x: ll(x) + log_prior(x), prior_precision)
    return maximize(dens, start, **kw)  # type: ignore[arg-type]
