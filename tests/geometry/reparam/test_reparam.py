"""Reparametrizations and the transformation rules of DESIGN.md §1, checked honestly.

Everything in ψ is computed by autodiff on the reparametrized problem (``reparametrize`` evaluates the original
network through ``r.forward``) or by plain-autograd dense ground truth (``tests.dense``), and compared with the
closed-form Jacobian products and the transformation formulas (``curvdist.geometry.transform``). float64, relative
tolerance 1e-9. The points are the models' own (not critical points), so the second-order term of the Hessian rule
is present wherever φ is non-linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch
from torch import Tensor, nn

import curvdist as cd
from curvdist.errors import ReparamError
from curvdist.geometry import transform as T
from curvdist.geometry.reparam import (
    Reparametrization,
    ReparametrizedModel,
    compose,
    exp,
    linear,
    make_reparam,
    ntk,
    reparametrize,
    scale,
    softplus,
    weight_norm,
)
from tests.cases import CASES, make_problem
from tests.dense import autograd_hessian, autograd_jacobian

TOL = 1e-9


def assert_rel(a: Tensor, b: Tensor, tol: float = TOL, what: str = "") -> None:
    """max|a − b| ≤ tol · max|b| (exactly equal when b is zero)."""
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    err, ref = float((a - b).abs().max()), float(b.abs().max())
    assert err <= tol * ref or err == 0.0, f"{what}: max error {err:.3e}, max reference {ref:.3e}"


def flat(ts: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


# ---------------------------------------------------------------------------------------------- the kinds


@dataclass(frozen=True)
class Spec:
    case: str
    build: Callable[[], Reparametrization]
    shift_bias: str | None = None  # make this bias > 1 first (exp/softplus need positive values)
    nonlinear: bool = False  # the second-order term Σ_k g_k ∇²φ_k is non-zero


def _tensor(shape: tuple[int, ...], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(shape, generator=g, dtype=torch.float64) * torch.where(
        torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()  # entries in ±[0.5, 1.5]


SPECS: dict[str, Spec] = {
    "mlp-scale-global": Spec("mlp", lambda: scale(2.5)),
    "mlp-scale-tensors": Spec("mlp", lambda: scale({"0.weight": _tensor((5, 1), 0), "2.weight": _tensor((4, 5), 1),
                                                     "2.bias": 0.3})),
    "mlp-exp": Spec("mlp", lambda: exp("2.bias"), "2.bias", True),
    "mlp-softplus": Spec("mlp", lambda: softplus("2.bias"), "2.bias", True),
    "mlp-ntk": Spec("mlp", lambda: ntk(sigma_w=1.3, sigma_b=0.7)),
    "mlp-weight_norm": Spec("mlp", lambda: weight_norm(), None, True),
    "mlp-linear": Spec("mlp", lambda: linear(seed=0, condition=10.0)),
    "mlp-ntk∘scale": Spec("mlp", lambda: compose(ntk(1.3, 0.7), scale({"0.weight": 2.0, "2.bias": _tensor((4,), 2)}))),
    "mlp-exp∘softplus": Spec("mlp", lambda: compose(exp("2.bias"), softplus("2.bias")), "2.bias", True),
    "mlp-scale∘(weight_norm∘exp_g)": Spec(
        "mlp", lambda: compose(scale(0.5), compose(weight_norm(), exp(["0.weight.g", "2.weight.g"]))), None, True),
    "cnn-scale": Spec("cnn", lambda: scale({"0.weight": _tensor((2, 1, 1, 1), 3), "6.weight": 0.25, "6.bias": 3.0})),
    "cnn-ntk": Spec("cnn", lambda: ntk(sigma_w=2.0, sigma_b=0.5)),
    "cnn-weight_norm": Spec("cnn", lambda: weight_norm(["0.weight", "3.weight", "6.weight"]), None, True),
    "cnn-ntk∘weight_norm": Spec("cnn", lambda: compose(ntk(), weight_norm()), None, True),
}


@lru_cache(maxsize=None)
def theta_setup(case: str, shift_bias: str | None) -> tuple[cd.Problem, Tensor, Tensor, Tensor]:
    """The θ problem and its dense Hessian, GGN and gradient (autodiff in θ)."""
    c = CASES[case]()
    model = c.model()
    if shift_bias is not None:
        with torch.no_grad():
            dict(model.named_parameters())[shift_bias].abs_().add_(1.1)
    p = make_problem(c, model=model)
    H = cd.operator(p, "hessian").to_dense(chunk=512)
    G = cd.operator(p, "ggn").to_dense(chunk=512)
    return p, H, G, p.flatten(p.gradient())


@dataclass
class Setup:
    p: cd.Problem
    r: Reparametrization
    q: cd.Problem  # the ψ problem
    psi: tuple[Tensor, ...]
    fwd: Callable[[Tensor], Tensor]  # flat ψ ↦ flat θ
    J: Tensor  # dense Jacobian, plain autograd
    H: Tensor
    G: Tensor
    g: Tensor  # ∇_θ L


@lru_cache(maxsize=None)
def setup(spec_id: str) -> Setup:
    spec = SPECS[spec_id]
    p, H, G, g = theta_setup(spec.case, spec.shift_bias)
    r = spec.build()
    q = reparametrize(p, r)
    psi = q.params

    def fwd(x: Tensor) -> Tensor:
        return flat(r.forward(r.unflatten_psi(x)))

    J = autograd_jacobian(fwd, flat(psi))
    return Setup(p, r, q, psi, fwd, J, H, G, g)


def pairing_hessian(s: Setup, w: Tensor) -> Tensor:
    """Σ_k w_k ∇²φ_k(ψ) densely, by double backward of ψ ↦ ⟨w, φ(ψ)⟩ (the zero term keeps a graph for linear φ)."""
    return autograd_hessian(lambda x: (w * s.fwd(x)).sum() + 0.0 * (x * x).sum(), flat(s.psi))


def randn_like_all(ts: tuple[Tensor, ...], seed: int) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in ts)


ids = list(SPECS)


# ---------------------------------------------------------------------------------------------- the map


@pytest.mark.parametrize("spec_id", ids)
def test_reparametrized_problem(spec_id: str) -> None:
    """ψ problem: only ψ parameters, recognisable names, attributes, same loss value, same train/eval mode."""
    s = setup(spec_id)
    model = s.q.model
    assert isinstance(model, ReparametrizedModel)
    assert model.reparam is s.r and model.theta_problem is s.p
    assert s.q.param_names == model.psi_param_names == tuple(f"psi.{n.replace('.', '_')}" for n in s.r.psi_names)
    assert [tuple(t.shape) for t in s.psi] == [tuple(sh) for sh in s.r.psi_shapes]
    assert len(list(model.parameters())) == len(s.r.psi_names)  # the original's parameters are not registered
    assert s.q.reduction == s.p.reduction and s.q.loss is s.p.loss and s.q.num_samples == s.p.num_samples
    assert abs(s.q.value() - s.p.value()) <= TOL * abs(s.p.value())  # L_ψ(ψ₀) = L_θ(θ₀)
    assert model.training == s.p.model.training
    try:
        model.train()
        assert s.p.model.training
    finally:
        model.eval()
    assert not s.p.model.training


@pytest.mark.parametrize("spec_id", ids)
def test_forward_inverse_roundtrip(spec_id: str) -> None:
    """φ(φ⁻¹(θ)) = θ; for bijective kinds also φ⁻¹(φ(ψ)) = ψ at a perturbed ψ."""
    s = setup(spec_id)
    for a, b in zip(s.r.forward(s.r.inverse(s.p.params)), s.p.params):
        assert_rel(a, b, what="forward(inverse(θ))")
    if s.r.bijective:
        psi = tuple(t + 0.1 * d for t, d in zip(s.psi, randn_like_all(s.psi, 1)))
        for a, b in zip(s.r.inverse(s.r.forward(psi)), psi):
            assert_rel(a, b, what="inverse(forward(ψ))")
    else:
        assert s.r.psi_dim > s.r.theta_dim


@pytest.mark.parametrize("spec_id", ids)
def test_closed_form_derivatives(spec_id: str) -> None:
    """jvp/vjp/second_order equal torch.func defaults and dense plain-autograd truth; inverses; log|det J|."""
    s = setup(spec_id)
    r, psi = s.r, s.psi
    u = randn_like_all(psi, 2)
    w = tuple(torch.randn(sh, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
              for sh in r.theta_shapes)
    Ju, Jtw, S = r.jvp(psi, u), r.vjp(psi, w), r.second_order(psi, w, u)
    assert_rel(flat(Ju), flat(Reparametrization.jvp(r, psi, u)), what="jvp vs torch.func")
    assert_rel(flat(Jtw), flat(Reparametrization.vjp(r, psi, w)), what="vjp vs torch.func")
    assert_rel(flat(S), flat(Reparametrization.second_order(r, psi, w, u)), what="second_order vs torch.func")
    assert_rel(flat(Ju), s.J @ flat(u), what="jvp vs dense J")
    assert_rel(flat(Jtw), s.J.T @ flat(w), what="vjp vs dense Jᵀ")
    wf = flat(w)
    S_dense = pairing_hessian(s, wf)
    assert_rel(flat(S), S_dense @ flat(u), what="second_order vs dense Σ w_k ∇²φ_k")
    if s.r.bijective:
        assert_rel(flat(r.jvp_inverse(psi, Ju)), flat(u), what="J⁻¹ J u")
        assert_rel(flat(r.vjp_inverse(psi, Jtw)), flat(w), what="J⁻ᵀ Jᵀ w")
        logabsdet = torch.linalg.slogdet(s.J)[1]
        assert abs(r.logabsdet(psi) - float(logabsdet)) <= TOL * max(1.0, abs(float(logabsdet)))


@pytest.mark.parametrize("spec_id", ids)
def test_transform_vectors_and_covectors(spec_id: str) -> None:
    """push/pull of vectors and covectors: ⟨Jᵀg, u⟩ = ⟨g, J u⟩ and the inverse maps undo them."""
    s = setup(spec_id)
    u = flat(randn_like_all(s.psi, 4))
    g = s.g
    Ju, Jtg = T.push_vector(s.r, s.psi, u), T.pull_covector(s.r, s.psi, g)
    assert_rel(Ju, s.J @ u, what="push_vector")
    assert_rel(Jtg, s.J.T @ g, what="pull_covector")
    assert abs(float(Jtg @ u) - float(g @ Ju)) <= TOL * float(Jtg.abs() @ u.abs())  # the pairing is invariant
    if s.r.bijective:
        assert_rel(T.pull_vector(s.r, s.psi, Ju), u, what="pull_vector(push_vector(u))")
        assert_rel(T.push_covector(s.r, s.psi, Jtg), g, what="push_covector(pull_covector(g))")
    else:
        with pytest.raises(ReparamError, match="not a bijection"):
            T.pull_vector(s.r, s.psi, Ju)


# ---------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("spec_id", ids)
def test_gradient_rule(spec_id: str) -> None:
    """∇_ψL (autodiff on the ψ problem) = Jᵀ ∇_θL."""
    s = setup(spec_id)
    grad_psi = s.q.flatten(s.q.gradient())
    assert_rel(grad_psi, T.pull_covector(s.r, s.psi, s.g), what="gradient rule (closed form)")
    assert_rel(grad_psi, s.J.T @ s.g, what="gradient rule (dense J)")
    assert float(s.g.norm()) > 1e-3  # not a critical point


def _columns(apply: Callable[[Tensor], Tensor], d: int) -> Tensor:
    """[apply(e_1), …, apply(e_d)]: the matrix of a flat linear map, column by column (vectorized by vmap)."""
    return torch.func.vmap(apply)(torch.eye(d, dtype=torch.float64)).T


@pytest.mark.parametrize("spec_id", ids)
def test_hessian_rule(spec_id: str) -> None:
    """H_ψ (autodiff) = Jᵀ H_θ J + Σ_k (∂L/∂θ_k) ∇²φ_k; the second term is non-zero exactly for non-linear φ."""
    s = setup(spec_id)
    H_psi = cd.operator(s.q, "hessian").to_dense(chunk=512)
    d = s.r.psi_dim
    pulled = _columns(T.pull_hessian(s.r, s.psi, lambda t: s.H @ t, s.g), d)
    riemannian = _columns(T.riemannian_hessian(s.r, s.psi, lambda t: s.H @ t), d)
    assert_rel(pulled, H_psi, what="Hessian rule")
    assert_rel(riemannian, s.J.T @ s.H @ s.J, what="Riemannian Hessian = Jᵀ H_θ J")
    second = pulled - riemannian
    if SPECS[spec_id].nonlinear:
        # omitting the term would miss H_ψ by far more than the tolerance
        assert float((H_psi - riemannian).abs().max()) > 1e-4 * float(H_psi.abs().max())
        assert_rel(second, pairing_hessian(s, s.g), what="second-order term vs dense")
    else:
        assert float(second.abs().max()) == 0.0


@pytest.mark.parametrize("spec_id", ids)
def test_ggn_rule(spec_id: str) -> None:
    """G_ψ (autodiff) = Jᵀ G_θ J at every point (pull_metric)."""
    s = setup(spec_id)
    G_psi = cd.operator(s.q, "ggn").to_dense(chunk=512)
    pulled = _columns(T.pull_metric(s.r, s.psi, lambda t: s.G @ t), s.r.psi_dim)
    assert_rel(pulled, G_psi, what="GGN rule")
    assert_rel(pulled, s.J.T @ s.G @ s.J, what="GGN rule (dense J)")


# ---------------------------------------------------------------------------------------------- factory


def test_make_reparam_builds_every_kind() -> None:
    p = theta_setup("mlp", "2.bias")[0]
    d = p.dim
    A = (torch.eye(d, dtype=torch.float64) * 2 + 0.01).tolist()
    configs = {
        "scale": {"factors": {"0.weight": [[2.0]] * 5, "2.bias": 0.5}},
        "exp": {"params": ["2.bias"]},
        "softplus": {"params": "2.bias"},
        "ntk": {"sigma_w": 1.5},
        "weight_norm": {},
        "linear": {"A": A},
        "compose": {"outer": {"kind": "ntk", "kwargs": {"sigma_b": 2.0}},
                    "inner": {"kind": "weight_norm", "kwargs": {"params": ["2.weight"]}}},
    }
    direct = {
        "scale": scale({"0.weight": torch.full((5, 1), 2.0, dtype=torch.float64), "2.bias": 0.5}),
        "exp": exp("2.bias"), "softplus": softplus("2.bias"), "ntk": ntk(1.5), "weight_norm": weight_norm(),
        "linear": linear(torch.tensor(A, dtype=torch.float64)),
        "compose": compose(ntk(sigma_b=2.0), weight_norm("2.weight")),
    }
    for kind, kwargs in configs.items():
        r, ref = make_reparam(kind, **kwargs), direct[kind]
        assert type(r) is type(ref) and r.kind == kind
        r.bind(p.param_names, p.shapes)
        ref.bind(p.param_names, p.shapes)
        assert r.psi_names == ref.psi_names
        psi = ref.inverse(p.params)
        for a, b in zip(r.forward(psi), ref.forward(psi)):
            assert_rel(a, b, what=kind)
    r = make_reparam("compose", **configs["compose"]).bind(p.param_names, p.shapes)
    assert r.psi_names[-3:] == ("2.weight.g", "2.weight.v", "2.bias")


# ---------------------------------------------------------------------------------------------- bad input


def _mlp() -> cd.Problem:
    return theta_setup("mlp", None)[0]


def test_exp_and_softplus_need_positive_values() -> None:
    with pytest.raises(ReparamError, match=r"exp: parameter '0\.weight' must be positive .* minimum value is -"):
        reparametrize(_mlp(), exp("0.weight"))
    with pytest.raises(ReparamError, match=r"softplus: parameter '2\.bias' must be positive .* minimum value is -"):
        reparametrize(_mlp(), softplus("2.bias"))


def test_unknown_parameter_name() -> None:
    with pytest.raises(ReparamError, match=r"\['nope'\] are not among the problem's selected parameters"):
        reparametrize(_mlp(), scale({"nope": 2.0}))
    with pytest.raises(ReparamError, match=r"ntk: parameter\(s\) \['3\.weight'\]"):
        reparametrize(_mlp(), ntk(params=["3.weight"]))
    with pytest.raises(ReparamError, match=r"\['0\.weight'\] are not among"):  # inner names outer's ψ: 0.weight.g/v
        reparametrize(_mlp(), compose(weight_norm(), exp("0.weight")))


def test_factor_shape_and_value() -> None:
    with pytest.raises(ReparamError, match=r"factor for '0\.weight' has shape \(3,\), which does not broadcast to "
                                           r"the parameter's shape \(5, 8\)"):
        reparametrize(_mlp(), scale({"0.weight": torch.ones(3)}))
    with pytest.raises(ReparamError, match="the factor is zero"):
        scale(0.0)
    with pytest.raises(ReparamError, match=r"factor for '2\.bias' contains zero entries"):
        scale({"2.bias": torch.tensor([1.0, 0.0, 2.0, 3.0])})
    with pytest.raises(ReparamError, match="the factor is nan"):
        scale(float("nan"))
    with pytest.raises(ReparamError, match="sigma_w must be a finite positive number"):
        ntk(sigma_w=0.0)


def test_linear_bad_matrix() -> None:
    d = _mlp().dim
    A = torch.randn(d, d, dtype=torch.float64)
    A[:, 3] = A[:, 7]
    with pytest.raises(ReparamError, match="linear: A is singular"):
        linear(A)
    with pytest.raises(ReparamError, match=f"A has shape \\(10, 10\\).* must be {d}x{d}"):
        reparametrize(_mlp(), linear(torch.eye(10, dtype=torch.float64)))
    with pytest.raises(ReparamError, match="A must be a square matrix"):
        linear(torch.ones(3, 4))


def test_weight_norm_bad_input() -> None:
    c = CASES["mlp"]()
    model = c.model()
    with torch.no_grad():
        model[0].weight[2].zero_()
    with pytest.raises(ReparamError, match=r"weight_norm: parameter '0\.weight' has zero row\(s\) \[2\]"):
        reparametrize(make_problem(c, model=model), weight_norm())
    with pytest.raises(ReparamError, match=r"'0\.bias' \(shape \(5,\)\) not a weight"):
        reparametrize(_mlp(), weight_norm(["0.weight", "0.bias"]))
    s = setup("mlp-weight_norm")
    t = tuple(torch.ones(sh, dtype=torch.float64) for sh in s.r.theta_shapes)
    with pytest.raises(ReparamError, match=r"weight_norm is not a bijection .* J⁻¹ does not exist"):
        s.r.jvp_inverse(s.psi, t)
    with pytest.raises(ReparamError, match=r"J⁻ᵀ does not exist"):
        s.r.vjp_inverse(s.psi, s.psi)
    with pytest.raises(ReparamError, match=r"log\|det J\| does not exist"):
        s.r.logabsdet(s.psi)


def test_make_reparam_bad_input() -> None:
    with pytest.raises(cd.UnknownNameError, match=r"unknown reparametrization kind 'rotate'; choose one of: scale, "
                                                 r"exp, softplus, ntk, weight_norm, linear, compose$"):
        make_reparam("rotate")
    with pytest.raises(ReparamError, match=r"invalid arguments \['sigma'\] for reparametrization 'ntk'"):
        make_reparam("ntk", sigma=2.0)
    with pytest.raises(ReparamError, match="compose: inner must be a mapping"):
        make_reparam("compose", outer={"kind": "ntk"}, inner="scale")


def test_unbound_and_misshaped_input() -> None:
    r = scale(2.0)
    with pytest.raises(ReparamError, match="not bound"):
        r.forward((torch.ones(2),))
    s = setup("mlp-ntk")
    with pytest.raises(ReparamError, match=r"ψ tensor '0\.bias' has shape \(4,\), expected \(5,\)"):
        s.r.forward((s.psi[0], torch.ones(4, dtype=torch.float64), *s.psi[2:]))


def test_wrapper_is_not_an_nn_submodule_of_the_original() -> None:
    s = setup("mlp-scale-global")
    names = [n for n, _ in s.q.model.named_modules()]
    assert all(not n.startswith("theta_model") for n in names)
    assert isinstance(s.q.model.theta_model, nn.Module)
