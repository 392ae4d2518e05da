"""The pull-back of a metric of θ coordinates to ψ coordinates through θ = φ(ψ):  M_ψ = Jᵀ M_θ J.

Applied matrix-free with one JVP and one VJP of φ. When M_θ has a factor M_θ = W_θᵀW_θ and J is invertible,
W = W_θ J is a factor of M_ψ, so W⁻¹ = J⁻¹W_θ⁻¹ and W⁻ᵀ = W_θ⁻ᵀJ⁻ᵀ, and log det M_ψ = log det M_θ + 2 log|det J|.
Pulling back the Euclidean metric of θ (M_θ = I) gives JᵀJ: with it, the eigenvalues of M_ψ⁻¹ Hess_ψ L equal those
of the Euclidean Hessian in θ, at every point, when Hess_ψ is the Riemannian Hessian Jᵀ H_θ J (DESIGN.md §1).
"""

from __future__ import annotations

from torch import Tensor

from ...errors import MetricError, ReparamError, SolverError
from ..reparam.base import Params, Reparametrization
from ..transform import pull_covector, pull_vector, push_covector, push_vector
from .base import Metric


class PullbackMetric(Metric):
    """M_ψ = J(ψ)ᵀ M_θ J(ψ) for a bound reparametrization and a point ψ."""

    kind = "pullback"

    def __init__(self, theta_metric: Metric, reparam: Reparametrization, psi: Params) -> None:
        if theta_metric.dim != reparam.theta_dim:
            raise MetricError(f"θ metric has dimension {theta_metric.dim}, the reparametrization maps to "
                              f"{reparam.theta_dim}")
        super().__init__(reparam.psi_dim, theta_metric.dtype, theta_metric.device)
        self.theta_metric, self.reparam, self.psi = theta_metric, reparam, tuple(psi)
        self.kind = f"pullback({theta_metric.describe()})"
        self.has_factor = theta_metric.has_factor and reparam.bijective
        self.diagonal_only = theta_metric.diagonal_only

    def _J(self, v: Tensor) -> Tensor:
        return push_vector(self.reparam, self.psi, v)

    def _Jt(self, w: Tensor) -> Tensor:
        return pull_covector(self.reparam, self.psi, w)

    def _Jinv(self, t: Tensor) -> Tensor:
        return pull_vector(self.reparam, self.psi, t)

    def _Jinv_t(self, c: Tensor) -> Tensor:
        return push_covector(self.reparam, self.psi, c)

    def apply_undamped(self, v: Tensor) -> Tensor:
        return self._Jt(self.theta_metric.apply(self._J(v)))

    def solve(self, v: Tensor) -> Tensor:
        self._check(v)
        return self._Jinv(self.theta_metric.solve(self._Jinv_t(v)))

    def inv_factor_apply(self, v: Tensor) -> Tensor:
        self._check(v)
        self._need_factor()
        return self._Jinv(self.theta_metric.inv_factor_apply(v))

    def inv_factor_t_apply(self, v: Tensor) -> Tensor:
        self._check(v)
        self._need_factor()
        return self.theta_metric.inv_factor_t_apply(self._Jinv_t(v))

    def _need_factor(self) -> None:
        if not self.reparam.bijective:  # the reparametrization's own error names the missing inverse Jacobian
            self.reparam.vjp_inverse(self.psi, self.psi)
            raise ReparamError(f"the pullback through {self.reparam.kind} has no factor: J is not invertible")
        if not self.theta_metric.has_factor:
            raise SolverError(f"the pulled-back {self.theta_metric.kind} metric has no cheap factor; use its solve")

    def logdet(self) -> float:
        return self.theta_metric.logdet() + 2.0 * self.reparam.logabsdet(self.psi)
