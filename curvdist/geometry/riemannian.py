"""The Riemannian Hessian of the loss for a pull-back metric, in ψ coordinates.

For the metric M_ψ = Jᵀ M_θ J pulled back from constant M_θ through θ = φ(ψ), the Levi-Civita connection is the
pull-back of the flat one, and the Riemannian Hessian is (DESIGN.md §1)

    Hess_ψ L = ∇²_ψ L − Σ_k (∂L/∂θ_k) ∇²_ψ φ_k = Jᵀ H_θ J,

exact at every point, not only at critical points. Two ways to apply it:

* ``method="pullback"``: Jᵀ(H_θ(J v)) with one JVP and one VJP of φ and a θ Hessian-vector product;
* ``method="autodiff"``: the ψ problem's own Hessian-vector product (autodiff through φ) minus the second-order
  term Σ_k g_k ∇²φ_k v with g = ∇_θ L = J⁻ᵀ ∇_ψ L — computed entirely in ψ, which is how the tests and the CLI
  show that invariant quantities agree between coordinate systems.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.func import vmap

from ..errors import ProblemError
from ..operators import CurvatureOperator, operator
from ..problem.problem import Params, Problem


def reparam_of(problem: Problem) -> tuple[Any, Problem] | None:
    """(bound reparametrization, θ problem) of a problem made by ``cd.reparametrize``, else None."""
    r = getattr(problem.model, "reparam", None)
    theta = getattr(problem.model, "theta_problem", None)
    return (r, theta) if r is not None and theta is not None else None


class RiemannianHessian(CurvatureOperator):
    """Hess_ψ L = Jᵀ H_θ J on a problem made by ``cd.reparametrize`` (see module docstring)."""

    kind = "riemannian_hessian"

    def __init__(self, problem: Problem, method: str = "autodiff", check_determinism: bool = True) -> None:
        found = reparam_of(problem)
        if found is None:
            raise ProblemError("the Riemannian Hessian needs a problem made by cd.reparametrize(problem, r)")
        if method not in ("autodiff", "pullback"):
            raise ProblemError(f"method must be 'autodiff' or 'pullback', got {method!r}")
        self.reparam, self.theta_problem = found
        self.method = method
        self.psi: Params = problem.params
        if method == "autodiff":
            self.inner = operator(problem, "hessian", check_determinism=False)
            if self.reparam.bijective:
                self.grad_theta = self.reparam.vjp_inverse(self.psi, problem.gradient())
            else:
                self.grad_theta = self.theta_problem.gradient()
        else:
            self.inner = operator(self.theta_problem, "hessian", check_determinism=False)
        super().__init__(problem, check_determinism)

    def batch_matvec(self, params: Params, v: Params, X: Tensor, y: Tensor, ctx: Any) -> Params:
        raise NotImplementedError  # products are assembled in matvec_params

    def matvec_params(self, v: Params) -> Params:
        r = self.reparam
        if self.method == "pullback":
            return r.vjp(self.psi, self.inner.matvec_params(r.jvp(self.psi, v)))
        h = self.inner.matvec_params(v)
        s = r.second_order(self.psi, self.grad_theta, v)
        return tuple(a - b for a, b in zip(h, s))

    def matmat_params(self, V: Params) -> Params:
        """The same for a block of vectors stacked along a leading axis (vectorized with vmap)."""
        r = self.reparam
        if self.method == "pullback":
            JV = vmap(lambda u: r.jvp(self.psi, u))(V)
            return vmap(lambda w: r.vjp(self.psi, w))(self.inner.matmat_params(JV))
        h = self.inner.matmat_params(V)
        s = vmap(lambda u: r.second_order(self.psi, self.grad_theta, u))(V)
        return tuple(a - b for a, b in zip(h, s))
