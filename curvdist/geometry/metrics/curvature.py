"""Curvature matrices as metrics: M = F (type-2 Fisher), G (GGN), a Monte-Carlo or empirical Fisher.

Two ways to invert M_δ = M + δR:

* ``dense`` (tiny models, default when d ≤ 4096): materialize M_δ in the operator's dtype and factor it once,
  M_δ = L Lᵀ (Cholesky); the factor W = Lᵀ gives the symmetric form W⁻ᵀ C W⁻¹ = L⁻¹ C L⁻ᵀ and an exact log-det.
* ``cg`` (matrix-free): M_δ is only applied; M_δ⁻¹ v is solved by conjugate gradients (no factor, so eigenvalue
  queries run Lanczos in the M_δ-inner product).

The Fisher and the GGN are tensors under every reparametrization (G_ψ = Jᵀ G_θ J, by the chain rule through the
network output), which is what makes eigenvalues of G⁻¹H invariant at critical points.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ...catalogue import SolveMethod, parse
from ...errors import MetricError, SingularMetricError
from ...operators import CurvatureOperator, operator
from ...problem.problem import Problem
from ...solvers.cg import cg
from ...solvers.space import TorchSpace
from .base import Metric

DENSE_AUTO_LIMIT = 4096
KINDS = ("fisher", "ggn", "fisher_mc", "empirical_fisher")


class CurvatureMetric(Metric):
    """M_δ = C + δR for a PSD curvature operator C of the problem (``fisher``, ``ggn``, ``fisher_mc``,
    ``empirical_fisher``)."""

    def __init__(self, problem: Problem, kind: str = "fisher", damping: float = 0.0,
                 damping_metric: Metric | None = None, method: str = "auto", cg_tol: float = 1e-10,
                 cg_maxiter: int | None = None, **operator_options: Any) -> None:
        if kind not in KINDS:
            raise MetricError(f"curvature metric kind must be one of {KINDS}, got {kind!r}")
        super().__init__(problem.dim, problem.dtype, problem.device, damping, damping_metric)
        self.kind = kind
        self.problem = problem
        self.op: CurvatureOperator = operator(problem, kind, **operator_options)
        method = parse(SolveMethod, method, "curvature-metric method").value
        if method == "auto":
            method = "dense" if problem.dim <= DENSE_AUTO_LIMIT else "cg"
        self.method = method
        self.cg_tol, self.cg_maxiter = cg_tol, cg_maxiter
        self.has_factor = self.has_inv_sqrt = False
        self._chol: Tensor | None = None
        if method == "dense":
            self._factor()

    def to_dense(self, max_dim: int = 8192) -> Tensor:
        """M_δ, the operator's vectorized dense matrix plus the damping term."""
        M = self.op.to_dense(max_dim=max_dim)
        if self.damping:
            R = torch.eye(self.dim, dtype=self.dtype, device=self.device) if self.damping_metric is None \
                else self.damping_metric.to_dense(max_dim=max_dim)
            M = M + self.damping * R
        return M

    def _factor(self) -> None:
        M = self.to_dense(max_dim=max(self.dim, DENSE_AUTO_LIMIT))
        M = 0.5 * (M + M.T)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            advice = "add damping > 0" if self.damping_metric is None else (
                f"add damping, and check that the damping reference ({self.damping_metric.kind}) is itself "
                "positive definite (a pull-back through a non-bijective map is not)")
            raise SingularMetricError(
                f"the {self.kind} metric (damping {self.damping:g}) is singular or not positive definite "
                f"(Cholesky failed at column {int(info)}); {advice}"
            )
        self._chol = L
        self.has_factor = True

    def apply_undamped(self, v: Tensor) -> Tensor:
        return self.op.matvec(v)

    def solve(self, v: Tensor) -> Tensor:
        self._check(v)
        if self._chol is not None:
            return torch.cholesky_solve(v[:, None], self._chol)[:, 0]
        res = cg(self.apply, TorchSpace(self.dim, self.dtype, self.device), v, tol=self.cg_tol,
                 maxiter=self.cg_maxiter, what=f"{self.kind} metric")
        if not res.converged:
            warnings.warn(f"CG for the {self.kind} metric stopped at relative residual {res.residual:.2e} after "
                          f"{res.iterations} iterations; the metric may be ill-conditioned: add damping",
                          stacklevel=2)
        return res.x

    def inv_factor_apply(self, v: Tensor) -> Tensor:
        """W⁻¹ v = L⁻ᵀ v (W = Lᵀ)."""
        self._check(v)
        if self._chol is None:
            return super().inv_factor_apply(v)
        return torch.linalg.solve_triangular(self._chol.T, v[:, None], upper=True)[:, 0]

    def inv_factor_t_apply(self, v: Tensor) -> Tensor:
        """W⁻ᵀ v = L⁻¹ v."""
        self._check(v)
        if self._chol is None:
            return super().inv_factor_t_apply(v)
        return torch.linalg.solve_triangular(self._chol, v[:, None], upper=False)[:, 0]

    def logdet(self) -> float:
        if self._chol is None:
            return super().logdet()
        return 2.0 * float(torch.log(torch.diagonal(self._chol).double()).sum())

    def describe(self) -> str:
        return super().describe()


class SolvedMetric(Metric):
    """M_δ = C + δI for a PSD operator C whose vectors live in its own vector space (pipeline shards, ZeRO-3
    partitions): applied through the operator and solved by CG in that space — no factor, so eigenvalue queries
    run Lanczos in the M_δ-inner product. A CG that stops before ``cg_tol`` warns with its residual."""

    def __init__(self, op: Any, damping: float = 0.0, kind: str | None = None, cg_tol: float = 1e-12,
                 cg_maxiter: int | None = None) -> None:
        super().__init__(op.dim, op.dtype, "cpu", damping)
        self.op, self.space = op, op.vector_space()
        self.kind = kind or op.kind
        self.cg_tol, self.cg_maxiter = cg_tol, cg_maxiter

    def apply_undamped(self, v: Any) -> Any:
        return self.op.apply_vector(v)

    def apply(self, v: Any) -> Any:
        out = self.op.apply_vector(v)
        return self.space.axpy(self.damping, v, out) if self.damping else out

    def solve(self, v: Any) -> Any:
        res = cg(self.apply, self.space, v, tol=self.cg_tol, maxiter=self.cg_maxiter, what=f"{self.kind} metric")
        if not res.converged:
            warnings.warn(f"CG for the {self.kind} metric stopped at relative residual {res.residual:.2e} after "
                          f"{res.iterations} iterations; raise cg_maxiter or damping", stacklevel=2)
        return res.x
