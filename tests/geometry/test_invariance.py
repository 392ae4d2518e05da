"""Invariance of curvature queries under reparametrization (DESIGN.md §1 and §6).

Every quantity is computed twice, independently: in θ on the original problem, and in ψ by autodiff on the problem
``cd.reparametrize`` builds (the network evaluated at θ = φ(ψ), so ψ-curvature comes from autodiff *through* φ, not
from the transformation formulas). float64 throughout.

Problems. The mlp and cnn cases of ``tests/cases.py`` (same model factory, inputs and loss), with every input repeated
once with each class label on top of its own label (``_conflicting_labels``). The cases' own data are separable:
cross-entropy then has no minimum (training drives the loss to 0 along a ray, and gradient and curvature vanish
together), so a "near-minimum" would make the critical-point comparisons vacuous. With the conflicting labels the
minimum is finite (the optimal predictive distribution has every class probability positive) and has O(1) curvature.
The output bias is made positive (|b| + 1.1) so that exp/softplus can act on it.

Points. ``random``: the untrained model. ``trained``: L-BFGS (strong Wolfe, full batch) from the random point, then
the output bias shifted by a constant so that min b ≥ 1 — softmax is invariant under that shift, so loss, gradient and
every curvature matrix are exactly unchanged and the point stays a near-minimum.

Metrics. θ: the damped Fisher M_θ = F_θ + δI (dense Cholesky). ψ: M_ψ = F_ψ + δ·JᵀJ, the damping referenced to the
pull-back of the θ identity (``damping_metric=cd.metric(problem_psi, "pullback")``) so that M_ψ = Jᵀ M_θ J is a
tensor — what the configs do by default (``damping_reference: pullback``). For the Hessian paired with the pulled-back Euclidean
metric the ψ operator is the Riemannian Hessian ``cd.riemannian_hessian`` (DESIGN.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

import curvdist as cd
from curvdist.geometry.reparam import Reparametrization, compose, exp, linear, ntk, scale, softplus, weight_norm
from tests.cases import CASES, Case
from tests.dense import autograd_jacobian

TOL = 1e-8  # invariant quantities agree to this relative tolerance (DESIGN.md §6)
EIG_TOL = 1e-11  # Lanczos residual tolerance of cd.eigs
DELTA = 0.1  # damping of the Fisher metric (same δ in θ and ψ)
POINTS = ("random", "trained")
CLASSES = {"mlp": 4, "cnn": 10}
OUTPUT_BIAS = {"mlp": "2.bias", "cnn": "6.bias"}
TRAIN_ITERS = {"mlp": 400, "cnn": 300}  # L-BFGS iteration caps
GRAD_STOP = 1e-6  # L-BFGS stops at max|g| ≤ this: near-critical, yet g (a sum with cancellation) keeps ~10 digits


# ---------------------------------------------------------------------------------------------- reparametrizations


def _logspace_factors(shape: tuple[int, ...], lo: float, hi: float, seed: int) -> Tensor:
    """Positive per-entry factors 10^U(lo, hi) — spanning orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return 10.0 ** (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64))


@dataclass(frozen=True)
class Kind:
    """A reparametrization of a case, and what its Jacobian allows."""

    case: str
    name: str
    build: Callable[[], Reparametrization]
    kind: str  # "linear" (J constant), "nonlinear" (elementwise exp/softplus), "weight_norm" (not a bijection)
    euclidean_change: float  # asserted lower bound on the change factor of the Euclidean top eig or trace
    slow: bool = False  # every test of this kind is marked slow (the default set keeps the others)


def _mlp_scale_small() -> Reparametrization:
    """Factors in [1e-2, 1] (with ntk outside: the composition shrinks every coordinate, by up to 1e-4)."""
    return scale({"0.weight": _logspace_factors((5, 8), -2.0, 0.0, 3), "0.bias": 0.1, "2.weight": 0.05,
                  "2.bias": _logspace_factors((4,), -1.0, 0.0, 4)})


def _mlp_scale() -> Reparametrization:
    return scale({"0.weight": _logspace_factors((5, 8), -2.0, 2.0, 0), "0.bias": 30.0, "2.weight": 0.02,
                  "2.bias": _logspace_factors((4,), -1.0, 1.0, 1)})


def _cnn_scale() -> Reparametrization:
    return scale({"0.weight": 0.01, "3.weight": _logspace_factors((2, 2, 3, 3), -2.0, 2.0, 2), "6.weight": 50.0,
                  "6.bias": 0.1})


def _cnn_scale_small() -> Reparametrization:
    return scale({"0.weight": 0.1, "3.weight": _logspace_factors((2, 2, 3, 3), -2.0, 0.0, 5), "6.weight": 0.05,
                  "6.bias": 0.1})


KINDS: list[Kind] = [
    Kind("mlp", "scale", _mlp_scale, "linear", 100.0),
    Kind("mlp", "exp", lambda: exp("2.bias"), "nonlinear", 1.2),
    Kind("mlp", "softplus", lambda: softplus("2.bias"), "nonlinear", 1.1),
    Kind("mlp", "ntk", lambda: ntk(sigma_w=0.2, sigma_b=0.05), "linear", 100.0),
    Kind("mlp", "linear", lambda: linear(seed=0, condition=100.0), "linear", 10.0),
    Kind("mlp", "ntk∘scale", lambda: compose(ntk(sigma_w=0.2, sigma_b=0.05), _mlp_scale_small()), "linear", 1000.0),
    Kind("mlp", "weight_norm", lambda: weight_norm(), "weight_norm", 1.04),
    Kind("cnn", "scale", _cnn_scale, "linear", 1000.0),
    Kind("cnn", "ntk", lambda: ntk(sigma_w=0.2, sigma_b=0.05), "linear", 500.0),
    # the cnn is ~10× costlier per query than the mlp: its softplus and composition run with -m slow
    Kind("cnn", "softplus", lambda: softplus("6.bias"), "nonlinear", 1.03, slow=True),
    Kind("cnn", "ntk∘scale", lambda: compose(ntk(sigma_w=0.2, sigma_b=0.05), _cnn_scale_small()), "linear", 1000.0,
         slow=True),
    Kind("cnn", "weight_norm", lambda: weight_norm(), "weight_norm", 1.04),
    Kind("cnn", "exp", lambda: exp("6.bias"), "nonlinear", 1.03),
    Kind("cnn", "linear", lambda: linear(seed=1, condition=30.0), "linear", 3.0),
]
KIND = {(k.case, k.name): k for k in KINDS}


def _params(kinds: list[Kind], points: tuple[str, ...] = POINTS, slow: frozenset[str] = frozenset()) -> list[Any]:
    """Indirect ((case, point), (case, kind, point)) parameters of the ``theta`` and ``pair`` fixtures, with
    readable ids; ids in ``slow`` get ``pytest.mark.slow``."""
    out = []
    for k in kinds:
        for point in points:
            pid = f"{k.case}-{k.name}-{point}"
            marks = [pytest.mark.slow] if k.slow or pid in slow else []
            out.append(pytest.param((k.case, point), (k.case, k.name, point), id=pid, marks=marks))
    return out


def over(kinds: list[Kind], points: tuple[str, ...] = POINTS, slow: frozenset[str] = frozenset()) -> Any:
    """Parametrize a test over pairs (the module-scoped ``theta``/``pair`` fixtures)."""
    return pytest.mark.parametrize(("theta", "pair"), _params(kinds, points, slow), indirect=True)


BIJECTIVE = [k for k in KINDS if k.kind != "weight_norm"]


# ---------------------------------------------------------------------------------------------- the two points


def _conflicting_labels(case: Case) -> tuple[Tensor, Tensor]:
    """Each input once with its own label and once with every class label: a finite minimum of cross-entropy."""
    C = CLASSES[case.name]
    X = torch.cat([case.X] * (C + 1))
    y = torch.cat([case.y] + [torch.full_like(case.y, c) for c in range(C)])
    return X, y


def _train(model: torch.nn.Module, X: Tensor, y: Tensor, iters: int) -> None:
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=iters, history_size=50,
                            line_search_fn="strong_wolfe", tolerance_grad=GRAD_STOP, tolerance_change=0.0)
    loss = torch.nn.CrossEntropyLoss()

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss(model(X), y)
        value.backward()
        return value

    opt.step(closure)


def _relerr(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Side:
    """One side's operators (``problem`` is the θ or the ψ problem), built on first use."""

    problem: cd.Problem

    def op(self, kind: str) -> cd.CurvatureOperator:
        return getattr(self, kind)

    @cached_property
    def ggn(self) -> cd.CurvatureOperator:
        return cd.operator(self.problem, "ggn")

    @cached_property
    def hessian(self) -> cd.CurvatureOperator:
        return cd.operator(self.problem, "hessian")


@dataclass
class Theta(Side):
    """θ side at one (case, point): problem, metric, operators and reference results, each computed once (lazy
    attributes of the module-scoped ``theta`` fixture)."""

    case: str
    point: str
    problem: cd.Problem
    metric: cd.Metric

    @cached_property
    def fisher_ggn(self) -> dict[str, Any]:
        """Spectrum of M⁻¹·GGN (top-3, exact trace, log det(M⁻¹G + 0.1·I))."""
        return _spectral(self.ggn, self.metric, GGN_SHIFT)

    @cached_property
    def hessian_plain(self) -> dict[str, Any]:
        return _hessian_reference(self, None)

    @cached_property
    def fisher_hessian(self) -> dict[str, Any]:
        return _hessian_reference(self, self.metric)

    @cached_property
    def euclidean(self) -> dict[str, tuple[float, float]]:
        """(top eigenvalue, exact trace) of the GGN and the Hessian without a metric."""
        return {c: (cd.eigs(self.op(c), k=1, tol=1e-10).value[0], cd.trace(self.op(c), method="exact").value)
                for c in ("ggn", "hessian")}


@dataclass
class Pair(Side):
    """θ and ψ sides of one (case, kind, point)."""

    theta: Theta
    kind: Kind
    r: Reparametrization
    problem: cd.Problem  # ψ

    @property
    def id(self) -> str:
        return f"{self.kind.case}-{self.kind.name}-{self.theta.point}"

    @cached_property
    def fisher(self) -> cd.CurvatureOperator:
        return cd.operator(self.problem, "fisher")

    @cached_property
    def riemannian_hessian(self) -> cd.CurvatureOperator:
        return cd.riemannian_hessian(self.problem)

    @cached_property
    def pullback(self) -> cd.Metric:
        """Jᵀ I_θ J: the pulled-back θ-Euclidean metric."""
        return cd.metric(self.problem, "pullback")

    @cached_property
    def metric(self) -> cd.Metric:
        """F_ψ + δ·JᵀJ (dense Cholesky)."""
        return cd.metric(self.problem, "fisher", damping=DELTA, method="dense", damping_metric=self.pullback)

    def flat_forward(self, x: Tensor) -> Tensor:
        return self.r.flatten_theta(self.r.forward(self.r.unflatten_psi(x)))

    @cached_property
    def J(self) -> Tensor:
        """∂θ/∂ψ densely, by plain autograd of the flat forward map (tests.dense)."""
        return autograd_jacobian(self.flat_forward, self.r.flatten_psi(self.problem.params))


def build_theta(case_name: str, point: str) -> Theta:
    """The θ problem of a case at the random or the trained point, with its damped Fisher metric."""
    case = CASES[case_name]()
    X, y = _conflicting_labels(case)
    model = case.model()
    bias = dict(model.named_parameters())[OUTPUT_BIAS[case_name]]
    with torch.no_grad():
        bias.abs_().add_(1.1)
    if point == "trained":
        _train(model, X, y, TRAIN_ITERS[case_name])
        with torch.no_grad():
            bias.add_(1.0 - bias.min())  # softmax shift: loss, gradient, curvature unchanged
    problem = cd.Problem(model, case.loss, (X, y), batch_size=len(X))
    return Theta(case_name, point, problem, cd.metric(problem, "fisher", damping=DELTA, method="dense"))


@pytest.fixture(scope="module")
def theta(request: pytest.FixtureRequest) -> Theta:
    """θ at ``request.param`` = (case, point); module-scoped, so every test of that point shares one build."""
    return build_theta(*request.param)


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest, theta: Theta) -> Pair:
    """θ and ψ at ``request.param`` = (case, kind, point), ψ = cd.reparametrize(θ, r)."""
    case, kind_name, point = request.param
    assert (theta.case, theta.point) == (case, point)
    kind = KIND[(case, kind_name)]
    r = kind.build()
    return Pair(theta, kind, r, cd.reparametrize(theta.problem, r))


@pytest.mark.parametrize("theta", [pytest.param((c, p), id=f"{c}-{p}") for c in ("mlp", "cnn") for p in POINTS],
                         indirect=True)
def test_the_two_points(theta: Theta) -> None:
    """The random point is far from critical (‖g‖ ≥ 0.05, λ_min(H) < −0.1·λ_max(H)); the trained one is a
    near-minimum: lower loss than the random point, ‖g‖ ≤ 1e-5 and λ_min(H) ≥ −1e-4·λ_max(H) (λ_min by Lanczos to
    1e-6; a tight solve gives −7e-7 (mlp) and −5e-6 (cnn) relative: only flat directions left). The output bias is
    ≥ 1 at both points."""
    p = theta.problem
    h = theta.hessian_plain
    bias = dict(zip(p.param_names, p.params))[OUTPUT_BIAS[theta.case]]
    stats = dict(loss=p.value(), gnorm=float(p.flatten(p.gradient()).norm()), lam_min=h["lam_min"],
                 lam_max=float(h["eigs"][0]), bias_min=float(bias.min()))
    print(f"[point {theta.case}-{theta.point}] {stats}")
    assert stats["bias_min"] >= 1.0
    if theta.point == "random":
        assert stats["gnorm"] >= 0.05 and stats["lam_min"] < -0.1 * stats["lam_max"]
        return
    assert stats["loss"] < build_theta(theta.case, "random").problem.value()
    assert stats["gnorm"] <= 1e-5 and stats["lam_min"] >= -1e-4 * stats["lam_max"]


# ---------------------------------------------------------------------------------------------- query bundles


def _spectral(op: cd.CurvatureOperator, metric: cd.Metric | None, shift: float) -> dict[str, Any]:
    """Top-3 eigenvalues, exact trace and exact log det(M⁻¹C + shift·I) of M⁻¹C (C without a metric)."""
    e = cd.eigs(op, k=3, metric=metric, tol=EIG_TOL)
    assert e.converged, e.info
    return {"eigs": np.array(e.value), "trace": cd.trace(op, method="exact", metric=metric).value,
            "logdet": cd.logdet(op, damping=shift, metric=metric, method="exact").value}


def _assert_same(psi: dict[str, Any], theta: dict[str, Any], what: str) -> dict[str, float]:
    """Per-eigenvalue relative error, relative trace error, log-det error relative to max(1, |value|); ≤ TOL."""
    errs = {
        "eigs": float(np.max(np.abs(psi["eigs"] - theta["eigs"]) / np.abs(theta["eigs"]))),
        "trace": abs(psi["trace"] - theta["trace"]) / abs(theta["trace"]),
        "logdet": abs(psi["logdet"] - theta["logdet"]) / max(1.0, abs(theta["logdet"])),
    }
    print(f"[{what}] relative errors {errs}; θ values {theta}")
    for key, err in errs.items():
        assert err <= TOL, f"{what}: {key} differs between θ and ψ by {err:.2e} (θ {theta[key]}, ψ {psi[key]})"
    return errs


# ---------------------------------------------------------------------------------------------- Fisher metric, GGN

GGN_SHIFT = 0.1  # the GGN has a null space: log det(M⁻¹G + 0.1·I)


@over(BIJECTIVE)
def test_fisher_metric_ggn_spectrum_is_invariant(pair: Pair) -> None:
    """eig/trace/logdet of M⁻¹·GGN with M = F + δR agree in θ and ψ: G_ψ = JᵀG_θJ and M_ψ = JᵀM_θJ everywhere, so
    M_ψ⁻¹G_ψ = J⁻¹(M_θ⁻¹G_θ)J is a similarity at every point (not only at critical points)."""
    pr = pair
    th = pr.theta
    ref = th.fisher_ggn
    got = _spectral(pr.op("ggn"), pr.metric, GGN_SHIFT)
    _assert_same(got, ref, f"F⁻¹GGN {pr.id}")


@over(BIJECTIVE)
def test_natural_gradient_is_a_tangent_vector(pair: Pair) -> None:
    """gᵀM⁻¹g (a scalar) agrees, and the natural gradient pushed forward, J·(M_ψ⁻¹g_ψ), equals M_θ⁻¹g_θ (J dense
    from plain autograd of φ), ≤ 1e-8 relative. At the trained point ‖g‖ ≈ 2e-6 is a sum of O(0.1) per-sample terms,
    so g itself carries ≈ 1e-10 relative rounding (measured worst: 7.6e-10, linear A with κ = 100)."""
    pr = pair
    th = pr.theta
    n_theta = cd.grad_norm(th.problem, metric=th.metric).value
    n_psi = cd.grad_norm(pr.problem, metric=pr.metric).value
    g_theta = th.problem.flatten(th.problem.gradient())
    g_psi = pr.problem.flatten(pr.problem.gradient())
    nat_theta = th.metric.solve(g_theta)
    pushed = pr.J @ pr.metric.solve(g_psi)
    err_norm, err_vec = abs(n_psi - n_theta) / n_theta, _relerr(pushed, nat_theta)
    print(f"[natgrad {pr.id}] gᵀM⁻¹g={n_theta:.3e} rel err {err_norm:.2e}; "
          f"J·M_ψ⁻¹g_ψ rel err {err_vec:.2e}")
    assert err_norm <= TOL, (n_theta, n_psi)
    assert err_vec <= TOL


# ---------------------------------------------------------------------------------------------- Fisher metric, Hessian


def _hessian_reference(th: Theta, metric: cd.Metric | None) -> dict[str, Any]:
    """θ reference for the Hessian with ``metric``: top-3 eigenvalues, λ_min (Lanczos, tol 1e-6: only used for
    the shift and the near-minimum check), the log-det shift 1.5·max(0, −λ_min) + 0.05·|λ|_max (so M⁻¹H + shift·I
    is positive definite), exact trace and exact log-det."""
    op = th.hessian
    e = cd.eigs(op, k=3, metric=metric, tol=EIG_TOL)
    assert e.converged, e.info
    lam_min = cd.eigs(op, k=1, which="smallest", metric=metric, tol=1e-6).value[0]
    shift = 1.5 * max(0.0, -lam_min) + 0.05 * max(abs(x) for x in e.value)
    return {"eigs": np.array(e.value), "trace": cd.trace(op, method="exact", metric=metric).value,
            "logdet": cd.logdet(op, damping=shift, metric=metric, method="exact").value, "shift": shift,
            "lam_min": lam_min}


@over([k for k in BIJECTIVE if k.kind == "linear"])
def test_fisher_metric_hessian_invariant_for_constant_jacobian(pair: Pair) -> None:
    """For φ linear (scale, ntk, linear, their composition) ∇²φ = 0, so H_ψ = JᵀH_θJ at every point and the
    eig/trace/logdet of M⁻¹H with the Fisher metric agree at the random point as well as at the trained one."""
    pr = pair
    ref = pr.theta.fisher_hessian
    got = _spectral(pr.op("hessian"), pr.metric, ref["shift"])
    _assert_same(got, ref, f"F⁻¹H {pr.id}")


def _curvature_ratio(pr: Pair) -> Tensor:
    """max over reparametrized entries of |f''(ψ)|/f'(ψ)², from the θ values of the bias (independent of curvdist):
    exp: 1/θ; softplus: σ(ψ) = 1 − e^{−θ}, so (1 − σ)/σ = 1/(e^θ − 1)."""
    b = dict(zip(pr.theta.problem.param_names, pr.theta.problem.params))[OUTPUT_BIAS[pr.kind.case]]
    return (1.0 / b) if pr.kind.name == "exp" else 1.0 / torch.expm1(b)


@over([k for k in BIJECTIVE if k.kind == "nonlinear"])
def test_fisher_metric_hessian_needs_a_critical_point(pair: Pair) -> None:
    """exp/softplus: H_ψ = JᵀH_θJ + S with S = diag(g_θ ⊙ f''(ψ)) on the bias. In the symmetric form the ψ spectrum
    is that of W⁻ᵀ(H_θ + J⁻ᵀSJ⁻¹)W⁻¹ (M_θ = WᵀW ⪰ δI), a perturbation E with
    ‖E‖₂ ≤ ε := ‖g_b‖_∞ · max_k |f''_k|/f'_k² / δ and rank(E) ≤ r (the bias size). Hence (Weyl, Lidskii)
    |Δλ_i| ≤ ε, |Δtr| ≤ r·ε, |Δlogdet| ≤ r·ε/(λ_min + shift − ε).

    random point (‖g‖ = O(0.1)): the spectra must differ (relative difference > 1e-6);
    trained point: they agree within those bounds, and the bound itself is small (ε ≤ 1e-4 · λ_1)."""
    pr = pair
    th = pr.theta
    ref = th.fisher_hessian
    g = th.problem.flatten(th.problem.gradient())
    g_bias = dict(zip(th.problem.param_names, th.problem.gradient()))[OUTPUT_BIAS[pr.kind.case]]
    eps = float(g_bias.abs().max() * _curvature_ratio(pr).max()) / DELTA
    rank = g_bias.numel()
    e = cd.eigs(pr.op("hessian"), k=3, metric=pr.metric, tol=EIG_TOL)
    assert e.converged
    eigs = np.array(e.value)
    trace = cd.trace(pr.op("hessian"), method="exact", metric=pr.metric).value
    d_eigs = float(np.max(np.abs(eigs - ref["eigs"])))
    d_trace = abs(trace - ref["trace"])
    rel = max(d_eigs / float(np.max(np.abs(ref["eigs"]))), d_trace / abs(ref["trace"]))
    print(f"[F⁻¹H {pr.id}] ‖g‖={float(g.norm()):.2e} ε={eps:.2e} |Δλ|max={d_eigs:.2e} "
          f"|Δtr|={d_trace:.2e} rel={rel:.2e} λ={ref['eigs']}")
    if pr.theta.point == "random":
        assert rel > 1e-6, f"the Hessian with a metric should NOT be invariant off critical points (rel {rel:.2e})"
        return
    assert eps <= 1e-4 * abs(ref["eigs"][0]), f"the trained point is not critical enough: ε = {eps:.2e}"
    assert d_eigs <= eps, (d_eigs, eps)
    assert d_trace <= rank * eps, (d_trace, rank * eps)
    shift = ref["shift"]
    assert ref["lam_min"] + shift - eps > 0
    ld = cd.logdet(pr.op("hessian"), damping=shift, metric=pr.metric, method="exact").value
    bound = rank * eps / (ref["lam_min"] + shift - eps)
    print(f"    |Δlogdet|={abs(ld - ref['logdet']):.2e} bound {bound:.2e}")
    assert abs(ld - ref["logdet"]) <= bound


# ---------------------------------------------------------------------------------------------- Riemannian Hessian


# Exact trace/log-det of the Riemannian Hessian materialize it column by column (RiemannianHessian.matmat_params is
# a Python loop of d Hessian-vector products through φ): ≈ 15 s per CNN parametrization on a quiet machine. The
# default set keeps CNN scale at the random point and ntk at the trained point; the rest runs with -m slow.
RIEMANNIAN_SLOW = frozenset({"cnn-scale-trained", "cnn-ntk-random"})


@over(BIJECTIVE, slow=RIEMANNIAN_SLOW)
def test_riemannian_hessian_with_pullback_metric_is_invariant_everywhere(pair: Pair) -> None:
    """The Riemannian Hessian of the pulled-back Euclidean metric, Hess_ψ = ∇²_ψL − Σ_k g_k∇²φ_k = JᵀH_θJ (computed
    in ψ by autodiff), with M_ψ = JᵀJ: M_ψ⁻¹Hess_ψ = J⁻¹H_θJ, so its top-3 eigenvalues, exact trace and exact
    log-det (shifted positive definite) equal those of the plain θ Hessian without a metric — at every point."""
    pr = pair
    ref = pr.theta.hessian_plain
    got = _spectral(pr.op("riemannian_hessian"), pr.pullback, ref["shift"])
    _assert_same(got, ref, f"Riemannian {pr.id}")


# ---------------------------------------------------------------------------------------------- Euclidean changes


def _change(a: float, b: float) -> float:
    return math.inf if a * b <= 0 else max(abs(a), abs(b)) / min(abs(a), abs(b))


@over(KINDS, ("random",))
def test_euclidean_counterparts_change(pair: Pair) -> None:
    """Without a metric (the identity of the current coordinates) the top eigenvalue and the trace of the GGN and of
    the Hessian are not invariant: for each of GGN and Hessian, the larger of the two change factors
    max(|a|, |b|)/min(|a|, |b|) (∞ on a sign change) is at least the factor stated per kind
    (``Kind.euclidean_change``).

    weight_norm is the exception for the GGN, and the test says so: at the library's right inverse (g_i = ‖W_i‖,
    v = W) the Jacobian is a partial isometry, J Jᵀ = I (per row ṽṽᵀ + P = I), so GGN_ψ = JᵀG_θJ has the nonzero
    eigenvalues and the trace of G_θ; its Hessian changes through the second-order term off critical points."""
    pr = pair
    th = pr.theta
    spec = pr.kind
    changes = {}
    for curv in ("ggn", "hessian"):
        ref = th.euclidean[curv]
        top = cd.eigs(pr.op(curv), k=1, tol=1e-10).value[0]
        tr = cd.trace(pr.op(curv), method="exact").value
        changes[curv] = (_change(top, ref[0]), _change(tr, ref[1]))
    print(f"[euclidean {pr.kind.case}-{pr.kind.name}] change factors (top eig, trace): {changes}")
    if spec.kind == "weight_norm":
        eye = torch.eye(pr.J.shape[0], dtype=torch.float64)
        torch.testing.assert_close(pr.J @ pr.J.T, eye, rtol=0, atol=1e-12)
        assert max(changes["ggn"]) - 1 <= 1e-8
        assert max(changes["hessian"]) >= spec.euclidean_change
        return
    for curv, factors in changes.items():
        assert max(factors) >= spec.euclidean_change, f"{curv}: change factors {factors}"


# ---------------------------------------------------------------------------------------------- weight norm


def _weight_norm_null_vectors(pr: Pair) -> Tensor:
    """The null space of J for weight norm: per row i of a normalized weight, (δg = 0, δv_i = v_i) — scaling v_i
    does not change W_i = g_i v_i/‖v_i‖. One column per row, as flat ψ vectors."""
    r, psi = pr.r, pr.problem.params
    cols = []
    for j, (name, shape) in enumerate(zip(r.psi_names, r.psi_shapes)):
        if not name.endswith(".v"):
            continue
        for i in range(shape[0]):
            parts = [torch.zeros(s, dtype=torch.float64) for s in r.psi_shapes]
            parts[j][i] = psi[j][i]
            cols.append(r.flatten_psi(parts))
    return torch.stack(cols, 1)


@over([KIND[(c, "weight_norm")] for c in ("mlp", "cnn")])
def test_weight_norm_nonzero_spectrum_is_invariant(pair: Pair) -> None:
    """Weight norm is not a bijection: ψ has one extra dimension per output row and J (dθ × dψ, dense by autograd)
    has the null space n_i = (0, v_i). Along it GGN_ψ, F_ψ and the pulled-back JᵀJ all vanish, so every Fisher or
    pulled-back metric in ψ is singular. What holds: on range(Jᵀ) (orthonormal basis Q from a QR of Jᵀ), JQ is
    square and invertible, QᵀG_ψQ = (JQ)ᵀG_θ(JQ) and Qᵀ(F_ψ + δJᵀJ)Q = (JQ)ᵀM_θ(JQ), so the restricted pencil has
    exactly θ's spectrum of M⁻¹GGN: top-3 eigenvalues, trace and log det(M⁻¹G + 0.1·I) agree ≤ 1e-8."""
    pr = pair
    th = pr.theta
    J = pr.J
    d_theta, d_psi = J.shape
    N = _weight_norm_null_vectors(pr)
    assert d_psi - d_theta == N.shape[1]  # one extra dimension per normalized row
    G = pr.op("ggn").to_dense(chunk=512)
    F = pr.op("fisher").to_dense(chunk=512)
    R = pr.pullback.to_dense()
    torch.testing.assert_close(R, J.T @ J, rtol=0, atol=1e-12 * float(R.abs().max()))
    for name, A in (("J", J), ("GGN_ψ", G), ("F_ψ", F), ("JᵀJ", R)):
        null = float((A @ N).abs().max()) / (float(A.abs().max()) * float(N.abs().max()))
        print(f"[weight_norm {pr.id}] ‖{name}·n‖ relative {null:.1e}")
        assert null <= 1e-13, f"{name} is not singular along the weight-norm null space ({null:.1e})"
    # restricted pencil (scipy, not torch LAPACK: see the module's performance note)
    Q = scipy.linalg.qr(J.T.numpy(), mode="economic")[0]
    Gr = Q.T @ G.numpy() @ Q
    Mr = Q.T @ (F.numpy() + DELTA * R.numpy()) @ Q
    Gr, Mr = 0.5 * (Gr + Gr.T), 0.5 * (Mr + Mr.T)
    n = Gr.shape[0]
    top = scipy.linalg.eigh(Gr, Mr, eigvals_only=True, subset_by_index=[n - 3, n - 1])[::-1]
    cM = scipy.linalg.cho_factor(Mr)
    trace = float(np.trace(scipy.linalg.cho_solve(cM, Gr)))
    shift = GGN_SHIFT
    logdet = 2 * float(np.log(np.diag(scipy.linalg.cholesky(Gr + shift * Mr))).sum()) \
        - 2 * float(np.log(np.diag(cM[0])).sum())  # log det(M⁻¹G + sI) = log det(G + sM) − log det M
    ref = th.fisher_ggn
    _assert_same({"eigs": top, "trace": trace, "logdet": logdet}, ref, f"weight_norm F⁻¹GGN {pr.id}")


@over([KIND[(c, "weight_norm")] for c in ("mlp", "cnn")], ("random",))
def test_weight_norm_pullback_damping_is_singular(pair: Pair) -> None:
    """The damping reference JᵀJ of the tensor-damped ψ Fisher metric is itself singular for weight norm, so
    F_ψ + δJᵀJ is singular whatever δ: building it must raise SingularMetricError (dense Cholesky)."""
    pr = pair
    with pytest.raises(cd.SingularMetricError, match=r"fisher metric \(damping 0\.1\) is singular"):
        cd.metric(pr.problem, "fisher", damping=DELTA, method="dense", damping_metric=pr.pullback)


# ---------------------------------------------------------------------------------------------- stochastic estimators


@pytest.mark.parametrize("method", ["hutchpp", "xtrace"])
@over([KIND[("mlp", "linear")], KIND[("mlp", "scale")]], ("random",))
def test_stochastic_trace_of_invariant_quantity(pair: Pair, method: str) -> None:
    """Hutch++/XTrace of tr(M⁻¹GGN) (Fisher metric) with the same seed and budget in θ and ψ.

    scale (positive diagonal J): the Cholesky factor of M_ψ = J M_θ J is J L_θ, so the symmetric forms coincide
    exactly and the same probes give the same estimate (≤ 1e-10 relative). linear (dense A): the symmetric forms
    differ by an orthogonal similarity, so the same probes give different estimates, which must agree within 3
    combined standard errors; both lie within 3 standard errors of the exact trace."""
    pr = pair
    kind = pr.kind.name
    th = pr.theta
    exact = th.fisher_ggn["trace"]
    budget, seed = 30, 11  # below 3 × rank(GGN) = 117: the sketch does not capture the whole range
    a = cd.trace(th.op("ggn"), method=method, matvecs=budget, metric=th.metric, seed=seed)
    b = cd.trace(pr.op("ggn"), method=method, matvecs=budget, metric=pr.metric, seed=seed)
    diff = abs(a.value - b.value)
    combined = math.hypot(a.stderr, b.stderr)
    print(f"[stochastic {kind}-{method}] exact {exact:.6f} θ {a.value:.6f}±{a.stderr:.2e} ψ {b.value:.6f}±"
          f"{b.stderr:.2e} |θ−ψ|={diff:.2e} ({diff / combined:.2f} combined stderr); "
          f"|θ−exact|={abs(a.value - exact) / a.stderr:.2f} se, |ψ−exact|={abs(b.value - exact) / b.stderr:.2f} se")
    assert a.stderr > 0 and b.stderr > 0
    assert abs(a.value - exact) <= 3 * a.stderr and abs(b.value - exact) <= 3 * b.stderr
    if kind == "scale":
        assert diff <= 1e-10 * abs(a.value)
    else:
        assert diff <= 3 * combined
        assert diff > 1e-8 * abs(a.value)  # different numbers: the probes see a rotated matrix
