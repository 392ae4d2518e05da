"""Stochastic estimators of diag(A) for a symmetric operator A, with entrywise standard errors.

* Hutchinson (Bekas, Kokiopoulou, Saad 2007): diag A ≈ (1/m) Σ_i z_i ⊙ A z_i.
* XDiag (Epperly, Tropp, Webber 2024): the exchangeable low-rank-plus-residual estimator. With Y = AΩ = QR,
  Z = AQ, s_i the normalized i-th column of R⁻ᵀ and P_i = Q(I − s_i s_iᵀ)Qᵀ the leave-one-out projector,

      d_i = diag(P_i A) + ω_i ⊙ (I − P_i) A ω_i
          = Σ_a q_a ⊙ z_a − (Q s_i) ⊙ (Z s_i) + (s_iᵀ r_i) · ω_i ⊙ (Q s_i),

  unbiased for each i; the estimate is their mean. 2 matvecs per probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .orth import orthonormalize
from .space import LinearMap, Vector, VectorSpace, probe_seeds
from .trace import _check_budget


@dataclass
class DiagEstimate:
    """A diagonal estimate and its entrywise standard error, gathered into flat tensors."""

    value: Tensor
    stderr: Tensor
    matvecs: int


def _mean_and_stderr(space: VectorSpace, total: Vector, squares: Vector, m: int) -> tuple[Tensor, Tensor]:
    """Entrywise sample mean and standard error of m samples from their sum and sum of squares."""
    mean = space.scale(1.0 / m, total)
    if m < 2:
        t = space.to_tensor(mean)
        return t, torch.full_like(t, float("inf"))
    var = space.scale(1.0 / (m - 1), space.axpy(-float(m), space.mul(mean, mean), squares))
    return space.to_tensor(mean), space.to_tensor(var).clamp_min(0.0).div(m).sqrt()


def hutchinson_diag(apply: LinearMap, space: VectorSpace, matvecs: int, seed: int = 0,
                    probe: str = "rademacher") -> DiagEstimate:
    """Hutchinson's diagonal estimator with ``matvecs`` probes."""
    _check_budget(matvecs, 1, "hutchinson diagonal")
    total, squares = space.zeros(), space.zeros()
    for s in probe_seeds(seed, matvecs):
        z = space.random(s, probe)
        x = space.mul(z, apply(z))
        total = space.axpy(1.0, x, total)
        squares = space.axpy(1.0, space.mul(x, x), squares)
    mean, err = _mean_and_stderr(space, total, squares, matvecs)
    return DiagEstimate(mean, err, matvecs)


def xdiag(apply: LinearMap, space: VectorSpace, matvecs: int, seed: int = 0,
          probe: str = "rademacher") -> DiagEstimate:
    """XDiag with ``matvecs`` ≥ 4 products (m = ⌊matvecs/2⌋ probes)."""
    _check_budget(matvecs, 4, "xdiag")
    m = matvecs // 2
    Om = [space.random(s, probe) for s in probe_seeds(seed, m)]
    Q, R, kept = orthonormalize(space, [apply(w) for w in Om])
    Z = [apply(q) for q in Q]
    base = space.zeros()
    for q, z in zip(Q, Z):
        base = space.axpy(1.0, space.mul(q, z), base)
    if len(kept) < m:  # range(A) ⊆ span(Q): diag(QQᵀA) is exact
        exact = space.to_tensor(base)
        return DiagEstimate(exact, torch.zeros_like(exact), m + len(Q))
    S = np.linalg.inv(R).T
    S /= np.linalg.norm(S, axis=0, keepdims=True)
    total, squares = space.zeros(), space.zeros()
    for i in range(m):
        Qs, Zs = space.lincomb(S[:, i], Q), space.lincomb(S[:, i], Z)
        d = space.axpy(-1.0, space.mul(Qs, Zs), base)
        d = space.axpy(float(S[:, i] @ R[:, i]), space.mul(Om[i], Qs), d)
        total = space.axpy(1.0, d, total)
        squares = space.axpy(1.0, space.mul(d, d), squares)
    mean, err = _mean_and_stderr(space, total, squares, m)
    return DiagEstimate(mean, err, 2 * m)


DIAG_METHODS = {"hutchinson": hutchinson_diag, "xdiag": xdiag}
