"""NTK parametrization: θ = σ_w/√fan_in · ψ for weights, θ = σ_b · ψ for biases.

In the neural-tangent-kernel parametrization (Jacot et al. 2018) the trainable ψ are O(1) and the layer rescales
them: a weight W of shape (out, *in) with fan_in = prod(in) is W = σ_w/√fan_in · ψ_W, a 1-d (or 0-d) parameter is
b = σ_b · ψ_b. The map is a per-parameter constant scale (a :class:`~.elementwise.Scale` whose factors are fixed
at bind time): J = diag(c), Σ_k g_k ∇²φ_k = 0, J⁻¹ = diag(1/c), log|det J| = Σ_params numel · log c. Its Jacobian
is diagonal, so diagonal metrics (diag GGN, Adam) transform as tensors under it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ...errors import ReparamError
from .elementwise import Scale, _as_names


def _sigma(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ReparamError(f"ntk: {name} must be a finite positive number, got {value!r}")
    return float(value)


class NTK(Scale):
    """θ = σ_w/√fan_in · ψ (ndim ≥ 2, fan_in = prod(shape[1:])), θ = σ_b · ψ (ndim ≤ 1) on ``params``
    (default: every selected parameter); the others are unchanged."""

    kind = "ntk"

    def __init__(self, sigma_w: float = 1.0, sigma_b: float = 1.0, params: str | Sequence[str] | None = None) -> None:
        self.sigma_w = _sigma(sigma_w, "sigma_w")
        self.sigma_b = _sigma(sigma_b, "sigma_b")
        self._names = _as_names(params, self.kind)
        super().__init__(1.0)  # the factors are fixed by _validate_layout at bind time
        self.params = self._names  # Elementwise selects these (all when None) and checks the names

    def _validate_layout(self) -> None:
        chosen = set(self.theta_names if self._names is None else self._names)
        cs: list[float] = []
        for name, shape in zip(self.theta_names, self.theta_shapes):
            if name not in chosen:
                cs.append(1.0)
            elif len(shape) >= 2:
                fan_in = math.prod(shape[1:])
                if fan_in == 0:
                    raise ReparamError(f"ntk: parameter '{name}' of shape {tuple(shape)} has fan_in 0")
                cs.append(self.sigma_w / math.sqrt(fan_in))
            else:
                cs.append(self.sigma_b)
        self._c = tuple(cs)
        self.factors = dict(zip(self.theta_names, cs))

    def __repr__(self) -> str:
        params = list(self._names) if self._names is not None else None
        return f"NTK(sigma_w={self.sigma_w}, sigma_b={self.sigma_b}, params={params})"


def ntk(sigma_w: float = 1.0, sigma_b: float = 1.0, params: str | Sequence[str] | None = None) -> NTK:
    """NTK parametrization θ = σ_w/√fan_in · ψ (weights), σ_b · ψ (biases) on ``params`` (default all)."""
    return NTK(sigma_w, sigma_b, params)
