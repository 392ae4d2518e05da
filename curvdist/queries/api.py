"""The query functions of the Python API: eigs, trace, diag, logdet, density, grad_norm.

Each takes a curvature operator (``cd.operator(problem, kind)``), runs a solver from :mod:`curvdist.solvers` on a
local :class:`~curvdist.solvers.space.TorchSpace`, and returns a :class:`Result` recording value, standard error,
matvec count, wall time, convergence, seed and dtype.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..catalogue import DiagMethod, LogdetMethod, TraceMethod, parse
from ..errors import NotPositiveDefiniteError, ProblemError, SolverError
from ..faults import maybe_stop
from ..finite import all_finite
from ..geometry.metrics.base import Metric
from ..operators.base import CurvatureOperator
from ..problem.base import BaseProblem, StagedProblem
from ..solvers import DIAG_METHODS, TRACE_METHODS, Krylov, TorchSpace, eigsh, eigsh_restarted, slq
from .result import Result


class MetricSpace:
    """ℝ^d with the inner product ⟨x, y⟩_M = xᵀ M y: M⁻¹C is self-adjoint in it, so Lanczos on M⁻¹C in this space
    finds the eigenvalues of the pencil (C, M) when M has no cheap factor (CG solves instead)."""

    def __init__(self, base: TorchSpace, metric: Metric) -> None:
        self.base, self.metric, self.dim = base, metric, base.dim

    def dot(self, x: Tensor, y: Tensor) -> float:
        return self.base.dot(x, self.metric.apply(y))

    def dots(self, xs: Any, y: Tensor) -> np.ndarray:
        return self.base.dots(xs, self.metric.apply(y)) if len(xs) else np.zeros(0)

    def norm(self, x: Tensor) -> float:
        return float(np.sqrt(max(self.dot(x, x), 0.0)))

    def __getattr__(self, name: str) -> Any:  # axpy, scale, zeros, random, mul, lincomb, to_tensor, new_basis
        if name == "expand":  # a base space's fused Lanczos step takes Euclidean inner products: not this space's
            raise AttributeError(name)
        return getattr(self.base, name)


class _Target:
    """What a solver sees: the operator C, composed with a metric M when one is given.

    ``plain`` (no metric): C.  ``symmetric`` (M = WᵀW cheap): S = W⁻ᵀ C W⁻¹, eigenvalues of M⁻¹C, in the Euclidean
    space.  ``generalized`` (M solved by CG): M⁻¹C in the M-inner-product space. Counts C products and advances
    a progress bar.
    """

    def __init__(self, op: CurvatureOperator, metric: Metric | None, progress: bool, total: int | None,
                 desc: str) -> None:
        self.op, self.metric, self.count, self.bar = op, metric, 0, None
        base = op.vector_space()
        if metric is None:
            self.mode, self.space = "plain", base
        else:
            if not isinstance(metric, Metric):
                raise ProblemError(f"metric must be a curvdist Metric (cd.metric(...)), got {type(metric).__name__}")
            if metric.dim != op.dim:
                raise ProblemError(f"the metric has dimension {metric.dim} but the operator {op.dim}")
            self.mode = "symmetric" if metric.has_factor else "generalized"
            self.space = base if metric.has_factor else MetricSpace(base, metric)
        self.euclidean = base
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="matvec", leave=False, disable=None)  # off without a TTY

    def c(self, v: Tensor) -> Tensor:
        out = self.op.apply_vector(v)
        if isinstance(out, Tensor) and not all_finite(out):
            raise SolverError(f"the {self.op.kind} product returned NaN or inf during the solve")
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        return out

    def block(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """The target applied to several vectors with one block product of C (``op.apply_vectors``: the
        v-independent work of each batch done once); the metric's factors act per vector."""
        xs = [self.metric.inv_factor_apply(v) for v in vectors] if self.mode == "symmetric" else list(vectors)
        outs = list(self.op.apply_vectors(xs))
        if not all(all_finite(o) for o in outs):
            raise SolverError(f"the {self.op.kind} product returned NaN or inf during the solve")
        self.count += len(xs)
        if self.bar is not None:
            self.bar.update(len(xs))
        if self.mode == "symmetric":
            return [self.metric.inv_factor_t_apply(o) for o in outs]
        if self.mode == "generalized":
            return [self.metric.solve(o) for o in outs]
        return outs

    def block_options(self, block: int | None) -> dict[str, Any]:
        """The solvers' opt-in block products for ``block`` vectors per product (None: single products)."""
        if block is None:
            return {}
        if not hasattr(self.op, "apply_vectors"):
            raise SolverError(f"block products (block={block!r}) need an operator with apply_vectors (local or "
                              f"data-parallel), not {type(self.op).__name__}; leave block=None")
        return {"block_apply": self.block, "block": block}

    def __call__(self, v: Tensor) -> Tensor:
        if self.mode == "plain":
            return self.c(v)
        if self.mode == "symmetric":
            return self.metric.inv_factor_t_apply(self.c(self.metric.inv_factor_apply(v)))
        return self.metric.solve(self.c(v))

    def dense(self) -> Tensor:
        """The matrix the solver sees (C, or S = W⁻ᵀCW⁻¹), materialized — tiny models only."""
        self.need_factor("an exact (dense) query")
        if not isinstance(self.op, CurvatureOperator):
            raise SolverError(f"exact queries need a local or data-parallel operator, not {type(self.op).__name__}")
        C = self.op.to_dense()
        self.count += self.op.dim
        if self.mode == "plain":
            return C
        Winv = torch.stack([self.metric.inv_factor_apply(e) for e in torch.eye(self.op.dim, dtype=C.dtype,
                                                                                  device=C.device)], 1)
        S = Winv.T @ C @ Winv
        return 0.5 * (S + S.T)

    def need_factor(self, query: str) -> None:
        if self.mode == "generalized":
            raise SolverError(
                f"{query} with the {self.metric.kind} metric needs a cheap factor M = WᵀW, which a CG-solved "
                "metric lacks; use method='dense' for the metric (small models), a diagonal/KFAC metric, or "
                "trace(method='hutchinson')"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_op(op: Any) -> CurvatureOperator:
    if not (isinstance(op, CurvatureOperator) or (hasattr(op, "apply_vector") and hasattr(op, "vector_space"))):
        raise ProblemError(
            f"expected a curvature operator (cd.operator(problem, kind)), got {type(op).__name__}"
        )
    return op


def coordinates_of(problem: BaseProblem) -> str:
    """'psi' for a problem made by cd.reparametrize, else 'theta'."""
    return "psi" if getattr(problem.model, "reparam", None) is not None else "theta"


def _run(op: CurvatureOperator, query: str, seed: int | None, progress: bool, total: int | None,
         solve: Callable[[_Target], dict[str, Any]], metric: Metric | None = None) -> Result:
    op = _check_op(op)
    target = _Target(op, metric, progress, total, query)
    t0 = time.perf_counter()
    try:
        fields = solve(target)
    finally:
        target.close()
    seconds = time.perf_counter() - t0
    info = fields.pop("info", {})
    problem = getattr(op, "problem", None)
    if not isinstance(problem, BaseProblem):  # a staged (pipeline) problem has no gradient here
        problem = None
    if metric is not None and op.kind == "hessian" and problem is not None:
        g = op.problem.flatten(op.problem.gradient())
        gnorm = float(np.sqrt(max(float(torch.dot(g, metric.solve(g))), 0.0)))
        info["grad_norm"] = gnorm
        info["warning"] = (f"Hessian-based quantity with a metric at a point with gradient norm {gnorm:.3g}: "
                           "invariant only at critical points (use the Riemannian Hessian of a pull-back metric "
                           "for exact invariance)")
    return Result(query=query, matvecs=target.count, seconds=seconds, seed=seed,
                  dtype=str(op.dtype).replace("torch.", ""), curvature=op.kind,
                  metric="euclidean" if metric is None else metric.describe(),
                  coordinates=coordinates_of(problem) if problem is not None else "theta",
                  backend=getattr(op, "backend", "local"), info=info, **fields)


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-5


def eigs(op: CurvatureOperator, k: int = 1, which: str = "largest", *, metric: Metric | None = None,
         tol: float | None = None, maxiter: int | None = None, seed: int = 0, return_vectors: bool = False,
         progress: bool = False, checkpoint: str | Path | None = None, checkpoint_every: int = 10,
         max_basis: int | None = None) -> Result:
    """The k extreme eigenvalues of M⁻¹C (of C without a metric); ``which``: largest | smallest | magnitude.

    Lanczos with full reorthogonalization on S = W⁻ᵀCW⁻¹ when the metric has a cheap factor M = WᵀW, otherwise in
    the M-inner product with CG solves. Stops when every Ritz residual ≤ tol·max|θ| (default tol 1e-8 in float64,
    1e-5 in float32). ``value`` lists the eigenvalues in the order asked; ``info["residuals"]`` their residuals;
    ``vectors`` the eigenvectors (of S, or M-orthonormal eigenvectors of M⁻¹C) if requested.

    ``checkpoint``: a file to which the Lanczos state (tridiagonal, basis, restart count) is saved every
    ``checkpoint_every`` steps; if it exists, the solve resumes from it and gives the uninterrupted result.

    ``max_basis``: hold at most this many Lanczos vectors (thick restart, Wu & Simon 2000:
    :func:`~curvdist.solvers.eigsh_restarted`), a memory budget of ``max_basis`` · d · itemsize for models whose
    basis would not fit; ``maxiter`` then counts products across restarts. Default: plain Lanczos, every vector kept.
    """
    tol = _default_tol(_check_op(op).dtype) if tol is None else tol
    if max_basis is not None and checkpoint is not None:
        raise SolverError("eigs: checkpoint saves a plain Lanczos state; it cannot be combined with max_basis")

    def solve(t: _Target) -> dict[str, Any]:
        if max_basis is not None:
            r = eigsh_restarted(t, t.space, k, which, max_basis=max_basis, tol=tol, maxiter=maxiter, seed=seed,
                                return_vectors=return_vectors)
            if not r.converged:
                warnings.warn(f"eigs: {k} {which} eigenvalues not converged to tol={tol:g} in {r.matvecs} products "
                              f"with at most {max_basis} basis vectors (largest residual {r.residuals.max():.2e}); "
                              f"raise maxiter or max_basis", stacklevel=4)
            return dict(value=[float(x) for x in r.values], converged=r.converged, vectors=r.vectors,
                        info={"which": which, "k": k, "tol": tol, "iterations": r.iterations, "mode": t.mode,
                              "residuals": r.residuals.tolist(), "max_basis": max_basis})
        state, on_step = None, None
        if checkpoint is not None:
            path = Path(checkpoint)
            if path.is_file():
                state = _load_krylov(path, t.space)
            every = max(int(checkpoint_every), 1)
            on_step = lambda st: _save_krylov(path, st, t.space) if len(st.alphas) % every == 0 else None  # noqa
        resumed = 0 if state is None else len(state.alphas)
        r = eigsh(t, t.space, k, which, tol=tol, maxiter=maxiter, seed=seed, return_vectors=return_vectors,
                  state=state, on_step=on_step)
        if not r.converged:
            warnings.warn(f"eigs: {k} {which} eigenvalues not converged to tol={tol:g} in {r.iterations} "
                          f"Lanczos steps (largest residual {r.residuals.max():.2e}); raise maxiter",
                          stacklevel=4)
        return dict(value=[float(x) for x in r.values], converged=r.converged, vectors=r.vectors,
                    info={"which": which, "k": k, "tol": tol, "iterations": r.iterations, "mode": t.mode,
                          "residuals": r.residuals.tolist(), "resumed_from_step": resumed})

    return _run(op, "eigs", seed, progress, maxiter, solve, metric)


def _save_krylov(path: Path, state: Krylov, space: Any) -> None:
    """Atomically write the Lanczos state (basis gathered to flat CPU tensors)."""
    tmp = path.with_name(path.name + ".tmp")
    # clone each vector: a row view of a preallocated basis block would save the whole block's storage
    basis = [space.to_tensor(q).detach().cpu().clone() for q in state.basis]
    torch.save({"alphas": list(state.alphas), "betas": list(state.betas), "restarts": state.restarts,
                "matvecs": state.matvecs, "basis": basis}, tmp)
    tmp.replace(path)
    maybe_stop(len(state.alphas))  # the fault-injection switch: a crash right after a checkpoint


def _load_krylov(path: Path, space: Any) -> Krylov:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if len(d["basis"]) != len(d["alphas"]) + 1 or any(b.numel() != space.dim for b in d["basis"]):
            raise ValueError("inconsistent basis")
    except Exception as e:
        raise SolverError(f"cannot resume from Lanczos checkpoint {path}: {e}") from None
    return Krylov(alphas=list(d["alphas"]), betas=list(d["betas"]), basis=[space.from_tensor(b) for b in d["basis"]],
                  matvecs=int(d["matvecs"]), restarts=int(d["restarts"]))


def trace(op: CurvatureOperator, method: str = "hutchpp", matvecs: int = 100, *, metric: Metric | None = None,
          seed: int = 0, probe: str = "rademacher", progress: bool = False, block: int | None = None) -> Result:
    """tr(M⁻¹C) (tr C without a metric) by ``method`` ∈ {hutchinson (1989), hutchpp (Meyer et al. 2021), xtrace
    (Epperly et al. 2024)} with a budget of ``matvecs`` products of C; ``stderr`` is the estimator's standard
    error. ``method="exact"`` sums the diagonal of the dense matrix (tiny models only). A CG-solved metric
    supports only Hutchinson (zᵀM⁻¹Cz is unbiased for any square matrix). ``block``: take the products of up to
    this many probes as one batched product (``op.apply_vectors``; same estimate up to rounding; default: one
    product at a time)."""
    method = parse(TraceMethod, method, "trace method").value
    if method == "exact":
        def exact(t: _Target) -> dict[str, Any]:
            return dict(value=float(torch.diagonal(t.dense()).sum()), stderr=0.0, info={"method": "exact"})

        return _run(op, "trace", None, progress, _check_op(op).dim, exact, metric)

    def solve(t: _Target) -> dict[str, Any]:
        if method != "hutchinson":
            t.need_factor(f"trace(method={method!r})")
        e = TRACE_METHODS[method](t, t.euclidean, matvecs, seed=seed, probe=probe, **t.block_options(block))
        return dict(value=e.value, stderr=e.stderr, info={"method": method, "budget": matvecs, "probe": probe})

    return _run(op, "trace", seed, progress, matvecs, solve, metric)


def diag(op: CurvatureOperator, method: str = "xdiag", matvecs: int = 100, *, seed: int = 0,
         probe: str = "rademacher", progress: bool = False) -> Result:
    """diag C by ``method`` ∈ {hutchinson (Bekas et al. 2007), xdiag (Epperly et al. 2024)}; ``value`` and
    ``stderr`` are flat tensors (entrywise standard error). The diagonal is a coordinate-dependent quantity, so it
    takes no metric."""
    method = parse(DiagMethod, method, "diagonal method").value

    def solve(t: _Target) -> dict[str, Any]:
        e = DIAG_METHODS[method](t, t.space, matvecs, seed=seed, probe=probe)
        return dict(value=e.value, stderr=e.stderr, info={"method": method, "budget": matvecs, "probe": probe,
                                                          "sum": float(e.value.sum())})

    return _run(op, "diag", seed, progress, matvecs, solve)


def logdet(op: CurvatureOperator, damping: float = 0.0, *, metric: Metric | None = None, method: str = "slq",
           probes: int = 20, steps: int = 50, seed: int = 0, probe: str = "rademacher",
           progress: bool = False, block: int | None = None) -> Result:
    """log det(M⁻¹C + δI) = Σ_i log(λ_i + δ) over the eigenvalues λ_i of M⁻¹C (of C without a metric) by stochastic
    Lanczos quadrature (Ubaru, Chen, Saad 2017), ``probes`` probes of ``steps`` steps; δ = ``damping`` ≥ 0 shifts
    the invariant spectrum, so the result stays invariant. Raises NotPositiveDefiniteError when a Ritz value
    of M⁻¹C + δI is ≤ 0. ``method="exact"`` uses the eigenvalues of the dense matrix (tiny models only).
    ``block``: run up to this many probes' Lanczos processes in lockstep, each step one batched product."""
    if not damping >= 0:
        raise SolverError(f"damping must be ≥ 0, got {damping!r}")
    method = parse(LogdetMethod, method, "logdet method").value
    if method == "exact":
        def exact(t: _Target) -> dict[str, Any]:
            lam = torch.linalg.eigvalsh(t.dense()).double() + damping
            if not bool((lam > 0).all()):
                raise NotPositiveDefiniteError(
                    f"log-det needs M⁻¹C + {damping:g}·I positive definite; its smallest eigenvalue is "
                    f"{float(lam.min()):.3e}: increase damping")
            return dict(value=float(torch.log(lam).sum()), stderr=0.0, info={"method": "exact", "damping": damping})

        return _run(op, "logdet", None, progress, _check_op(op).dim, exact, metric)

    def solve(t: _Target) -> dict[str, Any]:
        t.need_factor("logdet")
        q = slq.quadrature(t, t.space, probes, steps, seed=seed, probe=probe, **t.block_options(block))
        value, err, _ = slq.logdet(q, damping)
        return dict(value=value, stderr=err, info={"damping": damping, "probes": probes, "steps": steps})

    return _run(op, "logdet", seed, progress, probes * steps, solve, metric)


def density(op: CurvatureOperator, *, metric: Metric | None = None, probes: int = 5, steps: int = 80,
            grid: int | np.ndarray = 1000, sigma: float | None = None, seed: int = 0, probe: str = "rademacher",
            progress: bool = False, block: int | None = None) -> Result:
    """Spectral density of M⁻¹C (of C without a metric) by stochastic Lanczos quadrature with Gaussian smoothing
    of width ``sigma`` (Ghorbani, Krishnan, Xiao 2019). ``value`` = {"grid", "density", "nodes", "weights"}; the
    density integrates to 1. ``block``: as in :func:`logdet`."""

    def solve(t: _Target) -> dict[str, Any]:
        t.need_factor("density")
        q = slq.quadrature(t, t.space, probes, steps, seed=seed, probe=probe, **t.block_options(block))
        grid_, phi, s = slq.density(q, grid, sigma)
        value = {"grid": grid_, "density": phi, "nodes": q.nodes, "weights": q.weights}
        return dict(value=value, info={"probes": probes, "steps": steps, "sigma": s,
                                       "support": [float(min(n.min() for n in q.nodes)),
                                                   float(max(n.max() for n in q.nodes))]})

    return _run(op, "density", seed, progress, probes * steps, solve, metric)


def grad_norm(target: CurvatureOperator | BaseProblem, *, metric: Metric | None = None) -> Result:
    """gᵀM⁻¹g (gᵀg without a metric) for the gradient g = ∇L; ``info["norm"]`` is its square root. The Riemannian
    gradient M⁻¹g is a tangent vector, so gᵀM⁻¹g is a scalar: invariant for a metric that transforms as a tensor."""
    problem = getattr(target, "problem", None) if not isinstance(target, (BaseProblem, StagedProblem)) else target
    if isinstance(problem, StagedProblem):
        problem.gradient()  # raises: names what the stages offer
    if not isinstance(problem, BaseProblem):
        raise ProblemError(f"grad_norm needs a Problem or a curvature operator, got {type(target).__name__}")
    if metric is not None:
        if not isinstance(metric, Metric):
            raise ProblemError(f"metric must be a curvdist Metric (cd.metric(...)), got {type(metric).__name__}")
        if metric.dim != problem.dim:
            raise ProblemError(f"the metric has dimension {metric.dim} but the problem {problem.dim}")
    t0 = time.perf_counter()
    g = problem.flatten(problem.gradient())
    mg = g if metric is None else metric.solve(g)
    value = float(torch.dot(g.double(), mg.double()))
    curvature = target.kind if isinstance(target, CurvatureOperator) else ""
    return Result(query="grad_norm", value=value, seconds=time.perf_counter() - t0,
                  dtype=str(problem.dtype).replace("torch.", ""), curvature=curvature,
                  metric="euclidean" if metric is None else metric.describe(), coordinates=coordinates_of(problem),
                  backend=problem.backend, info={"norm": float(np.sqrt(max(value, 0.0)))})


def flatness(op: CurvatureOperator, *, metric: Metric | None = None, trace_method: str = "hutchpp",
             matvecs: int = 100, logdet_damping: float = 0.0, probes: int = 10, steps: int = 40, seed: int = 0,
             tol: float | None = None, maxiter: int | None = None, progress: bool = False) -> Result:
    """A bundle of flatness measures of M⁻¹C: top eigenvalue, trace and log det(M⁻¹C + δI) (δ = logdet_damping).
    ``value`` and ``stderr`` are dicts keyed by measure; ``tol``, ``maxiter``: of the top eigenvalue's Lanczos."""
    parts = {
        "top_eigenvalue": eigs(op, k=1, metric=metric, tol=tol, maxiter=maxiter, seed=seed, progress=progress),
        "trace": trace(op, trace_method, matvecs, metric=metric, seed=seed, progress=progress),
        "logdet": logdet(op, logdet_damping, metric=metric, probes=probes, steps=steps, seed=seed,
                         progress=progress),
    }
    first = parts["top_eigenvalue"]
    return Result(query="flatness", value={k: (r.value[0] if k == "top_eigenvalue" else r.value)
                                           for k, r in parts.items()},
                  stderr={k: r.stderr for k, r in parts.items()}, matvecs=sum(r.matvecs for r in parts.values()),
                  seconds=sum(r.seconds for r in parts.values()),
                  converged=all(r.converged for r in parts.values()), seed=seed, dtype=first.dtype,
                  curvature=first.curvature, metric=first.metric, coordinates=first.coordinates,
                  info={k: r.info for k, r in parts.items()})
