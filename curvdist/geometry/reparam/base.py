"""Reparametrizations ψ ↦ θ = φ(ψ) of a problem's selected parameters.

A reparametrization is *bound* to the θ layout of a problem (its ``param_names`` and shapes) and then maps tuples
of ψ tensors to tuples of θ tensors. It provides the objects the transformation rules of DESIGN.md §1 need:

=====================  ==========================================  ===========================
method                 math                                        use
=====================  ==========================================  ===========================
``forward(ψ)``         θ = φ(ψ)                                    evaluate the model in ψ
``inverse(θ)``         ψ = φ⁻¹(θ) (raises where it does not exist) move a point to ψ
``jvp(ψ, u)``          J u,   J = ∂θ/∂ψ                            push tangent vectors forward
``vjp(ψ, w)``          Jᵀ w                                        pull covectors / metrics back
``second_order(ψ,g,u)`` Σ_k g_k ∇²_ψ φ_k(ψ) u                      Hessian rule off critical points
``jvp_inverse(ψ, t)``  J⁻¹ t                                       pull tangent vectors back
``vjp_inverse(ψ, c)``  J⁻ᵀ c                                       push covectors forward
``logabsdet(ψ)``       log |det J|                                 densities, pulled-back log-dets
``jacobian_diagonal(ψ)`` diag J per tensor, or None (J not diagonal) damping pulled back to δJᵀJ
=====================  ==========================================  ===========================

Defaults use ``torch.func`` on :meth:`forward`; built-in kinds override them with closed forms, which the tests
check against autodiff on the reparametrized model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp

from ...errors import ReparamError

Params = tuple[Tensor, ...]


class Reparametrization(ABC):
    """θ = φ(ψ). Call :meth:`bind` with the θ layout before use (``cd.reparametrize`` does it)."""

    kind: str = "reparam"
    #: J is square and invertible everywhere on the domain (False for over-parametrizations like weight norm)
    bijective: bool = True

    def __init__(self) -> None:
        self.theta_names: tuple[str, ...] = ()
        self.theta_shapes: tuple[torch.Size, ...] = ()
        self.psi_names: tuple[str, ...] = ()
        self.psi_shapes: tuple[torch.Size, ...] = ()

    # ------------------------------------------------------------ binding
    def bind(self, names: Sequence[str], shapes: Sequence[torch.Size]) -> Reparametrization:
        """Fix the θ layout; computes ``psi_names``/``psi_shapes``. Raises ReparamError on a mismatch."""
        self.theta_names = tuple(names)
        self.theta_shapes = tuple(torch.Size(s) for s in shapes)
        self.psi_names, self.psi_shapes = self._psi_layout()
        return self

    @abstractmethod
    def _psi_layout(self) -> tuple[tuple[str, ...], tuple[torch.Size, ...]]:
        """ψ names and shapes for the bound θ layout (validate names and shapes here)."""

    @property
    def psi_dim(self) -> int:
        return sum(s.numel() for s in self.psi_shapes)

    @property
    def theta_dim(self) -> int:
        return sum(s.numel() for s in self.theta_shapes)

    # ------------------------------------------------------------ the map
    @abstractmethod
    def forward(self, psi: Params) -> Params:
        """θ = φ(ψ)."""

    @abstractmethod
    def inverse(self, theta: Params) -> Params:
        """ψ with φ(ψ) = θ; raises ReparamError where no such ψ exists."""

    # ------------------------------------------------------------ derivatives (defaults by autodiff)
    def jvp(self, psi: Params, u: Params) -> Params:
        """J u."""
        return _jvp(self.forward, (psi,), (u,))[1]

    def vjp(self, psi: Params, w: Params) -> Params:
        """Jᵀ w."""
        return _vjp(self.forward, psi)[1](w)[0]

    def second_order(self, psi: Params, g: Params, u: Params) -> Params:
        """Σ_k g_k ∇²φ_k(ψ) u: the directional derivative of ψ ↦ J(ψ)ᵀ g along u."""
        return _jvp(lambda p: self.vjp(p, g), (psi,), (u,))[1]

    def jvp_inverse(self, psi: Params, t: Params) -> Params:
        """J⁻¹ t."""
        raise ReparamError(f"the {self.kind} reparametrization has no inverse Jacobian")

    def vjp_inverse(self, psi: Params, c: Params) -> Params:
        """J⁻ᵀ c."""
        raise ReparamError(f"the {self.kind} reparametrization has no inverse Jacobian")

    def logabsdet(self, psi: Params) -> float:
        """log |det J(ψ)|."""
        raise ReparamError(f"the {self.kind} reparametrization offers no Jacobian determinant")

    def jacobian_diagonal(self, psi: Params) -> Params | None:
        """The diagonal of J(ψ) when J is diagonal (ψ has θ's layout and θ_i depends on ψ_i alone), else None.

        One tensor per parameter, *broadcastable* to the parameter's shape: 0-d where J is by construction a scalar
        multiple of the identity on that tensor (a number in ``scale``, ``ntk``, an untouched parameter), of the
        parameter's (or a broadcastable) shape where it varies entrywise (``exp``, ``softplus``, a tensor factor
        in ``scale``). The default, for maps that mix entries (``linear``, ``weight_norm``), is None.
        """
        return None

    # ------------------------------------------------------------ flat helpers
    def flatten_psi(self, psi: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in psi])

    def unflatten_psi(self, flat: Tensor) -> Params:
        return _split(flat, self.psi_shapes)

    def flatten_theta(self, theta: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in theta])

    def unflatten_theta(self, flat: Tensor) -> Params:
        return _split(flat, self.theta_shapes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _split(flat: Tensor, shapes: Sequence[torch.Size]) -> Params:
    total = sum(s.numel() for s in shapes)
    if flat.ndim != 1 or flat.numel() != total:
        raise ReparamError(f"expected a flat vector of length {total}, got shape {tuple(flat.shape)}")
    out, i = [], 0
    for s in shapes:
        out.append(flat[i : i + s.numel()].view(s))
        i += s.numel()
    return tuple(out)
