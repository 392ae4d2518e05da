"""Conjugate gradients for a symmetric positive-definite operator (Hestenes & Stiefel 1952)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SingularMetricError
from .space import LinearMap, Vector, VectorSpace


@dataclass
class CGResult:
    x: Vector
    iterations: int
    residual: float  # ‖b − A x‖ / ‖b‖
    converged: bool


def cg(apply: LinearMap, space: VectorSpace, b: Vector, *, tol: float = 1e-10, maxiter: int | None = None,
       what: str = "operator") -> CGResult:
    """Solve A x = b; stop when ‖b − A x‖ ≤ tol·‖b‖. Raises SingularMetricError when pᵀAp ≤ 0 (A not PD)."""
    maxiter = maxiter if maxiter is not None else 10 * space.dim
    bnorm = space.norm(b)
    x = space.zeros()
    if bnorm == 0:
        return CGResult(x, 0, 0.0, True)
    r = b
    p = r
    rr = space.dot(r, r)
    for k in range(1, maxiter + 1):
        Ap = apply(p)
        pAp = space.dot(p, Ap)
        if not pAp > 0:
            raise SingularMetricError(
                f"the {what} is singular or not positive definite (pᵀAp = {pAp:.3e} in CG); add damping > 0"
            )
        alpha = rr / pAp
        x = space.axpy(alpha, p, x)
        r = space.axpy(-alpha, Ap, r)
        rr_new = space.dot(r, r)
        if np.sqrt(rr_new) <= tol * bnorm:
            return CGResult(x, k, float(np.sqrt(rr_new) / bnorm), True)
        p = space.axpy(rr_new / rr, p, r)
        rr = rr_new
    return CGResult(x, maxiter, float(np.sqrt(rr) / bnorm), False)
