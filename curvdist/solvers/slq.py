"""Stochastic Lanczos quadrature (SLQ) for spectral sums tr f(A) and the spectral density of A.

For a probe z, m Lanczos steps from z/‖z‖ give T_m = U diag(θ) Uᵀ, and zᵀ f(A) z ≈ ‖z‖² Σ_k τ_k f(θ_k) with
τ_k = U_{1k}² (Gauss quadrature of the spectral measure seen by z). Averaging over probes estimates tr f(A)
(Ubaru, Chen, Saad 2017). The same nodes and weights, smoothed by a Gaussian kernel, estimate the spectral
density φ(t) = (1/d) Σ_i δ(t − λ_i) (Lin, Saad, Yang 2016; Ghorbani, Krishnan, Xiao 2019).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NotPositiveDefiniteError, SolverError
from .lanczos import lanczos, lanczos_lockstep
from .space import BlockMap, LinearMap, VectorSpace, check_block, probe_seeds


@dataclass
class Quadrature:
    """Per-probe Gauss quadrature rules: nodes θ, weights τ (each rule sums to 1) and ‖z‖²."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    norms2: np.ndarray
    matvecs: int


def quadrature(apply: LinearMap, space: VectorSpace, probes: int, steps: int, seed: int = 0,
               probe: str = "rademacher", *, block_apply: BlockMap | None = None, block: int | None = None,
               ) -> Quadrature:
    """Run ``probes`` Lanczos processes of ``steps`` steps (full reorthogonalization) from random probes.

    Default: one process after the other, one product ``apply(q)`` per step. Opt-in block products:
    with ``block_apply`` ([x₁ … x_p] ↦ [A x₁ … A x_p] in one call, e.g. ``op.apply_vectors``) the processes run in
    groups of ``block`` (default: all ``probes``) advanced in lockstep
    (:func:`~curvdist.solvers.lanczos.lanczos_lockstep`): each step multiplies the current vectors of the group's
    processes as one block. The probes and the quadrature are the same; the numbers differ only by the rounding of
    the batched products. Memory: a group holds its processes' Krylov bases together (``block · steps`` vectors).
    """
    if not isinstance(probes, (int, np.integer)) or probes < 1:
        raise SolverError(f"probes must be a positive integer, got {probes!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise SolverError(f"lanczos steps must be a positive integer, got {steps!r}")
    check_block(block_apply, block)
    nodes, weights, norms2, used = [], [], [], 0
    seeds = probe_seeds(seed, probes)
    group = 1 if block_apply is None else (probes if block is None else int(block))
    for first in range(0, probes, group):
        zs = [space.random(s, probe) for s in seeds[first:first + group]]
        if block_apply is None:
            states = [lanczos(apply, space, z, steps, restart=False) for z in zs]
        else:
            states = lanczos_lockstep(block_apply, space, zs, steps, restart=False)
        for z, state in zip(zs, states):
            theta, U = state.tridiagonal_eigh()
            nodes.append(theta)
            weights.append(U[0, :] ** 2)
            norms2.append(space.dot(z, z))
            used += state.matvecs
    return Quadrature(nodes, weights, np.asarray(norms2), used)


def spectral_sum(q: Quadrature, f: np.ufunc | object) -> tuple[float, float, np.ndarray]:
    """tr f(A) ≈ mean over probes of ‖z‖² Σ_k τ_k f(θ_k); returns (value, stderr, per-probe samples)."""
    samples = np.array([n2 * float(np.sum(w * f(t))) for t, w, n2 in zip(q.nodes, q.weights, q.norms2)])
    err = float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    return float(samples.mean()), err, samples


def logdet(q: Quadrature, shift: float = 0.0) -> tuple[float, float, np.ndarray]:
    """log det(A + shift·I) ≈ tr log(A + shift·I); refuses when a Ritz value of A + shift·I is ≤ 0."""
    low = min(float(t.min()) for t in q.nodes) + shift
    if not low > 0:
        raise NotPositiveDefiniteError(
            f"log-det needs a positive-definite operator, but A + {shift:g}·I has a Ritz value {low:.3e} ≤ 0; "
            "add damping (a positive shift) or use a positive semi-definite curvature (ggn/fisher) with damping"
        )
    return spectral_sum(q, lambda t: np.log(t + shift))


def density(q: Quadrature, grid: np.ndarray | int = 1000, sigma: float | None = None,
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Gaussian-smoothed spectral density on ``grid`` (points, or their number); returns (grid, φ, σ).

    φ(t) = (1/P) Σ_probes Σ_k τ_k N(t; θ_k, σ²), integrating to 1. Default σ: 1% of the Ritz-value range.
    """
    lo = min(float(t.min()) for t in q.nodes)
    hi = max(float(t.max()) for t in q.nodes)
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    if sigma is None:
        sigma = 0.01 * span
    if not sigma > 0:
        raise SolverError(f"density kernel width sigma must be positive, got {sigma!r}")
    if isinstance(grid, (int, np.integer)):
        grid = np.linspace(lo - 0.05 * span - 3 * sigma, hi + 0.05 * span + 3 * sigma, int(grid))
    grid = np.asarray(grid, dtype=np.float64)
    phi = np.zeros_like(grid)
    for t, w in zip(q.nodes, q.weights):
        phi += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2)).sum(1)
    phi /= len(q.nodes) * sigma * np.sqrt(2 * np.pi)
    return grid, phi, float(sigma)
