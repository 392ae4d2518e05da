"""The Hessian of the empirical risk, ∇²L(θ), applied by forward-over-reverse differentiation."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.func import grad, jvp

from ..problem.problem import Params
from .base import CurvatureOperator


class Hessian(CurvatureOperator):
    """H v = s · Σ_n ∇²_θ ℓ(f(x_n; θ), y_n) v, one ``jvp`` of ``grad`` per batch (Pearlmutter 1994)."""

    kind = "hessian"

    def batch_matvec(self, params: Params, v: Params, X: Tensor, y: Tensor, ctx: Any) -> Params:
        def batch_grad(p: Params) -> Params:
            return grad(self.problem.batch_loss)(p, X, y)

        return jvp(batch_grad, (params,), (v,))[1]
