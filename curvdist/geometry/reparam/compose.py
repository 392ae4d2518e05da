"""Composition θ = φ_o(φ_i(ψ)) of two reparametrizations (``outer`` ∘ ``inner``).

``outer`` is bound to the θ layout; ``inner`` is bound to outer's ψ layout (so it names outer's ψ parameters, e.g.
``"0.weight.g"`` after a weight norm). With χ = φ_i(ψ), J_o = J_o(χ), J_i = J_i(ψ), J = J_o J_i:

    J u                 = J_o (J_i u)
    Jᵀ w                = J_iᵀ (J_oᵀ w)
    Σ_k g_k ∇²φ_k u     = J_iᵀ [Σ_k g_k ∇²φ_o,k(χ) (J_i u)] + Σ_j (J_oᵀ g)_j ∇²φ_i,j(ψ) u
    J⁻¹ t               = J_i⁻¹ (J_o⁻¹ t)
    J⁻ᵀ c               = J_o⁻ᵀ (J_i⁻ᵀ c)
    log|det J|          = log|det J_o(χ)| + log|det J_i(ψ)|
    diag J              = diag J_o(χ) ⊙ diag J_i(ψ)      (when both are diagonal)
    φ⁻¹(θ)              = φ_i⁻¹(φ_o⁻¹(θ))  (a right inverse when either part is one)
"""

from __future__ import annotations

import torch

from ...errors import ReparamError
from .base import Params, Reparametrization
from .elementwise import _check_tensors


class Compose(Reparametrization):
    """θ = outer(inner(ψ))."""

    kind = "compose"

    def __init__(self, outer: Reparametrization, inner: Reparametrization) -> None:
        super().__init__()
        for name, r in (("outer", outer), ("inner", inner)):
            if not isinstance(r, Reparametrization):
                raise ReparamError(f"compose: {name} must be a Reparametrization, got {type(r).__name__}")
        if outer is inner:
            raise ReparamError("compose: outer and inner are the same object; build two instances (each is bound "
                               "to its own layout)")
        self.outer = outer
        self.inner = inner
        self.bijective = outer.bijective and inner.bijective

    def _psi_layout(self) -> tuple[tuple[str, ...], tuple[torch.Size, ...]]:
        self.outer.bind(self.theta_names, self.theta_shapes)
        self.inner.bind(self.outer.psi_names, self.outer.psi_shapes)
        return self.inner.psi_names, self.inner.psi_shapes

    # ------------------------------------------------------------ the map
    def forward(self, psi: Params) -> Params:
        """θ = φ_o(φ_i(ψ))."""
        psi = _check_tensors(self, psi, "psi")
        return self.outer.forward(self.inner.forward(psi))

    def inverse(self, theta: Params) -> Params:
        """ψ = φ_i⁻¹(φ_o⁻¹(θ))."""
        theta = _check_tensors(self, theta, "theta")
        return self.inner.inverse(self.outer.inverse(theta))

    # ------------------------------------------------------------ chain rules
    def jvp(self, psi: Params, u: Params) -> Params:
        """J u = J_o(χ) J_i(ψ) u."""
        chi = self.inner.forward(psi)
        return self.outer.jvp(chi, self.inner.jvp(psi, u))

    def vjp(self, psi: Params, w: Params) -> Params:
        """Jᵀ w = J_i(ψ)ᵀ J_o(χ)ᵀ w."""
        chi = self.inner.forward(psi)
        return self.inner.vjp(psi, self.outer.vjp(chi, w))

    def second_order(self, psi: Params, g: Params, u: Params) -> Params:
        """J_iᵀ [second_order_o(χ, g, J_i u)] + second_order_i(ψ, J_oᵀ g, u)."""
        chi = self.inner.forward(psi)
        outer_part = self.inner.vjp(psi, self.outer.second_order(chi, g, self.inner.jvp(psi, u)))
        inner_part = self.inner.second_order(psi, self.outer.vjp(chi, g), u)
        return tuple(a + b for a, b in zip(outer_part, inner_part))

    def jvp_inverse(self, psi: Params, t: Params) -> Params:
        """J⁻¹ t = J_i⁻¹ J_o⁻¹ t."""
        chi = self.inner.forward(psi)
        return self.inner.jvp_inverse(psi, self.outer.jvp_inverse(chi, t))

    def vjp_inverse(self, psi: Params, c: Params) -> Params:
        """J⁻ᵀ c = J_o⁻ᵀ J_i⁻ᵀ c."""
        chi = self.inner.forward(psi)
        return self.outer.vjp_inverse(chi, self.inner.vjp_inverse(psi, c))

    def logabsdet(self, psi: Params) -> float:
        """log|det J_o(χ)| + log|det J_i(ψ)|."""
        psi = _check_tensors(self, psi, "psi")
        return self.outer.logabsdet(self.inner.forward(psi)) + self.inner.logabsdet(psi)

    def jacobian_diagonal(self, psi: Params) -> Params | None:
        """diag J = diag J_o(χ) ⊙ diag J_i(ψ) when both are diagonal (0-d where both are), else None."""
        psi = _check_tensors(self, psi, "psi")
        inner = self.inner.jacobian_diagonal(psi)
        if inner is None:
            return None
        outer = self.outer.jacobian_diagonal(self.inner.forward(psi))
        if outer is None:
            return None
        return tuple(o * i for o, i in zip(outer, inner))

    def __repr__(self) -> str:
        return f"Compose({self.outer!r}, {self.inner!r})"


def compose(outer: Reparametrization, inner: Reparametrization) -> Compose:
    """θ = outer(inner(ψ)); ``inner`` names outer's ψ parameters."""
    return Compose(outer, inner)
