"""The invariant Laplace evidence past toy size: structured metrics whose log-determinant is cheap and
differentiable in the parameters (Kristiadi, Dangel & Hennig 2023, "The Geometry of Neural Nets' Parameter Spaces
Under Reparametrization", §5; DESIGN §8).

The log-density w.r.t. the Riemannian volume of M(θ) = F(θ) + α·I_θ (F the likelihood's curvature in a chosen
structure, α the precision of a Gaussian prior in θ),

    log p̃(θ) = log p(D | θ) + log p(θ) − ½ log det M(θ),       log p(θ) = −(α/2)‖θ‖² + (d/2) log(α/2π),

is a scalar: in ψ coordinates (θ = φ(ψ)) the prior is pulled back (+ log|det J|) and M_ψ = JᵀM_θJ
(log det M_ψ = log det M_θ + 2 log|det J|), so p̃_ψ = p̃_θ ∘ φ and its mode θ* is one point in every coordinate system.

:func:`log_det_metric` is log det M(θ) as a differentiable function of the flat parameters, for metrics whose
blocks are formed from per-layer statistics (no n × n matrix, no full Jacobian):

* ``kflr`` (Botev et al. 2017): per ``Linear`` weight log det(G ⊗ A + αI) = Σ_ij log(λ_i(G) μ_j(A) + α), per bias
  Σ_i log(λ_i(G) + α), with G = Σ_n Σ_c b_nc b_ncᵀ (b_nc the backpropagated columns of Λ_n's factor, here
  differentiated through the softmax too) and A = (1/N) Σ_n a_n a_nᵀ — the blocks of :func:`curvdist.metric`'s
  ``kflr`` for these layers;
* ``diag_ggn``: Σ log(diag F + α), diag F = Σ_{n,c} (b_nc² ⊗ a_n²) per weight, Σ b_nc² per bias.

They cover models whose selected parameters are the weights and biases of ``nn.Linear`` layers applied once per
sample (MLPs; any elementwise activations between them) under the cross-entropy or MSE loss; anything else is
refused with the dense alternative named. The problem's reduction does not matter: the sums here are over the data
set (the likelihood of all samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MetricError, ProblemError
from ..problem.base import BaseProblem
from ..problem.problem import Problem

#: metric kinds with a differentiable structured log-determinant
STRUCTURED_EVIDENCE_METRICS = ("kflr", "diag_ggn")


def theta_of(problem: BaseProblem) -> tuple[Problem, Callable[[Tensor], Tensor], float]:
    """(θ problem, ψ ↦ θ on flat vectors (differentiable), log|det J|) for a problem made by ``cd.reparametrize`` with
    a Jacobian that is a scalar multiple of the identity on every tensor (θ_p = c_p ψ_p: ``scale`` by numbers,
    ``ntk``); (problem, identity, 0) for a problem in θ. Other reparametrizations are refused: the structured
    metrics are tensors only under these (see :mod:`curvdist.geometry.metrics.kfac`)."""
    from .reparam.reparametrize import not_scalar_per_tensor, psi_jacobian

    found = psi_jacobian(problem, "the invariant evidence")  # type: ignore[arg-type]
    if found is None:
        return problem, (lambda x: x), 0.0  # type: ignore[return-value]
    model, diag = found
    r, theta = model.reparam, model.theta_problem
    why = not_scalar_per_tensor(r, diag)
    if why is not None:
        raise MetricError(f"the structured invariant evidence needs a Jacobian that is a scalar multiple of the "
                          f"identity on every tensor; the {r.kind} reparametrization does not ({why})")
    log_abs_det = float(sum(shape.numel() * math.log(abs(float(c))) for shape, c in zip(problem.shapes, diag)))

    def phi(flat: Tensor) -> Tensor:
        return r.flatten_theta(r.forward(r.unflatten_psi(flat)))

    return theta, phi, log_abs_det


def gaussian_log_prior(flat_theta: Tensor, precision: float) -> Tensor:
    """log N(θ; 0, α⁻¹I) = −(α/2)‖θ‖² + (d/2) log(α/2π), normalized."""
    d = flat_theta.numel()
    return -0.5 * precision * (flat_theta * flat_theta).sum() + 0.5 * d * math.log(precision / (2 * math.pi))


def _linear_layers(problem: Problem) -> list[tuple[str, nn.Linear, str | None, str | None]]:
    """(path, module, weight name, bias name) of every Linear holding selected parameters; refuses parameters
    outside Linear layers."""
    selected = set(problem.param_names)
    layers, covered = [], set()
    for path, m in problem.model.named_modules():
        if type(m) is not nn.Linear:
            continue
        w, b = f"{path}.weight" if path else "weight", f"{path}.bias" if path else "bias"
        w, b = (w if w in selected else None), (b if m.bias is not None and b in selected else None)
        if w or b:
            layers.append((path, m, w, b))
            covered.update(n for n in (w, b) if n)
    missing = sorted(selected - covered)
    if missing:
        raise MetricError(f"the differentiable structured log det M covers the parameters of nn.Linear layers only; "
                          f"{missing} are not (use the dense route, metric kind 'fisher', on small models)")
    return layers


def _lambda_factor(problem: Problem, out: Tensor, y: Tensor) -> Tensor:
    """Columns S (C, B, C) of Λ_n = S_n S_nᵀ, differentiable in the outputs: √p_c (e_c − p) for cross-entropy
    (through the softmax), the constant factor of the MSE loss."""
    from ..problem.losses import CrossEntropy, MeanSquaredError, softmax_hessian_factor

    loss = problem.loss
    if isinstance(loss, CrossEntropy):
        return softmax_hessian_factor(out)
    if isinstance(loss, MeanSquaredError):
        return loss.output_hessian_sqrt(out, y)  # constant
    raise MetricError(f"the differentiable structured log det M supports the cross_entropy and mse losses, not "
                      f"{loss.name!r}")


def layer_statistics(problem: Problem, flat: Tensor) -> dict[str, dict[str, Tensor]]:
    """Per Linear layer path: ``A`` = Σ_n a aᵀ, ``G`` = Σ_{n,c} b bᵀ, ``a2b2`` = Σ_{n,c} (b²)ᵀ(a²) (out × in),
    ``b2`` = Σ_{n,c} b², and ``N``; all differentiable in ``flat`` (create_graph backward through the probes)."""
    layers = _linear_layers(problem)
    stats: dict[str, dict[str, Any]] = {path: {} for path, *_ in layers}
    params = problem.unflatten(flat)
    for X, y in problem.batches():
        inputs: dict[str, Tensor] = {}
        probes: dict[str, Tensor] = {}
        handles = []
        for path, m, _, _ in layers:
            def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor, path: str = path) -> Tensor:
                if path in inputs or args[0].ndim != 2:
                    raise MetricError(f"layer {path!r} is called more than once or on inputs that are not (batch, "
                                      f"features): its structured block here is for MLP layers")
                inputs[path] = args[0]
                probes[path] = torch.zeros_like(output, requires_grad=True)
                return output + probes[path]
            handles.append(m.register_forward_hook(hook))
        try:
            out = problem.forward(params, X)
        finally:
            for h in handles:
                h.remove()
        S = _lambda_factor(problem, out, y)
        order = [path for path, *_ in layers]
        for c in range(S.shape[0]):
            # b = (∂f/∂z)ᵀ S_c: S_c is the cotangent (differentiable in θ itself through create_graph)
            grads = torch.autograd.grad(out, [probes[p] for p in order], grad_outputs=S[c], create_graph=True)
            for path, b in zip(order, grads):
                a, st = inputs[path], stats[path]
                for key, value in (("G", b.T @ b), ("a2b2", (b * b).T @ (a * a)), ("b2", (b * b).sum(0))):
                    st[key] = value if key not in st else st[key] + value
        for path in order:
            a, st = inputs[path], stats[path]
            st["A"] = a.T @ a if "A" not in st else st["A"] + a.T @ a
            st["N"] = a.shape[0] + st.get("N", 0)
    return stats


def log_det_metric(problem: Problem, kind: str, precision: float) -> Callable[[Tensor], Tensor]:
    """θ ↦ log det(F(θ) + αI) for the structured ``kind`` (``kflr`` or ``diag_ggn``; see the module docstring),
    F summed over the data set, as a differentiable function of the flat parameters of ``problem`` (in θ)."""
    if kind not in STRUCTURED_EVIDENCE_METRICS:
        raise MetricError(f"a differentiable structured log det M exists for {list(STRUCTURED_EVIDENCE_METRICS)}, "
                          f"not {kind!r}")
    layers = _linear_layers(problem)

    def f(flat: Tensor) -> Tensor:
        stats = layer_statistics(problem, flat)
        total = flat.new_zeros(())
        for path, _, w, b in layers:
            st = stats[path]
            if kind == "kflr":
                lam_g = torch.linalg.eigvalsh(st["G"]).clamp_min(0)
                if w:
                    mu_a = torch.linalg.eigvalsh(st["A"] / st["N"]).clamp_min(0)
                    total = total + torch.log(torch.outer(lam_g, mu_a) + precision).sum()
                if b:
                    total = total + torch.log(lam_g + precision).sum()
            else:
                if w:
                    total = total + torch.log(st["a2b2"] + precision).sum()
                if b:
                    total = total + torch.log(st["b2"] + precision).sum()
        return total

    return f


def log_likelihood_sum(problem: BaseProblem) -> Callable[[Tensor], Tensor]:
    """x ↦ log p(D | x) = −Σ_n ℓ_n (all samples, whatever the problem's reduction), differentiable."""
    if not isinstance(problem, Problem):
        raise ProblemError("the invariant evidence needs the parameters in this process (a local problem)")

    def f(flat: Tensor) -> Tensor:
        params = problem.unflatten(flat)
        return -sum(problem.batch_loss(params, X, y) for X, y in problem.batches())  # type: ignore[return-value]

    return f


def riemannian_log_posterior(problem: BaseProblem, kind: str, precision: float) -> Callable[[Tensor], Tensor]:
    """x ↦ log p̃(x) = log p(D|x) + log p(x) − ½ log det M(x) in the problem's coordinates (θ, or ψ of a
    per-tensor-scalar reparametrization: prior pulled back with log|det J|, log det M_ψ = log det M_θ(φ(x)) +
    2 log|det J|) — a scalar function of the point."""
    if not precision > 0:
        raise MetricError(f"the invariant evidence needs a prior precision α > 0, got {precision!r}")
    theta, phi, log_abs_det_j = theta_of(problem)
    ll = log_likelihood_sum(problem)
    logdet_theta = log_det_metric(theta, kind, precision)

    def f(x: Tensor) -> Tensor:
        t = phi(x)
        log_prior = gaussian_log_prior(t, precision) + log_abs_det_j
        return ll(x) + log_prior - 0.5 * (logdet_theta(t) + 2 * log_abs_det_j)

    return f
