"""Lanczos tridiagonalization with full reorthogonalization, and extreme eigenpairs from it.

For a symmetric A and unit q₁ the recurrence A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ builds an orthonormal Krylov basis
Q_m and a tridiagonal T_m (α on the diagonal, β off it). Every new vector is orthogonalized against the whole basis
twice ("twice is enough", Parlett 1998), so Ritz values do not duplicate. Scalars live in float64 on the coordinator;
vectors stay wherever the :class:`~curvdist.solvers.space.VectorSpace` keeps them.

When the space offers ``new_basis`` (a :class:`~curvdist.solvers.space.TorchSpace`, or a space wrapping one) the
basis is a preallocated :class:`~curvdist.solvers.space.Basis` in the operator's working dtype: each of the two
reorthogonalization passes is one product c = Qᵀw over the basis and one update w ← w − Q c in place, with no
per-step stacking or float64 copies of the basis. The second pass accumulates c in float64 (float32 data: sums of
128 coordinates summed in float64, :meth:`~curvdist.solvers.space.Basis.dots`; a plain float32 product over d ~ 10⁷
coordinates would cost orthogonality); the first, which only removes the bulk, takes it in the working dtype.
α and β are computed in float64. The pipeline's sharded space makes a
:class:`~curvdist.distributed.sharded_space.ShardedBasis` (a Basis on every stage) and fuses a step's vector work
(its ``expand``); other spaces keep the basis as a list of their vectors.

A Ritz pair (θ_i, Q_m s_i) of T_m has residual ‖A y_i − θ_i y_i‖ = β_m |e_mᵀ s_i| (Golub & Van Loan 2013, §10.1.4),
which is the stopping test. On breakdown (β_m ≈ 0, an invariant subspace) the iteration continues from a fresh
random vector orthogonal to the basis, so repeated eigenvalues are found with their multiplicity.

The recurrence is a coroutine that yields the vector to expand and receives its product, so :func:`lanczos` drives
one run with single products and :func:`lanczos_lockstep` several independent runs (stochastic Lanczos quadrature's
probes) with one block product per step.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import eigh_tridiagonal

from ..catalogue import Which, parse
from ..errors import SolverError
from .space import Basis, BlockMap, LinearMap, Vector, VectorSpace, apply_all, probe_seeds

WHICH = {"largest": "largest", "la": "largest", "smallest": "smallest", "sa": "smallest",
         "magnitude": "magnitude", "lm": "magnitude"}


@dataclass
class Krylov:
    """The state of a Lanczos run: T_m's diagonal α and off-diagonal β (β[-1] is β_m), and the basis.

    ``basis`` is a sequence of the space's vectors q_1, q_2, …: a :class:`~curvdist.solvers.space.Basis` (rows of
    preallocated blocks) when the space makes one, else a list. Either kind may be given to resume a run.
    """

    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    basis: list[Vector] | Basis = field(default_factory=list)
    matvecs: int = 0
    restarts: int = 0

    def tridiagonal_eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of T_m."""
        a = np.asarray(self.alphas, dtype=np.float64)
        if len(a) == 1:
            return a.copy(), np.ones((1, 1))
        return eigh_tridiagonal(a, np.asarray(self.betas[: len(a) - 1], dtype=np.float64))


def _new_basis(space: VectorSpace, capacity: int, vectors: Sequence[Vector] = ()) -> list[Vector] | Basis:
    """An empty basis for about ``capacity`` vectors, preallocated if the space can, holding copies of ``vectors``."""
    make = getattr(space, "new_basis", None)
    if make is None:
        return list(vectors)
    basis = make(capacity)
    for v in vectors:
        basis.append(v)
    return basis


def _append(space: VectorSpace, basis: list[Vector] | Basis, a: float, v: Vector) -> None:
    """Append a·v to the basis (written straight into a preallocated row when the basis has them)."""
    if isinstance(basis, list):
        basis.append(space.scale(a, v))
    else:
        basis.append(v, a)


def _append_next(space: VectorSpace, basis: list[Vector] | Basis, beta: float, w: Vector, work: Vector | None
                 ) -> None:
    """Append the next direction w/β. When w is the run's work vector its value is dead from here on (the next step
    writes it before it reads it): a space that keeps snapshots (the pipeline's ``discard``) is told so, and writes
    a marker for it instead of its data."""
    _append(space, basis, 1.0 / beta, w)
    discard = getattr(space, "discard", None)
    if w is work and discard is not None:
        discard(w)


def _orthogonalize(space: VectorSpace, basis: list[Vector] | Basis, w: Vector, out: Vector | None = None
                   ) -> tuple[np.ndarray, Vector]:
    """(Qᵀw summed over both passes, w − Q Qᵀw) in the space's inner product, classical Gram-Schmidt applied twice.

    ``out``: where a space with ``sub_lincomb`` may write the result (w itself when w may be overwritten, or a work
    vector of the run; default: a new vector) — w is left alone unless it is ``out``. With a preallocated basis
    (:class:`~curvdist.solvers.space.Basis`, or one on the stages) the first pass takes its coefficients in the
    working dtype (a ``coarse`` view: it only has to remove the bulk) and the second, which decides how orthogonal
    the result is, accumulates them in float64; their sum is the projection (thick restart's matrix column).
    """
    sub = getattr(space, "sub_lincomb", None)
    total = np.zeros(len(basis))
    for i in range(2):
        xs = basis.coarse() if i == 0 and not isinstance(basis, list) else basis
        c = space.dots(xs, w)
        total += c
        if sub is None:
            w = space.axpy(-1.0, space.lincomb(c, basis), w)
        else:
            w = out = sub(c, basis, w, out=out)
    return total, w


def _expand(space: VectorSpace, basis: list[Vector] | Basis, q: Vector, w: Vector, out: Vector | None
            ) -> tuple[float, Vector, float]:
    """One step's vector work for w = A q: (α, w orthogonalized against the basis, β) with α = qᵀw and β = ‖w‖.
    A space with a fused ``expand`` (the pipeline's sharded space: fewer rounds of remote calls) does it in one
    call with the same numbers."""
    fused = getattr(space, "expand", None)
    if fused is not None and not isinstance(basis, list):
        return fused(basis, q, w, out)
    alpha = space.dot(q, w)
    _, w = _orthogonalize(space, basis, w, out=out)
    return alpha, w, space.norm(w)


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

    The basis never holds more than ``min(steps, d)`` vectors; with a :class:`~curvdist.solvers.space.TorchSpace`
    it is preallocated for that many in the working dtype (a resumed list basis, or a read-only view, is copied into
    one once).
    """
    steps = min(steps, space.dim)
    run = _steps(space, _begin(space, start, steps, state), steps, restart_seed, restart, stop, on_step)
    try:
        q = next(run)
        while True:
            q = run.send(apply(q))
    except StopIteration as done:
        return done.value


def lanczos_lockstep(
    block_apply: BlockMap,
    space: VectorSpace,
    starts: Sequence[Vector],
    steps: int,
    *,
    restart_seed: int = 0,
    restart: bool = True,
    block: int | None = None,
) -> list[Krylov]:
    """``len(starts)`` independent Lanczos runs advanced together, one step at a time: the vectors to expand of all
    runs still going, [q₁ … q_p], are multiplied in one block product A [q₁ … q_p] (``block_apply``, on consecutive
    groups of at most ``block`` vectors: :func:`~curvdist.solvers.space.apply_all`). Run i is
    ``lanczos(apply, space, starts[i], steps, restart_seed=restart_seed, restart=restart)`` with its products taken
    from the block: the same recurrence and stopping, its numbers equal up to the rounding by which a batched
    product differs from a single one. Memory: the runs' bases together (``len(starts)·min(steps, d)`` vectors).
    """
    steps = min(steps, space.dim)
    runs = [_steps(space, _begin(space, z, steps, None), steps, restart_seed, restart, None, None) for z in starts]
    results: list[Krylov | None] = [None] * len(runs)
    pending: dict[int, Vector] = {}
    for i, run in enumerate(runs):
        try:
            pending[i] = next(run)
        except StopIteration as done:
            results[i] = done.value
    while pending:
        order = list(pending)
        products = apply_all(None, [pending[i] for i in order], block_apply, block)
        for i, w in zip(order, products):
            try:
                pending[i] = runs[i].send(w)
            except StopIteration as done:
                results[i] = done.value
                del pending[i]
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _begin(space: VectorSpace, start: Vector, steps: int, state: Krylov | None) -> Krylov:
    """The state a run starts from: a new one from ``start``, or ``state`` checked and its basis made appendable."""
    if state is None:
        nrm = space.norm(start)
        if not nrm > 0:
            raise SolverError("Lanczos start vector is zero")
        basis = _new_basis(space, max(steps, 1))
        _append(space, basis, 1.0 / nrm, start)
        return Krylov(basis=basis)
    if len(state.basis) != len(state.alphas) + 1 and len(state.alphas) < steps:
        raise SolverError(f"cannot resume Lanczos: the state has {len(state.alphas)} steps but "
                          f"{len(state.basis)} basis vectors (expected one more than steps)")
    if hasattr(space, "new_basis") and (isinstance(state.basis, list) or state.basis.read_only):
        state.basis = _new_basis(space, max(steps, len(state.basis)), state.basis)  # a list or a view: copied
    return state


def _steps(space: VectorSpace, state: Krylov, steps: int, restart_seed: int, restart: bool,
           stop: Callable[[Krylov], bool] | None, on_step: Callable[[Krylov], None] | None,
           ) -> Generator[Vector, Vector, Krylov]:
    """The Lanczos recurrence as a coroutine: yields the vector q_j to expand, receives A q_j, and returns the
    final state (so one run, or several in lockstep, can be driven by whoever computes the products)."""
    # the seeds of the restart vectors: a prefix of one fixed sequence (SeedSequence output is prefix-stable), so
    # only as many as this run can use are drawn — not one per dimension
    restarts = iter(probe_seeds(restart_seed, min(space.dim, state.restarts + steps) + 1)[state.restarts:])
    scale = max([abs(a) for a in state.alphas] + [abs(b) for b in state.betas] + [0.0])
    work: Vector | None = None  # reused for every step's orthogonalized vector (its contents end up in the basis)
    for j in range(len(state.alphas), steps):
        q = state.basis[j]
        w = yield q
        state.matvecs += 1
        # w may be the operator's own tensor (or q itself): the result goes to the run's work vector instead
        alpha, w, beta = _expand(space, state.basis, q, w, work)
        state.alphas.append(alpha)
        if work is None and hasattr(space, "sub_lincomb"):
            work = w
        scale = max(scale, abs(alpha), beta)
        broke = beta <= 1e-12 * max(scale, np.finfo(np.float64).tiny)
        state.betas.append(0.0 if broke else beta)
        if j + 1 == steps:
            break
        if broke:
            if not restart:
                break
            w = space.random(next(restarts), "gaussian")
            _, w = _orthogonalize(space, state.basis, w, out=w)
            state.restarts += 1
            beta = space.norm(w)
        elif stop is not None and stop(state):
            break
        _append_next(space, state.basis, beta, w, work)
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
