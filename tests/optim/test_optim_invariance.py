"""Riemannian gradient descent is parametrization-invariant to first order in the step size.

The same model is trained from the same point in θ and in ψ coordinates (θ = φ(ψ)) with the damped Fisher metric,
carried along as a tensor in ψ (M_ψ = Jᵀ(F_θ + δI)J = F_ψ + δ·JᵀJ, the damping referenced to the pull-back of the
θ identity). Each step agrees to O(α²), so over a fixed time t = K·α the ψ trajectory mapped into θ differs from the
θ trajectory by O(α): halving α halves the gap. For a linear reparametrization (J constant) the natural-gradient
step is invariant exactly, at every α (affine invariance): the gap is rounding. Plain gradient descent and Adam are
not invariant: their gap does not shrink. weight_norm is left out: it is not a bijection (ψ has a scale direction per row that θ does not see),
so the pulled-back metric is singular and the natural-gradient step is not defined in ψ.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import curvdist as cd
from curvdist.geometry.reparam import Reparametrization, compose, exp, linear, ntk, scale, softplus
from curvdist.optim import RiemannianSGD
from tests.cases import CASES

DELTA = 0.05
TIME = 0.4  # K · α
STEPS = (2, 4, 8)  # α = TIME / K


def _mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    case = CASES["mlp"]()
    model = case.model()
    with torch.no_grad():
        model[2].bias.copy_(model[2].bias.abs() + 1.1)  # positive, so exp/softplus can act on it
    return model, (case.X, case.y)


def _scale() -> Reparametrization:
    g = torch.Generator().manual_seed(3)
    return scale({"0.weight": 10.0 ** (2 * torch.rand(5, 8, generator=g, dtype=torch.float64) - 1), "2.bias": 0.2})


NONLINEAR = {"exp", "softplus"}
REPARAMS: dict[str, Callable[[], Reparametrization]] = {
    "scale": _scale, "exp": lambda: exp("2.bias"), "softplus": lambda: softplus("2.bias"),
    "ntk": lambda: ntk(sigma_w=0.3, sigma_b=0.2), "linear": lambda: linear(seed=0, condition=30.0),
    "ntk∘scale": lambda: compose(ntk(sigma_w=0.3, sigma_b=0.2), _scale()),
}


def _psi_model(model: torch.nn.Module, data: tuple, r: Reparametrization) -> torch.nn.Module:
    return cd.reparametrize(cd.Problem(model, "cross_entropy", data), r).model


def _theta_of(model: torch.nn.Module) -> torch.Tensor:
    """θ as a flat vector, for a θ model or a ψ model (through φ)."""
    r = getattr(model, "reparam", None)
    if r is None:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        return r.flatten_theta(r.forward(tuple(p.detach() for p in model.psi.values())))


def _run(model: torch.nn.Module, data: tuple, method: str, lr: float, steps: int) -> torch.Tensor:
    X, y = data
    if method == "riemannian":
        in_psi = getattr(model, "reparam", None) is not None
        metric = ((lambda p: cd.metric(p, "fisher", DELTA, damping_metric=cd.metric(p, "pullback")))
                  if in_psi else "fisher")
        opt: torch.optim.Optimizer = RiemannianSGD(model, "cross_entropy", data, metric=metric, lr=lr,
                                                   damping=DELTA, refresh=1)
    elif method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr * 0.1)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return _theta_of(model)


def _gaps(reparam: str, method: str) -> list[float]:
    """‖θ_ψ(t) − θ(t)‖ / ‖θ(t) − θ(0)‖ for α = t/K, K in STEPS."""
    out = []
    for K in STEPS:
        model, data = _mlp()
        start = _theta_of(model)
        psi_model = _psi_model(model, data, REPARAMS[reparam]())
        theta_end = _run(model, data, method, TIME / K, K)
        psi_end = _run(psi_model, data, method, TIME / K, K)
        out.append(float((psi_end - theta_end).norm() / (theta_end - start).norm()))
    return out


@pytest.mark.parametrize("reparam", sorted(REPARAMS))
def test_riemannian_trajectories_agree_to_first_order(reparam: str) -> None:
    gaps = _gaps(reparam, "riemannian")
    if reparam not in NONLINEAR:
        assert max(gaps) < 1e-11, gaps  # exactly invariant
        return
    ratios = [gaps[i] / gaps[i + 1] for i in range(len(gaps) - 1)]
    assert all(1.6 < r < 2.5 for r in ratios), (gaps, ratios)  # O(α): halving α halves the gap
    assert gaps[-1] < 0.05, gaps


@pytest.mark.parametrize("reparam", ["scale", "ntk", "linear", "exp"])
@pytest.mark.parametrize("method", ["sgd", "adam"])
def test_sgd_and_adam_trajectories_do_not(reparam: str, method: str) -> None:
    gaps = _gaps(reparam, method)
    riemannian = _gaps(reparam, "riemannian")
    assert gaps[-1] > 0.7 * gaps[0], gaps  # the gap does not vanish as α → 0
    assert gaps[-1] > 10 * riemannian[-1], (gaps, riemannian)


@pytest.mark.parametrize("reparam", ["scale", "linear", "ntk∘scale"])
def test_pullback_metric_in_psi_is_gradient_descent_in_theta(reparam: str) -> None:
    """M_ψ = JᵀJ (the pull-back of the Euclidean θ metric): for a linear φ, Riemannian steps in ψ are exactly plain
    gradient-descent steps in θ."""
    model, data = _mlp()
    psi_model = _psi_model(model, data, REPARAMS[reparam]())
    theta_end = _run(model, data, "sgd", 0.1, 3)
    opt = RiemannianSGD(psi_model, "cross_entropy", data, metric="pullback", lr=0.1, damping=0.0, refresh=1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(psi_model(data[0]), data[1]).backward()
        opt.step()
    torch.testing.assert_close(_theta_of(psi_model), theta_end, rtol=1e-10, atol=1e-12)
