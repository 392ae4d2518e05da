"""Lanczos tridiagonalization with full reorthogonalization, and extreme eigenpairs from it.

For a symmetric A and unit q₁ the recurrence A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ builds an orthonormal Krylov basis
Q_m and a tridiagonal T_m (α on the diagonal, β off it). Every new vector is orthogonalized against the whole basis
twice ("twice is enough", Parlett 1998), so Ritz values do not duplicate. Scalars live in float64 on the coordinator;
vectors stay wherever the :class:`~curvdist.solvers.space.VectorSpace` keeps them.

A Ritz pair (θ_i, Q_m s_i) of T_m has residual ‖A y_i − θ_i y_i‖ = β_m |e_mᵀ s_i| (Golub & Van Loan 2013, §10.1.4),
which is the stopping test. On breakdown (β_m ≈ 0, an invariant subspace) the iteration continues from a fresh
random vector orthogonal to the basis, so repeated eigenvalues are found with their multiplicity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import eigh_tridiagonal

from ..catalogue import Which, parse
from ..errors import SolverError
from .space import LinearMap, Vector, VectorSpace, probe_seeds

WHICH = {"largest": "largest", "la": "largest", "smallest": "smallest", "sa": "smallest",
         "magnitude": "magnitude", "lm": "magnitude"}


@dataclass
class Krylov:
    """The state of a Lanczos run: T_m's diagonal α and off-diagonal β (β[-1] is β_m), and the basis."""

    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    basis: list[Vector] = field(default_factory=list)
    matvecs: int = 0
    restarts: int = 0

    def tridiagonal_eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of T_m."""
        a = np.asarray(self.alphas, dtype=np.float64)
        if len(a) == 1:
            return a.copy(), np.ones((1, 1))
        return eigh_tridiagonal(a, np.asarray(self.betas[: len(a) - 1], dtype=np.float64))


def _orthogonalize(space: VectorSpace, basis: list[Vector], w: Vector) -> Vector:
    for _ in range(2):
        w = space.axpy(-1.0, space.lincomb(space.dots(basis, w), basis), w)
    return w


def lanczos(
    apply: LinearMap,
    space: VectorSpace,
    start: Vector,
    steps: int,
    *,
    restart_seed: int = 0,
    restart: bool = True,
    stop: Callable[[Krylov], bool] | None = None,
    state: Krylov | None = None,
    on_step: Callable[[Krylov], None] | None = None,
) -> Krylov:
    """Run up to ``steps`` Lanczos steps from ``start``; ``stop(state)`` is asked after each step.

    With ``restart=False`` the run ends at breakdown (as stochastic Lanczos quadrature wants: its quadrature is
    then exact); otherwise it continues in the orthogonal complement. ``state`` resumes an earlier run (its
    basis holds one vector more than its α's: the next one to expand); ``on_step`` sees the state after every
    step (checkpointing).
    """
    if state is None:
        nrm = space.norm(start)
        if not nrm > 0:
            raise SolverError("Lanczos start vector is zero")
        state = Krylov(basis=[space.scale(1.0 / nrm, start)])
    restarts = iter(probe_seeds(restart_seed, space.dim + 1))
    for _ in range(state.restarts):
        next(restarts)
    steps = min(steps, space.dim)
    scale = max([abs(a) for a in state.alphas] + [abs(b) for b in state.betas] + [0.0])
    for j in range(len(state.alphas), steps):
        q = state.basis[j]
        w = apply(q)
        state.matvecs += 1
        alpha = space.dot(q, w)
        state.alphas.append(alpha)
        w = _orthogonalize(space, state.basis, w)
        beta = space.norm(w)
        scale = max(scale, abs(alpha), beta)
        broke = beta <= 1e-12 * max(scale, np.finfo(np.float64).tiny)
        state.betas.append(0.0 if broke else beta)
        if j + 1 == steps:
            break
        if broke:
            if not restart:
                break
            w = _orthogonalize(space, state.basis, space.random(next(restarts), "gaussian"))
            state.restarts += 1
            beta = space.norm(w)
        elif stop is not None and stop(state):
            break
        state.basis.append(space.scale(1.0 / beta, w))
        if on_step is not None:
            on_step(state)
    return state


@dataclass
class EigenPairs:
    """Wanted Ritz values, their residual norms, optional Ritz vectors, and the run's bookkeeping."""

    values: np.ndarray
    residuals: np.ndarray
    vectors: list[Vector] | None
    matvecs: int
    iterations: int
    converged: bool


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "largest":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "smallest":
        return np.argsort(theta, kind="stable")[:k]
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def eigsh(
    apply: LinearMap,
    space: VectorSpace,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    state: Krylov | None = None,
    on_step: Callable[[Krylov], None] | None = None,
) -> EigenPairs:
    """k extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Stops when every wanted Ritz pair has residual ≤ ``tol`` · max|θ| (θ the Ritz values), after ``maxiter``
    steps (default min(d, max(300, 20k))), or when the Krylov space is the whole space (then exact).
    ``state``/``on_step`` resume from and checkpoint the Lanczos state (the result is the same as uninterrupted).
    """
    which_key = WHICH.get(str(which).lower())
    if which_key is None:
        parse(Which, which, "eigenvalue selection 'which'")  # raises UnknownNameError listing the choices
    if not isinstance(k, int) or k < 1:
        raise SolverError(f"k must be a positive integer, got {k!r}")
    if k > space.dim:
        raise SolverError(f"k={k} eigenvalues requested but the operator has dimension {space.dim}")
    if not tol > 0:
        raise SolverError(f"tol must be positive, got {tol!r}")
    maxiter = min(space.dim, maxiter if maxiter is not None else max(300, 20 * k))
    if maxiter < k:
        raise SolverError(f"maxiter={maxiter} is smaller than k={k}")

    def residuals(state: Krylov) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta, S = state.tridiagonal_eigh()
        idx = _select(theta, k, which_key)
        return theta, S, idx

    def converged(state: Krylov) -> bool:
        m = len(state.alphas)
        if m < k:
            return False
        theta, S, idx = residuals(state)
        res = abs(state.betas[-1]) * np.abs(S[-1, idx])
        return bool(np.all(res <= tol * max(np.max(np.abs(theta)), np.finfo(np.float64).tiny)))

    seeds = probe_seeds(seed, 2)
    start = space.random(seeds[0], "gaussian") if state is None else None
    state = lanczos(apply, space, start, maxiter, restart_seed=seeds[1], stop=converged, state=state,
                    on_step=on_step)
    theta, S, idx = residuals(state)
    m = len(state.alphas)
    exact = m == space.dim
    res = np.zeros(len(idx)) if exact else abs(state.betas[-1]) * np.abs(S[-1, idx])
    ok = exact or bool(np.all(res <= tol * max(np.max(np.abs(theta)), np.finfo(np.float64).tiny)))
    vectors = None
    if return_vectors:
        vectors = [space.lincomb(S[:, i], state.basis[:m]) for i in idx]
    return EigenPairs(theta[idx], res, vectors, state.matvecs, m, ok)
