"""Stochastic trace estimators for a symmetric operator A, each with a standard error.

* Hutchinson (1989): tr A ≈ (1/m) Σ_i z_iᵀ A z_i with Rademacher (or Gaussian) probes z_i.
* Hutch++ (Meyer, Musco, Musco, Woodruff 2021): project out a sketched top subspace Q = orth(A S) and estimate
  the rest by Hutchinson, tr A ≈ tr(QᵀAQ) + (1/g) Σ_i z_iᵀ(I−QQᵀ)A(I−QQᵀ)z_i; matvecs split ⅓ each.
* XTrace (Epperly, Tropp, Webber 2024): the exchangeable version of Hutch++ that uses every probe both for the
  sketch and for the residual estimate (leave-one-out subspaces); 2 matvecs per probe.

The standard error is the sample standard deviation of the per-probe (or leave-one-out) estimates over √count;
for XTrace it follows the paper's error estimate, which treats the leave-one-out estimates as independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SolverError
from .orth import orthonormalize
from .space import LinearMap, VectorSpace, probe_seeds


@dataclass
class Estimate:
    """A stochastic estimate: value, standard error, matvecs used and the per-probe samples."""

    value: float
    stderr: float
    matvecs: int
    samples: np.ndarray


def _stderr(samples: np.ndarray) -> float:
    return float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("inf")


def _check_budget(matvecs: int, minimum: int, method: str) -> None:
    if not isinstance(matvecs, (int, np.integer)) or matvecs < minimum:
        raise SolverError(f"{method} needs a budget of at least {minimum} matvecs, got {matvecs!r}")


def hutchinson(apply: LinearMap, space: VectorSpace, matvecs: int, seed: int = 0,
               probe: str = "rademacher") -> Estimate:
    """Hutchinson's estimator with ``matvecs`` probes."""
    _check_budget(matvecs, 1, "hutchinson")
    samples = np.empty(matvecs)
    for i, s in enumerate(probe_seeds(seed, matvecs)):
        z = space.random(s, probe)
        samples[i] = space.dot(z, apply(z))
    return Estimate(float(samples.mean()), _stderr(samples), matvecs, samples)


def hutchpp(apply: LinearMap, space: VectorSpace, matvecs: int, seed: int = 0,
            probe: str = "rademacher") -> Estimate:
    """Hutch++ with ``matvecs`` ≥ 3 products: ⌊m/3⌋ sketch probes, as many for QᵀAQ, the rest for Hutchinson."""
    _check_budget(matvecs, 3, "hutchpp")
    k = matvecs // 3
    g = matvecs - 2 * k
    seeds = probe_seeds(seed, k + g)
    Y = [apply(space.random(s, probe)) for s in seeds[:k]]
    Q, _, _ = orthonormalize(space, Y)
    AQ = [apply(q) for q in Q]
    low_rank = sum(space.dot(q, aq) for q, aq in zip(Q, AQ))
    samples = np.empty(g)
    for i, s in enumerate(seeds[k:]):
        z = space.random(s, probe)
        z = space.axpy(-1.0, space.lincomb(space.dots(Q, z), Q), z)
        samples[i] = space.dot(z, apply(z))
    used = k + len(Q) + g
    return Estimate(float(low_rank + samples.mean()), _stderr(samples), used, low_rank + samples)


def xtrace(apply: LinearMap, space: VectorSpace, matvecs: int, seed: int = 0,
           probe: str = "rademacher") -> Estimate:
    """XTrace with ``matvecs`` ≥ 4 products (m = ⌊matvecs/2⌋ probes ω_i, Y = AΩ, Z = AQ).

    With Y = QR, W = QᵀΩ, H = QᵀAQ and s_i the normalized i-th column of R⁻ᵀ (orthogonal to every y_j, j ≠ i),
    the leave-one-out projector is P_i = Q(I − s_i s_iᵀ)Qᵀ and the i-th estimate

        t_i = tr(P_i A P_i) + ω_iᵀ(I−P_i)A(I−P_i)ω_i
            = tr H − s_iᵀHs_i + w_iᵀr_i − 2c_iᵀr_i + c_iᵀHc_i,   c_i = w_i − s_i(s_iᵀw_i),

    is unbiased because ω_i is independent of P_i; every quantity is an m×m Gram matrix. When Y is numerically
    rank-deficient, range(A) ⊆ span(Q) and tr(QᵀAQ) is exact.
    """
    _check_budget(matvecs, 4, "xtrace")
    m = matvecs // 2
    Om = [space.random(s, probe) for s in probe_seeds(seed, m)]
    Y = [apply(w) for w in Om]
    Q, R, kept = orthonormalize(space, Y)
    Z = [apply(q) for q in Q]
    H = np.array([space.dots(Q, z) for z in Z]).T
    H = 0.5 * (H + H.T)
    trH = float(np.trace(H))
    if len(kept) < m:
        return Estimate(trH, 0.0, m + len(Q), np.full(m, trH))
    W = np.array([space.dots(Q, w) for w in Om]).T  # W[:, i] = Qᵀω_i
    S = np.linalg.inv(R).T
    S /= np.linalg.norm(S, axis=0, keepdims=True)
    samples = np.empty(m)
    for i in range(m):
        s, w, r = S[:, i], W[:, i], R[:, i]
        c = w - s * (s @ w)
        samples[i] = trH - s @ H @ s + w @ r - 2.0 * (c @ r) + c @ H @ c
    return Estimate(float(samples.mean()), _stderr(samples), 2 * m, samples)


TRACE_METHODS = {"hutchinson": hutchinson, "hutchpp": hutchpp, "xtrace": xtrace}
