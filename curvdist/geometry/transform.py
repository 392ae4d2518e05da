"""The transformation rules of DESIGN.md §1 on flat vectors, for a bound reparametrization θ = φ(ψ) at a point ψ.

J = ∂θ/∂ψ at ψ. Vectors are flat tensors (length ``r.psi_dim`` in ψ, ``r.theta_dim`` in θ); the point ψ is a tuple
of ψ tensors (``problem.params`` of a reparametrized problem) or a flat ψ vector.

===========================  ==========================================================
tangent vector               v_θ = J v_ψ                          :func:`push_vector`
                             v_ψ = J⁻¹ v_θ                        :func:`pull_vector`
covector (gradient)          g_ψ = Jᵀ g_θ                         :func:`pull_covector`
                             g_θ = J⁻ᵀ g_ψ                        :func:`push_covector`
metric, GGN, Fisher          M_ψ = Jᵀ M_θ J                       :func:`pull_metric`
Hessian                      H_ψ = Jᵀ H_θ J + Σ_k (∂L/∂θ_k) ∇²φ_k  :func:`pull_hessian`
Riemannian Hessian of the    Hess_ψ L = Jᵀ H_θ J                  :func:`riemannian_hessian`
pull-back of a constant M_θ
===========================  ==========================================================

The Hessian rule holds everywhere; its second term vanishes at critical points only. The Riemannian Hessian of the
pull-back metric M_ψ = Jᵀ M_θ J (M_θ constant) is exactly Jᵀ H_θ J at every point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ..errors import ReparamError
from .reparam.base import Params, Reparametrization

FlatMap = Callable[[Tensor], Tensor]


def _point(r: Reparametrization, psi: Sequence[Tensor] | Tensor) -> Params:
    if not r.theta_names:
        raise ReparamError(f"the {r.kind} reparametrization is not bound to a parameter layout; call bind() first")
    if isinstance(psi, Tensor):
        return r.unflatten_psi(psi)
    psi = tuple(psi)
    if len(psi) != len(r.psi_shapes) or any(tuple(t.shape) != tuple(s) for t, s in zip(psi, r.psi_shapes)):
        raise ReparamError(f"the point ψ must match the ψ layout {list(zip(r.psi_names, map(tuple, r.psi_shapes)))}")
    return psi


def _theta(r: Reparametrization, t: Tensor | Sequence[Tensor]) -> Params:
    return r.unflatten_theta(t) if isinstance(t, Tensor) else tuple(t)


def push_vector(r: Reparametrization, psi: Sequence[Tensor] | Tensor, u: Tensor) -> Tensor:
    """v_θ = J u: a tangent vector of ψ coordinates in θ coordinates."""
    p = _point(r, psi)
    return r.flatten_theta(r.jvp(p, r.unflatten_psi(u)))


def pull_vector(r: Reparametrization, psi: Sequence[Tensor] | Tensor, t: Tensor) -> Tensor:
    """v_ψ = J⁻¹ t: a tangent vector of θ coordinates in ψ coordinates (bijective kinds only)."""
    p = _point(r, psi)
    return r.flatten_psi(r.jvp_inverse(p, r.unflatten_theta(t)))


def pull_covector(r: Reparametrization, psi: Sequence[Tensor] | Tensor, g: Tensor) -> Tensor:
    """g_ψ = Jᵀ g: a covector (gradient) of θ coordinates in ψ coordinates."""
    p = _point(r, psi)
    return r.flatten_psi(r.vjp(p, r.unflatten_theta(g)))


def push_covector(r: Reparametrization, psi: Sequence[Tensor] | Tensor, c: Tensor) -> Tensor:
    """g_θ = J⁻ᵀ c: a covector of ψ coordinates in θ coordinates (bijective kinds only)."""
    p = _point(r, psi)
    return r.flatten_theta(r.vjp_inverse(p, r.unflatten_psi(c)))


def pull_metric(r: Reparametrization, psi: Sequence[Tensor] | Tensor, metric_apply: FlatMap) -> FlatMap:
    """v ↦ Jᵀ M_θ (J v): the pull-back M_ψ = Jᵀ M_θ J of a metric (or GGN/Fisher) given as θ products."""
    p = _point(r, psi)

    def apply(v: Tensor) -> Tensor:
        return r.flatten_psi(r.vjp(p, r.unflatten_theta(metric_apply(r.flatten_theta(r.jvp(p, r.unflatten_psi(v)))))))

    return apply


def pull_hessian(r: Reparametrization, psi: Sequence[Tensor] | Tensor, hessian_apply: FlatMap,
                 grad_theta: Tensor | Sequence[Tensor]) -> FlatMap:
    """v ↦ Jᵀ H_θ (J v) + Σ_k (∇_θL)_k ∇²φ_k(ψ) v: the Hessian in ψ, valid at every point.

    ``hessian_apply`` is v_θ ↦ H_θ v_θ on flat θ vectors, ``grad_theta`` is ∇_θL at θ = φ(ψ) (flat or
    parameter-shaped).
    """
    p = _point(r, psi)
    g = _theta(r, grad_theta)
    base = pull_metric(r, p, hessian_apply)

    def apply(v: Tensor) -> Tensor:
        return base(v) + r.flatten_psi(r.second_order(p, g, r.unflatten_psi(v)))

    return apply


def riemannian_hessian(r: Reparametrization, psi: Sequence[Tensor] | Tensor, hessian_apply: FlatMap) -> FlatMap:
    """v ↦ Jᵀ H_θ (J v): the Riemannian Hessian in ψ for the pull-back of a constant θ metric (exact everywhere,
    not only at critical points: the Christoffel term cancels the second-order term of the Hessian rule)."""
    return pull_metric(r, psi, hessian_apply)


__all__ = ["pull_covector", "pull_hessian", "pull_metric", "pull_vector", "push_covector", "push_vector",
           "riemannian_hessian"]
