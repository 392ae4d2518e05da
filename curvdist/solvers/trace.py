"""Stochastic trace estimators for a symmetric operator A, each with a standard error.

* Hutchinson (1989): tr A ≈ (1/m) Σ_i z_iᵀ A z_i with Rademacher (or Gaussian) probes z_i.
* Hutch++ (Meyer, Musco, Musco, Woodruff 2021): project out a sketched top subspace Q = orth(A S) and estimate
  the rest by Hutchinson, tr A ≈ tr(QᵀAQ) + (1/g) Σ_i z_iᵀ(I−QQᵀ)A(I−QQᵀ)z_i; matvecs split ⅓ each.
* XTrace (Epperly, Tropp, Webber 2024): the exchangeable version of Hutch++ that uses every probe both for the
  sketch and for the residual estimate (leave-one-out subspaces); 2 matvecs per probe.

The standard error is the sample standard deviation of the per-probe (or leave-one-out) estimates over √count;
for XTrace it follows the paper's error estimate, which treats the leave-one-out estimates as independent.

Block products (opt-in). Every estimator takes ``block_apply`` (e.g. ``op.apply_vectors`` of a curvature operator:
[x₁ … x_k] ↦ [A x₁ … A x_k] in one batched pass) and ``block`` (at most that many vectors per call, default all):
the products that do not depend on each other — Hutchinson's probes; Hutch++'s sketch A S, then A Q, then its
residual probes; XTrace's A Ω, then A Q — are then taken as blocks. The estimators and their probes are the
same; the numbers differ from the default single products (``apply``, one vector at a time: the default, whose
results are unchanged) only by the rounding of the batched products.

Memory. The estimators hold only the vectors they still use. Hutch++ (k sketch probes): the sketch A S and its
orthonormal basis Q side by side while orthonormalizing (2k + 2 vectors at most), then Q and one probe with its
product (each A q is dropped once qᵀAq is taken), and Q and one probe while a residual probe is made (in place, on
spaces with ``sub_lincomb``; three vectors beside Q on others). A space whose bases live off its working memory
(``bases_off_memory``: pipeline stages with ``basis_on_disk``) holds Q as a basis there. XTrace (m probes): Ω, AΩ
and Q while orthonormalizing, then Ω, Q and one product (AQ enters QᵀAQ a column at a time). Hutchinson: one probe
and its product. Every probe and its product are let go before the next product is taken. That counts at scale: at
774M parameters in 4 pipeline stages a vector is 0.9 GB a stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import SolverError
from .orth import orthonormalize
from .space import BlockMap, LinearMap, Vector, VectorSpace, apply_all, check_block, probe_seeds, products


@dataclass
class Estimate:
    """A stochastic estimate: value, standard error, matvecs used and the per-probe samples."""

    value: float
    stderr: float
    matvecs: int
    samples: np.ndarray


def _stderr(samples: np.ndarray) -> float:
    return float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("inf")


def _quadratic_forms(space: VectorSpace, pairs: Iterator[tuple[Vector, Vector]], count: int) -> np.ndarray:
    """[zᵀ(Az) for the first ``count`` pairs (z, Az)], each pair let go before the next product is taken (a ``for``
    loop's variables, and ``enumerate``'s cached tuple, would keep two vectors more alive beside every product)."""
    out = np.empty(count)
    for i in range(count):
        z, az = next(pairs)
        out[i] = space.dot(z, az)
        del z, az
    return out


def _check_budget(matvecs: int, minimum: int, method: str) -> None:
    if not isinstance(matvecs, (int, np.integer)) or matvecs < minimum:
        raise SolverError(f"{method} needs a budget of at least {minimum} matvecs, got {matvecs!r}")


def hutchinson(apply: LinearMap, space: VectorSpace, matvecs: int, seed: int = 0, probe: str = "rademacher", *,
               block_apply: BlockMap | None = None, block: int | None = None) -> Estimate:
    """Hutchinson's estimator with ``matvecs`` probes; ``block_apply``/``block``: the probes' products as blocks
    (module docstring)."""
    _check_budget(matvecs, 1, "hutchinson")
    check_block(block_apply, block)
    probes = (space.random(s, probe) for s in probe_seeds(seed, matvecs))
    samples = _quadratic_forms(space, products(apply, probes, block_apply, block), matvecs)
    return Estimate(float(samples.mean()), _stderr(samples), matvecs, samples)


def hutchpp(apply: LinearMap, space: VectorSpace, matvecs: int, seed: int = 0, probe: str = "rademacher", *,
            block_apply: BlockMap | None = None, block: int | None = None) -> Estimate:
    """Hutch++ with ``matvecs`` ≥ 3 products: ⌊m/3⌋ sketch probes, as many for QᵀAQ, the rest for Hutchinson.

    ``block_apply``/``block`` (opt-in): the sketch Y = A S = A [s₁ … s_k] as block products, then A Q, then the
    residual probes A (I−QQᵀ) z_i (module docstring); default: one product at a time.
    """
    _check_budget(matvecs, 3, "hutchpp")
    check_block(block_apply, block)
    k = matvecs // 3
    g = matvecs - 2 * k
    seeds = probe_seeds(seed, k + g)
    Y = []  # the sketch A S; each probe s is let go once its product is taken
    for pair in products(apply, (space.random(s, probe) for s in seeds[:k]), block_apply, block):
        Y.append(pair[1])
        del pair
    Q, _, _ = orthonormalize(space, Y)
    del Y  # Q replaces the sketch (memory: module docstring)
    if getattr(space, "bases_off_memory", False):  # keep Q where the space keeps bases (pipeline stages' files)
        basis = space.new_basis(len(Q))
        while Q:  # no loop variable: it would keep the last vector alive through every product below
            basis.append(Q.pop(0))
        Q = basis
    low_rank = sum(_quadratic_forms(space, products(apply, Q, block_apply, block), len(Q)))

    sub_lincomb = getattr(space, "sub_lincomb", None)

    def residual(s: int) -> Vector:
        """(I − QQᵀ) z, in place where the space can (no vector beside z and Q)."""
        z = space.random(s, probe)
        c = space.dots(Q, z)
        if sub_lincomb is not None:
            return sub_lincomb(c, Q, z, out=z)
        return space.axpy(-1.0, space.lincomb(c, Q), z)

    samples = _quadratic_forms(space, products(apply, (residual(s) for s in seeds[k:]), block_apply, block), g)
    used = k + len(Q) + g
    return Estimate(float(low_rank + samples.mean()), _stderr(samples), used, low_rank + samples)


def xtrace(apply: LinearMap, space: VectorSpace, matvecs: int, seed: int = 0, probe: str = "rademacher", *,
           block_apply: BlockMap | None = None, block: int | None = None) -> Estimate:
    """XTrace with ``matvecs`` ≥ 4 products (m = ⌊matvecs/2⌋ probes ω_i, Y = AΩ, Z = AQ; ``block_apply``/``block``:
    AΩ and AQ as block products, module docstring).

    With Y = QR, W = QᵀΩ, H = QᵀAQ and s_i the normalized i-th column of R⁻ᵀ (orthogonal to every y_j, j ≠ i),
    the leave-one-out projector is P_i = Q(I − s_i s_iᵀ)Qᵀ and the i-th estimate

        t_i = tr(P_i A P_i) + ω_iᵀ(I−P_i)A(I−P_i)ω_i
            = tr H − s_iᵀHs_i + w_iᵀr_i − 2c_iᵀr_i + c_iᵀHc_i,   c_i = w_i − s_i(s_iᵀw_i),

    is unbiased because ω_i is independent of P_i; every quantity is an m×m Gram matrix. When Y is numerically
    rank-deficient, range(A) ⊆ span(Q) and tr(QᵀAQ) is exact.
    """
    _check_budget(matvecs, 4, "xtrace")
    check_block(block_apply, block)
    m = matvecs // 2
    Om = [space.random(s, probe) for s in probe_seeds(seed, m)]
    Q, R, kept = orthonormalize(space, apply_all(apply, Om, block_apply, block))  # Y = AΩ dropped once Q, R are
    H = np.empty((len(Q), len(Q)))  # QᵀZ, Z = AQ taken a column at a time (no enumerate: it keeps the last pair)
    pairs = products(apply, Q, block_apply, block)
    for j in range(len(Q)):
        H[:, j] = space.dots(Q, next(pairs)[1])
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
