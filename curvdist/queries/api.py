"""The query functions of the Python API: eigs, trace, diag, logdet, density, grad_norm.

Each takes a curvature operator (``cd.operator(problem, kind)``), runs a solver from :mod:`curvdist.solvers` on a
local :class:`~curvdist.solvers.space.TorchSpace`, and returns a :class:`Result` recording value, standard error,
matvec count, wall time, convergence, seed and dtype.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ProblemError, SolverError
from ..operators.base import CurvatureOperator
from ..problem.problem import Problem
from ..solvers import DIAG_METHODS, TRACE_METHODS, TorchSpace, eigsh, slq
from .result import Result


class _Counted:
    """Wrap an operator as a linear map on flat tensors, counting products and advancing a progress bar."""

    def __init__(self, op: CurvatureOperator, progress: bool, total: int | None, desc: str) -> None:
        self.op = op
        self.count = 0
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="matvec", leave=False, disable=None)  # off without a TTY

    def __call__(self, v: Tensor) -> Tensor:
        p = self.op.problem
        out = p.flatten(self.op.matvec_params(p.unflatten(v)))
        if not bool(torch.isfinite(out).all()):
            raise SolverError(f"the {self.op.kind} product returned NaN or inf during the solve")
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_op(op: Any) -> CurvatureOperator:
    if not isinstance(op, CurvatureOperator):
        raise ProblemError(
            f"expected a curvature operator (cd.operator(problem, kind)), got {type(op).__name__}"
        )
    return op


def _run(op: CurvatureOperator, query: str, seed: int | None, progress: bool, total: int | None,
         solve: Callable[[_Counted, TorchSpace], dict[str, Any]]) -> Result:
    op = _check_op(op)
    space = TorchSpace(op.dim, op.dtype, op.device)
    counted = _Counted(op, progress, total, query)
    t0 = time.perf_counter()
    try:
        fields = solve(counted, space)
    finally:
        counted.close()
    seconds = time.perf_counter() - t0
    return Result(query=query, matvecs=counted.count, seconds=seconds, seed=seed, dtype=str(op.dtype).replace(
        "torch.", ""), curvature=op.kind, **fields)


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-5


def eigs(op: CurvatureOperator, k: int = 1, which: str = "largest", *, tol: float | None = None,
         maxiter: int | None = None, seed: int = 0, return_vectors: bool = False,
         progress: bool = False) -> Result:
    """The k extreme eigenvalues of C (``which``: largest | smallest | magnitude) by Lanczos with full
    reorthogonalization, stopping when every Ritz residual ‖Cy − θy‖ ≤ tol·max|θ| (default tol 1e-8 in float64,
    1e-5 in float32). ``value`` lists the eigenvalues in the order asked (largest first for "largest");
    ``info["residuals"]`` their residual norms; ``vectors`` the eigenvectors (flat tensors) if requested.
    """
    tol = _default_tol(_check_op(op).dtype) if tol is None else tol

    def solve(apply: _Counted, space: TorchSpace) -> dict[str, Any]:
        r = eigsh(apply, space, k, which, tol=tol, maxiter=maxiter, seed=seed, return_vectors=return_vectors)
        if not r.converged:
            warnings.warn(f"eigs: {k} {which} eigenvalues not converged to tol={tol:g} in {r.iterations} "
                          f"Lanczos steps (largest residual {r.residuals.max():.2e}); raise maxiter",
                          stacklevel=4)
        return dict(value=[float(x) for x in r.values], converged=r.converged, vectors=r.vectors,
                    info={"which": which, "k": k, "tol": tol, "iterations": r.iterations,
                          "residuals": r.residuals.tolist()})

    return _run(op, "eigs", seed, progress, maxiter, solve)


def trace(op: CurvatureOperator, method: str = "hutchpp", matvecs: int = 100, *, seed: int = 0,
          probe: str = "rademacher", progress: bool = False) -> Result:
    """tr C by ``method`` ∈ {hutchinson, hutchpp (Meyer et al. 2021), xtrace (Epperly et al. 2024)} with a
    budget of ``matvecs`` products; ``stderr`` is the estimator's standard error. ``method="exact"`` sums the
    diagonal of the dense matrix (tiny models only)."""
    if method == "exact":
        def exact(apply: _Counted, space: TorchSpace) -> dict[str, Any]:
            value = float(torch.diagonal(apply.op.to_dense()).sum())
            apply.count += space.dim
            return dict(value=value, stderr=0.0, info={"method": "exact"})

        return _run(op, "trace", None, progress, _check_op(op).dim, exact)
    if method not in TRACE_METHODS:
        raise SolverError(f"unknown trace method {method!r}; choose one of {sorted(TRACE_METHODS)} or 'exact'")

    def solve(apply: _Counted, space: TorchSpace) -> dict[str, Any]:
        e = TRACE_METHODS[method](apply, space, matvecs, seed=seed, probe=probe)
        return dict(value=e.value, stderr=e.stderr, info={"method": method, "budget": matvecs, "probe": probe})

    return _run(op, "trace", seed, progress, matvecs, solve)


def diag(op: CurvatureOperator, method: str = "xdiag", matvecs: int = 100, *, seed: int = 0,
         probe: str = "rademacher", progress: bool = False) -> Result:
    """diag C by ``method`` ∈ {hutchinson (Bekas et al. 2007), xdiag (Epperly et al. 2024)}; ``value`` and
    ``stderr`` are flat tensors (entrywise standard error)."""
    if method not in DIAG_METHODS:
        raise SolverError(f"unknown diagonal method {method!r}; choose one of {sorted(DIAG_METHODS)}")

    def solve(apply: _Counted, space: TorchSpace) -> dict[str, Any]:
        e = DIAG_METHODS[method](apply, space, matvecs, seed=seed, probe=probe)
        return dict(value=e.value, stderr=e.stderr, info={"method": method, "budget": matvecs, "probe": probe,
                                                          "sum": float(e.value.sum())})

    return _run(op, "diag", seed, progress, matvecs, solve)


def logdet(op: CurvatureOperator, damping: float = 0.0, *, probes: int = 20, steps: int = 50, seed: int = 0,
           probe: str = "rademacher", progress: bool = False) -> Result:
    """log det(C + δI) by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017) with ``probes`` probes of
    ``steps`` Lanczos steps each; δ = ``damping`` ≥ 0. Raises NotPositiveDefiniteError when C + δI is not
    positive definite."""
    if not damping >= 0:
        raise SolverError(f"damping must be ≥ 0, got {damping!r}")

    def solve(apply: _Counted, space: TorchSpace) -> dict[str, Any]:
        q = slq.quadrature(apply, space, probes, steps, seed=seed, probe=probe)
        value, err, _ = slq.logdet(q, damping)
        return dict(value=value, stderr=err, info={"damping": damping, "probes": probes, "steps": steps})

    return _run(op, "logdet", seed, progress, probes * steps, solve)


def density(op: CurvatureOperator, *, probes: int = 5, steps: int = 80, grid: int | np.ndarray = 1000,
            sigma: float | None = None, seed: int = 0, probe: str = "rademacher",
            progress: bool = False) -> Result:
    """Spectral density of C by stochastic Lanczos quadrature with Gaussian smoothing of width ``sigma``
    (Ghorbani, Krishnan, Xiao 2019). ``value`` = {"grid", "density", "nodes", "weights"}; the density integrates
    to 1."""

    def solve(apply: _Counted, space: TorchSpace) -> dict[str, Any]:
        q = slq.quadrature(apply, space, probes, steps, seed=seed, probe=probe)
        t, phi, s = slq.density(q, grid, sigma)
        value = {"grid": t, "density": phi, "nodes": q.nodes, "weights": q.weights}
        return dict(value=value, info={"probes": probes, "steps": steps, "sigma": s,
                                       "support": [float(min(n.min() for n in q.nodes)),
                                                   float(max(n.max() for n in q.nodes))]})

    return _run(op, "density", seed, progress, probes * steps, solve)


def grad_norm(target: CurvatureOperator | Problem) -> Result:
    """gᵀg for the gradient g = ∇L of the problem (Euclidean metric); ``info["norm"]`` is ‖g‖."""
    problem = target.problem if isinstance(target, CurvatureOperator) else target
    if not isinstance(problem, Problem):
        raise ProblemError(f"grad_norm needs a Problem or a curvature operator, got {type(target).__name__}")
    t0 = time.perf_counter()
    g = problem.flatten(problem.gradient())
    value = float(torch.dot(g.double(), g.double()))
    curvature = target.kind if isinstance(target, CurvatureOperator) else ""
    return Result(query="grad_norm", value=value, seconds=time.perf_counter() - t0,
                  dtype=str(problem.dtype).replace("torch.", ""), curvature=curvature,
                  info={"norm": float(np.sqrt(value))})
