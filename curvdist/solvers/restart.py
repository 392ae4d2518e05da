"""Thick-restart Lanczos: extreme eigenpairs with at most ``max_basis`` basis vectors in memory.

Full-reorthogonalization Lanczos keeps every basis vector; at 10⁸ parameters that is half a GB a step. Thick
restart (Wu & Simon 2000, SIAM J. Matrix Anal. Appl. 22(2); Stathopoulos, Saad & Wu 1998) runs m = ``max_basis`` − 1
steps, then keeps the p best Ritz vectors Y = Q_m S_p and the last residual direction q_{m+1}:

    A [Y, q_{m+1}] = [Y, q_{m+1}] [[Θ_p, s], [sᵀ, α]] + …,   s = β_m S[m, :p],

and continues Lanczos from q_{m+1}, every new vector orthogonalized against the whole (short) basis twice. The
projected matrix is kept dense (arrowhead after a restart, tridiagonal between): its column j is the vector of
Gram-Schmidt coefficients of A q_j, so the restart needs no special case. A Ritz pair's residual is
β |e_nᵀ s_i| as in plain Lanczos (the relation A Q_n = Q_n T_n + β q_{n+1} e_nᵀ holds after a restart too).

With a :class:`~curvdist.solvers.space.Basis` (or the pipeline's stage-held
:class:`~curvdist.distributed.sharded_space.ShardedBasis`) the restart rotates the basis in place
(:meth:`~curvdist.solvers.space.Basis.rotate_`), so at most ``max_basis`` vectors are ever held; other spaces form
the kept Ritz vectors as new vectors first (up to ``max_basis`` + p for a moment).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..catalogue import Which, parse
from ..errors import SolverError
from .lanczos import WHICH, EigenPairs, _append_next, _new_basis, _orthogonalize, _select
from .space import Basis, LinearMap, Vector, VectorSpace, probe_seeds


def eigsh_restarted(
    apply: LinearMap,
    space: VectorSpace,
    k: int = 1,
    which: str = "largest",
    *,
    max_basis: int,
    tol: float = 1e-8,
    maxiter: int | None = None,
    seed: int = 0,
    keep: int | None = None,
    return_vectors: bool = False,
    on_restart: Callable[[int], None] | None = None,
) -> EigenPairs:
    """k extreme eigenpairs (``which``: largest | smallest | magnitude) by thick-restart Lanczos holding at most
    ``max_basis`` vectors; ``keep`` Ritz vectors survive a restart (default max(k + 1, (max_basis − 1) // 2), at
    most max_basis − 2). Stops when every wanted residual ≤ ``tol`` · max|θ| or after ``maxiter`` products (default
    max(300, 20k)); ``iterations`` counts the products too. ``on_restart(restarts)`` sees each restart."""
    which_key = WHICH.get(str(which).lower())
    if which_key is None:
        parse(Which, which, "eigenvalue selection 'which'")  # raises UnknownNameError listing the choices
    which = which_key
    if isinstance(max_basis, bool) or not isinstance(max_basis, (int, np.integer)):
        raise SolverError(f"max_basis must be an integer number of vectors, got {max_basis!r}")
    if not isinstance(k, int) or k < 1 or k > space.dim:
        raise SolverError(f"k must be an integer in [1, {space.dim}], got {k!r}")
    if not tol > 0:
        raise SolverError(f"tol must be positive, got {tol!r}")
    maxiter = max(300, 20 * k) if maxiter is None else int(maxiter)
    m = int(max_basis) - 1  # Lanczos steps between restarts; one more row holds the next direction
    if m < k + 1:
        raise SolverError(f"max_basis={max_basis} leaves no room for a restart with k={k}: give at least k + 2 "
                          f"(or max_basis=None for plain Lanczos)")
    p = min(max(k + 1, m // 2), m - 1) if keep is None else int(keep)
    if not k <= p < m:
        raise SolverError(f"keep={keep} must be at least k={k} and below max_basis − 1 = {m}")
    seeds = probe_seeds(seed, 2)
    start = space.random(seeds[0], "gaussian")
    nrm = space.norm(start)
    basis = _new_basis(space, m + 1)
    if isinstance(basis, list):
        basis.append(space.scale(1.0 / nrm, start))
    else:
        basis.append(start, 1.0 / nrm)
    del start
    T = np.zeros((m + 1, m + 1))
    matvecs, restarts, scale = 0, 0, 0.0
    work: Vector | None = None
    theta = S = idx = res = None
    while True:
        j = len(basis) - 1
        w = apply(basis[j])
        matvecs += 1
        c, w = _orthogonalize(space, basis, w, work)
        if work is None and hasattr(space, "sub_lincomb"):
            work = w
        beta = space.norm(w)
        T[: j + 1, j] = T[j, : j + 1] = c
        n = j + 1
        theta, S = np.linalg.eigh(T[:n, :n])
        idx = _select(theta, k, which)
        scale = max(scale, float(np.max(np.abs(theta))), beta)
        broke = beta <= 1e-12 * max(scale, np.finfo(np.float64).tiny)
        res = np.zeros(len(idx)) if broke else beta * np.abs(S[n - 1, idx])
        ok = n >= k and bool(np.all(res <= tol * max(np.max(np.abs(theta)), np.finfo(np.float64).tiny)))
        if ok or broke or matvecs >= maxiter or n == space.dim:
            break
        if n < m:
            _append_next(space, basis, beta, w, work)
            T[n, j] = T[j, n] = beta
            continue
        kept = _select(theta, p, which)  # thick restart: the p best Ritz vectors and the residual direction
        s = beta * S[n - 1, kept]
        if hasattr(basis, "rotate_"):
            basis.rotate_(S[:, kept])
            _append_next(space, basis, beta, w, work)
        else:
            Y = [space.lincomb(S[:, i], basis) for i in kept]
            basis = Y + [space.scale(1.0 / beta, w)] if isinstance(basis, list) else _rebuilt(space, m, Y, w, beta)
        T[:] = 0.0
        T[np.arange(p), np.arange(p)] = theta[kept]
        T[p, :p] = T[:p, p] = s
        restarts += 1
        if on_restart is not None:
            on_restart(restarts)
    ok = ok or broke or n == space.dim
    vectors = [space.lincomb(S[:, i], basis[:n]) for i in idx] if return_vectors else None
    return EigenPairs(theta[idx], res, vectors, matvecs, matvecs, bool(ok))


def _rebuilt(space: VectorSpace, m: int, Y: list[Vector], w: Vector, beta: float) -> Basis:
    """A new preallocated basis holding Y and w/β (spaces whose basis cannot rotate in place)."""
    basis = _new_basis(space, m + 1)
    for y in Y:
        basis.append(y)
    basis.append(w, 1.0 / beta)
    return basis
