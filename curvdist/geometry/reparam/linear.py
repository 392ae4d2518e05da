"""A dense invertible linear map of the whole flat parameter vector: θ_flat = A ψ_flat (tiny models only).

J = A everywhere, so J u = A u, Jᵀ w = Aᵀ w, Σ_k g_k ∇²φ_k = 0, J⁻¹ t = A⁻¹ t, J⁻ᵀ c = A⁻ᵀ c (by solves), and
log|det J| = log|det A| (by slogdet). It mixes all parameters, so no diagonal metric is a tensor under it: it is
the test bed for "invariant under every reparametrization". ψ keeps θ's names and shapes (ψ_flat is cut like θ_flat).

A is given, or generated from ``seed`` as Q₁ diag(s) Q₂ᵀ with random orthogonal Q₁, Q₂ and singular values s
log-spaced in [κ^{-1/2}, κ^{1/2}] (κ = ``condition``), so cond(A) = κ and |det A| ≈ 1 in geometric mean.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...errors import ReparamError
from .base import Params, Reparametrization
from .elementwise import _check_tensors


def random_well_conditioned(d: int, condition: float = 10.0, seed: int = 0) -> Tensor:
    """Q₁ diag(logspace(−½ log₁₀ κ, ½ log₁₀ κ, d)) Q₂ᵀ in float64: a random d×d matrix with condition number κ."""
    g = torch.Generator().manual_seed(int(seed))
    Q1, R1 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Q2, R2 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Q1, Q2 = Q1 * torch.sign(torch.diagonal(R1)), Q2 * torch.sign(torch.diagonal(R2))  # Haar-distributed
    half = 0.5 * math.log10(condition)
    s = torch.logspace(-half, half, d, dtype=torch.float64)
    return (Q1 * s) @ Q2.T


class Linear(Reparametrization):
    """θ_flat = A ψ_flat over all selected parameters."""

    kind = "linear"

    def __init__(self, A: Tensor | None = None, seed: int = 0, condition: float = 10.0) -> None:
        super().__init__()
        if A is not None:
            if not isinstance(A, Tensor):
                try:
                    A = torch.as_tensor(A, dtype=torch.float64)
                except (TypeError, ValueError, RuntimeError) as e:
                    raise ReparamError(f"linear: A must be a square matrix, got {type(A).__name__} ({e})") from None
            if A.ndim != 2 or A.shape[0] != A.shape[1]:
                raise ReparamError(f"linear: A must be a square matrix, got shape {tuple(A.shape)}")
            if not A.is_floating_point():
                A = A.double()
            if not bool(torch.isfinite(A).all()):
                raise ReparamError("linear: A contains NaN or inf entries")
            _check_invertible(A)
            A = A.detach().clone()
        else:
            if isinstance(condition, bool) or not isinstance(condition, (int, float)) \
                    or not math.isfinite(condition) or condition < 1:
                raise ReparamError(f"linear: condition must be a finite number ≥ 1, got {condition!r}")
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ReparamError(f"linear: seed must be an integer, got {seed!r}")
        self.A_given = A
        self.seed = seed
        self.condition = float(condition)
        self.A: Tensor = torch.empty(0, 0, dtype=torch.float64)
        self._logabsdet = 0.0
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    # ------------------------------------------------------------ layout
    def _psi_layout(self) -> tuple[tuple[str, ...], tuple[torch.Size, ...]]:
        d = self.theta_dim
        if self.A_given is not None:
            if tuple(self.A_given.shape) != (d, d):
                raise ReparamError(f"linear: A has shape {tuple(self.A_given.shape)}, but the selected parameters "
                                   f"have {d} entries in all, so A must be {d}x{d}")
            self.A = self.A_given
        else:
            self.A = random_well_conditioned(d, self.condition, self.seed)
        self._logabsdet = float(torch.linalg.slogdet(self.A.double())[1])
        self._cache = {}
        return self.theta_names, self.theta_shapes

    def _matrix(self, like: Tensor) -> Tensor:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = self.A.to(dtype=like.dtype, device=like.device)
        return self._cache[key]

    def _flat(self, tensors: Params) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _split(self, flat: Tensor, shapes: tuple[torch.Size, ...]) -> Params:
        return tuple(p.reshape(s) for p, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes))

    # ------------------------------------------------------------ the map
    def forward(self, psi: Params) -> Params:
        """θ_flat = A ψ_flat."""
        psi = _check_tensors(self, psi, "psi")
        return self.jvp(psi, psi)

    def inverse(self, theta: Params) -> Params:
        """ψ_flat = A⁻¹ θ_flat (by a solve)."""
        theta = _check_tensors(self, theta, "theta")
        return self.jvp_inverse(theta, theta)

    # ------------------------------------------------------------ closed-form derivatives
    def jvp(self, psi: Params, u: Params) -> Params:
        """J u = A u."""
        x = self._flat(u)
        return self._split(self._matrix(x) @ x, self.theta_shapes)

    def vjp(self, psi: Params, w: Params) -> Params:
        """Jᵀ w = Aᵀ w."""
        x = self._flat(w)
        return self._split(self._matrix(x).T @ x, self.psi_shapes)

    def second_order(self, psi: Params, g: Params, u: Params) -> Params:
        """Σ_k g_k ∇²φ_k u = 0 (φ is linear)."""
        return tuple(torch.zeros_like(t) for t in u)

    def jvp_inverse(self, psi: Params, t: Params) -> Params:
        """J⁻¹ t = A⁻¹ t."""
        x = self._flat(t)
        return self._split(torch.linalg.solve(self._matrix(x), x), self.psi_shapes)

    def vjp_inverse(self, psi: Params, c: Params) -> Params:
        """J⁻ᵀ c = A⁻ᵀ c."""
        x = self._flat(c)
        return self._split(torch.linalg.solve(self._matrix(x).T, x), self.theta_shapes)

    def logabsdet(self, psi: Params) -> float:
        """log|det A| (slogdet, computed once at bind time)."""
        _check_tensors(self, psi, "psi")
        return self._logabsdet

    def __repr__(self) -> str:
        if self.A_given is not None:
            return f"Linear(A=<{self.A_given.shape[0]}x{self.A_given.shape[1]}>)"
        return f"Linear(seed={self.seed}, condition={self.condition})"


def _check_invertible(A: Tensor) -> None:
    s = torch.linalg.svdvals(A.double())
    d = A.shape[0]
    if d == 0:
        raise ReparamError("linear: A is empty")
    smax, smin = float(s[0]), float(s[-1])
    tol = smax * d * torch.finfo(torch.float64).eps
    if not smin > tol:
        cond = "inf" if smin == 0 else f"{smax / smin:.3g}"
        raise ReparamError(f"linear: A is singular (smallest singular value {smin:.3g}, condition number {cond}); "
                           "θ = A ψ must be invertible")


def linear(A: Tensor | None = None, seed: int = 0, condition: float = 10.0) -> Linear:
    """θ_flat = A ψ_flat; A given (d×d, invertible) or random from ``seed`` with condition number ``condition``."""
    return Linear(A, seed, condition)
