"""Build the reparametrized problem: the same loss and data as a function of ψ, with θ = φ(ψ).

The new problem's model is a :class:`ReparametrizedModel` that holds ψ as its only parameters and evaluates the
original network by ``torch.func.functional_call`` with θ = r.forward(ψ). Every curvature of the new problem is
therefore computed by autodiff *through* φ (never by the transformation formulas of DESIGN.md §1), which is what
makes it an independent check of those formulas.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...errors import MetricError, ProblemError, ReparamError
from ...problem.problem import Problem
from .base import Params, Reparametrization


def psi_key(name: str) -> str:
    """The ParameterDict key of a ψ parameter: its name with dots replaced by underscores."""
    return name.replace(".", "_")


class ReparametrizedModel(nn.Module):
    """f(X; ψ) = f_θ(X; φ(ψ)): the original model evaluated at θ = r.forward(ψ).

    Attributes:
        psi: ``nn.ParameterDict`` of the ψ tensors, keyed by :func:`psi_key` of ``reparam.psi_names`` (in order),
            so the problem's parameter names are ``"psi.<key>"``.
        psi_param_names: those problem parameter names, aligned with ``reparam.psi_names``.
        reparam: the bound reparametrization.
        theta_problem: the original problem (θ coordinates).
        theta_model: the original network (held as a plain attribute, not a submodule, so its parameters do not
            appear among the wrapper's).

    The unselected parameters and the buffers of the original are held fixed (aliased, detached), as in the
    original problem. ``train``/``eval`` on the wrapper set the original's mode too; the wrapper starts in the
    original's mode.
    """

    def __init__(self, theta_problem: Problem, reparam: Reparametrization, psi0: Params) -> None:
        super().__init__()
        keys = [psi_key(n) for n in reparam.psi_names]
        if len(set(keys)) != len(keys):
            keys = [f"p{i}_{k}" for i, k in enumerate(keys)]
        # a list of pairs keeps the order (ParameterDict sorts the keys of a plain dict)
        self.psi = nn.ParameterDict([(k, nn.Parameter(t.detach().clone())) for k, t in zip(keys, psi0)])
        self.psi_keys: tuple[str, ...] = tuple(keys)
        self.psi_param_names: tuple[str, ...] = tuple(f"psi.{k}" for k in keys)
        model = theta_problem.model
        object.__setattr__(self, "theta_model", model)  # not registered as a submodule
        self.reparam = reparam
        self.theta_problem = theta_problem
        selected = set(theta_problem.param_names)
        frozen: dict[str, Tensor] = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
        frozen.update(dict(model.named_buffers()))
        self._frozen = frozen
        super().train(model.training)
        if tuple(n for n, _ in self.named_parameters()) != self.psi_param_names:
            raise ReparamError("internal: the ψ parameters of the wrapper are out of order")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The original model at θ = φ(ψ), by autodiff through ``reparam.forward`` (called with the original's
        positional or keyword inputs, returning what it returns)."""
        psi = tuple(self.psi[k] for k in self.psi_keys)
        state = dict(self._frozen)
        state.update(zip(self.reparam.theta_names, self.reparam.forward(psi)))
        return functional_call(self.theta_model, state, args, kwargs)

    def train(self, mode: bool = True) -> ReparametrizedModel:
        """Set train/eval mode on the wrapper and on the original network."""
        super().train(mode)
        self.theta_model.train(mode)
        return self

    def extra_repr(self) -> str:
        return f"reparam={self.reparam!r}, theta_model={type(self.theta_model).__name__}"


def reparametrize(problem: Problem, r: Reparametrization) -> Problem:
    """The problem in ψ coordinates, θ = φ(ψ), at ψ₀ = r.inverse(θ₀) (same loss, data and reduction).

    Binds ``r`` to ``problem``'s layout (``param_names``, ``shapes``). The returned problem's model is a
    :class:`ReparametrizedModel` (``.reparam``, ``.theta_problem``); its parameters are ψ, named ``"psi.<key>"``
    in ``r.psi_names`` order (dots replaced by underscores), so ``new.params`` is the point ψ₀ as a tuple that
    ``r``'s methods accept. Raises :class:`~curvdist.errors.ReparamError` when ``r`` does not fit the parameters
    or is not invertible at θ₀.
    """
    if not isinstance(problem, Problem):
        raise ProblemError(f"reparametrize() needs a curvdist.Problem, got {type(problem).__name__}")
    if not isinstance(r, Reparametrization):
        raise ReparamError(f"reparametrize() needs a Reparametrization, got {type(r).__name__}")
    r.bind(problem.param_names, problem.shapes)
    with torch.no_grad():
        psi0 = tuple(t.detach() for t in r.inverse(problem.params))
    for name, t in zip(r.psi_names, psi0):
        if not bool(torch.isfinite(t).all()):
            raise ReparamError(f"{r.kind}: the inverse gives NaN or inf for ψ parameter '{name}' at the current point")
    model = ReparametrizedModel(problem, r, psi0)
    return Problem(model, problem.loss, problem.data, reduction=problem.reduction,
                   micro_batch_size=problem.micro_batch_size, accumulate_dtype=problem.accumulate_dtype)


def psi_jacobian(problem: Problem, what: str) -> tuple[ReparametrizedModel, tuple[Tensor, ...] | None] | None:
    """For a problem made by :func:`reparametrize`: its model and J's diagonal at ψ (``jacobian_diagonal``: one
    tensor per ψ parameter, 0-d where J = c·I on that tensor; None when J mixes entries). None for any other
    problem. ``what`` names the requester in the error raised when only some ψ parameters are selected."""
    model = getattr(problem, "model", None)
    if not isinstance(model, ReparametrizedModel):
        return None
    if tuple(problem.param_names) != tuple(model.psi_param_names):
        raise MetricError(f"{what} needs all ψ parameters {list(model.psi_param_names)} selected, got "
                          f"{list(problem.param_names)}")
    return model, model.reparam.jacobian_diagonal(tuple(p.detach() for p in problem.params))


def not_scalar_per_tensor(r: Reparametrization, diag: tuple[Tensor, ...] | None) -> str | None:
    """Why J is not c_p·I on every ψ tensor (what Kronecker blocks need), or None when it is."""
    if diag is None:
        return "its Jacobian mixes parameter entries (it is not diagonal)"
    entrywise = [n for n, d in zip(r.psi_names, diag) if d.numel() != 1]
    if entrywise:
        return f"its Jacobian scales the entries of {entrywise} individually (it is not c·I on each tensor)"
    return None
