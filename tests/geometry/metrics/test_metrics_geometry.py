"""The metrics of ``curvdist.geometry.metrics`` (euclidean, fisher/ggn dense and CG, pullback) against their dense
float64 definitions, the queries that take a metric (eigs, trace, grad_norm and the refusals of a CG-solved metric),
and the errors of bad input.

Dense truth comes from ``tests.dense`` (plain autograd: GGN as Σ J_nᵀΛ_nJ_n, the Fisher by enumerating labels, the
Hessian by double backward, per-sample gradients) and dense Jacobians of the reparametrization; dense linear algebra
is done with numpy/scipy (torch's OpenMP LAPACK can be very slow on a busy 2-core machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

import curvdist as cd
from curvdist import zoo
from curvdist.geometry.metrics import DiagonalMetric, PullbackMetric
from curvdist.geometry.reparam import compose, exp, linear, ntk, softplus, weight_norm
from tests import dense
from tests.cases import CASES, make_problem

DELTA = 0.1
RTOL = 1e-10
CHEAP_FACTOR_MSG = r"needs a cheap factor M = WᵀW, which a CG-solved metric lacks"


def assert_rel(a: Tensor, b: Tensor, tol: float = RTOL, what: str = "") -> float:
    """‖a − b‖ ≤ tol·‖b‖ (Frobenius for matrices); returns the relative error."""
    err = float((a - b).norm() / b.norm())
    print(f"  {what}: relative error {err:.1e} (tolerance {tol:.0e})")
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
    return err


def columns(apply, d: int) -> Tensor:  # noqa: ANN001
    """[apply(e_1), …, apply(e_d)]."""
    eye = torch.eye(d, dtype=torch.float64)
    return torch.stack([apply(eye[i]) for i in range(d)], 1)


def probe_block(d: int, seed: int = 9) -> Tensor:
    """The vectors a matrix identity is checked on: the whole basis for d ≤ 100, else 8 random columns (column-by-
    column metric products of the 388-dimensional cnn cost minutes when the machine is busy)."""
    if d <= 100:
        return torch.eye(d, dtype=torch.float64)
    return torch.randn(d, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_factor(M: cd.Metric, Md: Tensor, tol: float) -> None:
    """W⁻¹ = inv_factor_apply and W⁻ᵀ = inv_factor_t_apply belong to a factor M = WᵀW: (W⁻¹V)ᵀ M (W⁻¹V) = VᵀV, and
    W⁻ᵀ is the adjoint of W⁻¹: Vᵀ(W⁻¹V) = (W⁻ᵀV)ᵀV — on the whole basis (V = I) or a random block."""
    V = probe_block(Md.shape[0])
    A = torch.stack([M.inv_factor_apply(c) for c in V.T], 1)
    B = torch.stack([M.inv_factor_t_apply(c) for c in V.T], 1)
    assert_rel(A.T @ Md @ A, V.T @ V, tol, "W⁻ᵀMW⁻¹ = I")
    assert_rel(B.T @ V, V.T @ A, 1e-12, "inv_factor_t_apply = (inv_factor_apply)ᵀ")


def logdet_np(A: Tensor) -> float:
    sign, value = np.linalg.slogdet(A.numpy())
    assert sign == 1.0
    return float(value)


def rand(d: int, seed: int) -> Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@dataclass
class Truth:
    """A problem and its dense float64 curvature, from tests.dense."""

    problem: cd.Problem
    full: cd.Problem  # the same model and data in one batch (faster products for the CG-heavy query tests)
    G: Tensor  # GGN
    F: Tensor  # type-2 Fisher by label enumeration
    H: Tensor | None  # Hessian (mlp only: 388 double-backward rows of the cnn take ~30 s here)
    g: Tensor  # gradient (mean of per-sample gradients)


def _truth(name: str, shift_bias: str | None = None, hessian: bool = True) -> Truth:
    case = CASES[name]()
    model = case.model()
    if shift_bias is not None:
        with torch.no_grad():
            dict(model.named_parameters())[shift_bias].abs_().add_(1.1)
    problem = make_problem(case, model=model)  # the case's batch size: products accumulate over batches
    full = cd.Problem(model, case.loss, (case.X, case.y), batch_size=len(case.X))
    return Truth(problem, full,
                 dense.dense_ggn(model, case.loss, case.X, case.y, "mean"),
                 dense.dense_fisher_by_enumeration(model, case.X, case.y, "mean"),
                 dense.dense_hessian(model, case.loss, case.X, case.y, "mean") if hessian else None,
                 dense.per_sample_grads(model, case.loss, case.X, case.y).mean(0))


@pytest.fixture(scope="module")
def truths() -> dict[str, Truth]:
    """mlp (69 parameters, output bias made positive so that exp/softplus apply) and cnn (388 parameters)."""
    return {"mlp": _truth("mlp", "2.bias"), "cnn": _truth("cnn", hessian=False)}


@pytest.fixture(scope="module")
def dead_inputs() -> tuple[cd.Problem, list[int]]:
    """The digits MLP on all 64 pixels: some pixels are 0 in every sample, so the weights reading them have zero
    gradient for every label and the Fisher has exactly zero rows — singular without damping."""
    X, y = zoo.digits(shape="flat", n=13, dtype="float64")
    dead = torch.nonzero((X == 0).all(0)).flatten().tolist()
    assert dead, "the first digits have constant (standardized to 0) corner pixels"
    model = zoo.mlp(64, (5,), 10, "tanh", seed=1).double().eval()
    return cd.Problem(model, "cross_entropy", (X, y), batch_size=13), dead


# ---------------------------------------------------------------------------------------------- euclidean


@pytest.mark.parametrize("delta", [0.0, 0.5])
def test_euclidean_metric(truths: dict[str, Truth], delta: float) -> None:
    """M = (1+δ)I exactly; solve, the factor W = √(1+δ)I (W⁻ᵀMW⁻¹ = I), the symmetric inverse square root and
    log det = d·log(1+δ) are consistent with it."""
    p = truths["mlp"].problem
    M = cd.metric(p, "euclidean", damping=delta)
    d = p.dim
    eye = torch.eye(d, dtype=torch.float64)
    assert M.kind == "euclidean" and M.dim == d and M.has_factor and M.has_inv_sqrt
    assert M.describe() == ("euclidean" if delta == 0 else f"euclidean+{delta:g}")
    D = M.to_dense()
    assert torch.equal(D, (1 + delta) * eye)
    v = rand(d, 0)
    assert torch.equal(M.apply_undamped(v), v)
    assert_rel(M.solve(M.apply(v)), v, 1e-15, "solve(apply(v))")
    W_inv = columns(M.inv_factor_apply, d)
    assert_rel(W_inv.T @ D @ W_inv, eye, 1e-15, "W⁻ᵀMW⁻¹ = I")
    assert_rel(M.inv_factor_t_apply(v), W_inv.T @ v, 1e-15, "W⁻ᵀ = (W⁻¹)ᵀ")
    assert_rel(M.inv_sqrt_apply(M.inv_sqrt_apply(v)), M.solve(v), 1e-15, "M^{-1/2}M^{-1/2} = M⁻¹")
    assert math.isclose(M.logdet(), d * math.log1p(delta), rel_tol=1e-14, abs_tol=1e-14)


# ---------------------------------------------------------------------------------------------- fisher / ggn


@pytest.mark.parametrize("method", ["dense", "cg"])
@pytest.mark.parametrize("kind", ["fisher", "ggn"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_curvature_metric_matches_dense_definition(truths: dict[str, Truth], name: str, kind: str,
                                                   method: str) -> None:
    """M = C + δI with C the dense GGN (Σ_n J_nᵀΛ_nJ_n) or the Fisher (label enumeration): apply, apply_undamped
    (and to_dense, mlp) equal it (≤ 1e-10); solve(apply(v)) = v — for CG the residual ‖M x − b‖ ≤ 1e-10‖b‖, the CG
    stopping rule, and the error ≤ κ(M)·1e-10. dense: W⁻¹ = L⁻ᵀ and W⁻ᵀ = L⁻¹ form a factor (W⁻ᵀMW⁻¹ = I),
    solve = W⁻¹W⁻ᵀ and log det = slogdet of the dense definition. cg: no factor, no log-det (SolverError)."""
    t = truths[name]
    C = t.F if kind == "fisher" else t.G
    d = t.problem.dim
    eye = torch.eye(d, dtype=torch.float64)
    Md = C + DELTA * eye
    M = cd.metric(t.problem, kind, damping=DELTA, method=method)
    assert M.kind == kind and M.method == method and M.describe() == f"{kind}+{DELTA:g}"
    v = rand(d, 1)
    assert_rel(M.apply(v), Md @ v, what="apply")
    assert_rel(M.apply_undamped(v), C @ v, what="apply_undamped")
    if name == "mlp":
        assert_rel(M.to_dense(), Md, what="to_dense")
    x = M.solve(Md @ v)
    assert_rel(Md @ x, Md @ v, 1.5e-10, "residual of solve")
    kappa = float(np.linalg.cond(Md.numpy()))
    assert_rel(x, v, 2 * kappa * 1e-10, "solve(Mv) = v")
    assert not M.has_inv_sqrt
    with pytest.raises(cd.SolverError, match=f"the {kind} metric has no cheap inverse square root"):
        M.inv_sqrt_apply(v)
    if method == "cg":
        assert not M.has_factor
        for call in (lambda: M.inv_factor_apply(v), lambda: M.inv_factor_t_apply(v)):
            with pytest.raises(cd.SolverError, match=f"the {kind} metric has no cheap factor; use its solve"):
                call()
        with pytest.raises(cd.SolverError, match=f"the {kind} metric offers no log-determinant"):
            M.logdet()
        return
    assert M.has_factor
    assert_factor(M, Md, 1e-10)
    assert_rel(M.solve(v), torch.from_numpy(scipy.linalg.solve(Md.numpy(), v.numpy(), assume_a="pos")), 1e-11,
               "solve = dense solve")
    assert math.isclose(M.logdet(), logdet_np(Md), rel_tol=1e-11)


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_damping_metric_is_honoured(truths: dict[str, Truth], method: str) -> None:
    """With damping_metric R the metric is M = C + δR (not C + δI): apply/to_dense, the Cholesky factor, solve and
    log det follow the dense C + δR, for R a diagonal metric with entries spanning four orders of magnitude."""
    t = truths["mlp"]
    d = t.problem.dim
    r = torch.logspace(-2, 2, d, dtype=torch.float64)
    R = DiagonalMetric(r)
    M = cd.metric(t.problem, "ggn", damping=DELTA, method=method, damping_metric=R)
    Md = t.G + DELTA * torch.diag(r)
    v = rand(d, 2)
    assert_rel(M.apply(v), Md @ v, what="apply")
    assert_rel(M.to_dense(), Md, what="to_dense")
    identity_damped = t.G + DELTA * torch.eye(d, dtype=torch.float64)
    assert float((M.apply(v) - identity_damped @ v).norm()) > 0.1 * float((Md @ v).norm())  # R really is used
    x = M.solve(Md @ v)
    assert_rel(Md @ x, Md @ v, 5e-10, "residual of solve")  # κ ≈ 1e3 here: the true residual drifts from CG's
    if method == "dense":
        assert_rel(x, v, 1e-9)
        assert_factor(M, Md, 1e-10)
        assert math.isclose(M.logdet(), logdet_np(Md), rel_tol=1e-11)


# ---------------------------------------------------------------------------------------------- pullback


REPARAMS = {
    "softplus": lambda: softplus("2.bias"),  # nonlinear, diagonal J
    "exp∘ntk": lambda: compose(exp("2.bias"), ntk(sigma_w=0.5, sigma_b=2.0)),  # χ = ntk(ψ), θ = exp on the bias
    "linear": lambda: linear(seed=3, condition=20.0),  # dense J
}


@pytest.mark.parametrize("of", ["euclidean", "fisher"])
@pytest.mark.parametrize("rname", list(REPARAMS))
def test_pullback_metric_matches_dense_definition(truths: dict[str, Truth], rname: str, of: str) -> None:
    """M_ψ = Jᵀ M_θ J with J the dense Jacobian of φ (plain autograd) and M_θ = (1+δ)I or F_θ + δI (dense truth):
    to_dense, apply, solve (= dense solve) agree ≤ 1e-10; W⁻¹ = J⁻¹W_θ⁻¹ is a factor (W⁻ᵀM_ψW⁻¹ = I);
    log det M_ψ = log det M_θ + 2 log|det J| both by slogdet of the dense M_ψ and of its two factors."""
    t = truths["mlp"]
    q = cd.reparametrize(t.problem, REPARAMS[rname]())
    r = q.model.reparam
    psi = r.flatten_psi(q.params)
    J = dense.autograd_jacobian(lambda x: r.flatten_theta(r.forward(r.unflatten_psi(x))), psi)
    d = t.problem.dim
    eye = torch.eye(d, dtype=torch.float64)
    M_theta = (1 + DELTA) * eye if of == "euclidean" else t.F + DELTA * eye
    Md = J.T @ M_theta @ J
    M = cd.metric(q, "pullback", of=of, damping=DELTA)
    assert isinstance(M, PullbackMetric) and M.has_factor and M.kind == f"pullback({of}+{DELTA:g})"
    assert M.theta_metric.dim == d and M.theta_metric.damping == DELTA
    assert_rel(M.to_dense(), Md, what="to_dense = JᵀM_θJ")
    v = rand(d, 3)
    assert_rel(M.apply(v), Md @ v, what="apply")
    assert torch.equal(M.apply(v), M.apply_undamped(v))  # the damping lives in M_θ
    assert_rel(M.solve(v), torch.from_numpy(np.linalg.solve(Md.numpy(), v.numpy())), 1e-9, "solve")
    assert_rel(M.solve(M.apply(v)), v, 1e-9, "solve(apply(v))")
    assert_factor(M, Md, 1e-9)
    formula = logdet_np(M_theta) + 2 * float(np.linalg.slogdet(J.numpy())[1])
    assert math.isclose(M.logdet(), formula, rel_tol=1e-10, abs_tol=1e-10)
    assert math.isclose(M.logdet(), logdet_np(Md), rel_tol=1e-9, abs_tol=1e-9)
    # the same metric from a θ Metric object, and through reparam=/psi= on any problem
    M_obj = cd.metric(t.problem, of, damping=DELTA)
    for other in (cd.metric(q, "pullback", of=M_obj),
                  cd.metric(t.problem, "pullback", of=M_obj, reparam=r, psi=q.params)):
        assert_rel(other.apply(v), Md @ v, what="pullback of a Metric")


def test_pullback_of_weight_norm_has_no_factor(truths: dict[str, Truth]) -> None:
    """Weight norm: M_ψ = JᵀJ is still applied exactly (dense JᵀJ, singular along the null space of J), but J⁻¹
    does not exist: no factor, and solve, W⁻ᵀ and logdet raise ReparamError naming the non-bijection; a query
    with this metric is refused the same way."""
    t = truths["mlp"]
    q = cd.reparametrize(t.problem, weight_norm())
    r = q.model.reparam
    J = dense.autograd_jacobian(lambda x: r.flatten_theta(r.forward(r.unflatten_psi(x))), r.flatten_psi(q.params))
    M = cd.metric(q, "pullback")
    assert not M.has_factor and M.dim == q.dim == t.problem.dim + 9
    assert_rel(M.to_dense(), J.T @ J, what="JᵀJ")
    v = rand(q.dim, 4)
    for call in (lambda: M.solve(v), lambda: M.inv_factor_t_apply(v), M.logdet,
                 lambda: cd.grad_norm(q, metric=M), lambda: cd.eigs(cd.operator(q, "ggn"), metric=M)):
        with pytest.raises(cd.ReparamError, match=r"weight_norm is not a bijection .* does not exist"):
            call()


def test_pullback_of_weight_norm_inv_factor_names_the_cause(truths: dict[str, Truth]) -> None:
    """W⁻¹ = J⁻¹W_θ⁻¹ of a weight-norm pull-back does not exist: inv_factor_apply must say so (ReparamError or
    SolverError naming the missing factor, like inv_factor_t_apply), not fail on a vector length."""
    q = cd.reparametrize(truths["mlp"].problem, weight_norm())
    M = cd.metric(q, "pullback")
    with pytest.raises((cd.ReparamError, cd.SolverError), match="bijection|factor"):
        M.inv_factor_apply(rand(q.dim, 4))


# ---------------------------------------------------------------------------------------------- queries with metrics


@pytest.fixture(scope="module")
def pencil(truths: dict[str, Truth]) -> dict[str, np.ndarray]:
    """Eigenvalues of the dense pencil (H, F + δI) of the mlp by scipy.linalg.eigh(C, M), ascending."""
    t = truths["mlp"]
    Md = (t.F + DELTA * torch.eye(t.problem.dim, dtype=torch.float64)).numpy()
    return {"H": scipy.linalg.eigh(t.H.numpy(), Md, eigvals_only=True),
            "G": scipy.linalg.eigh(t.G.numpy(), Md, eigvals_only=True)}


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigs_with_cg_metric_is_generalized_lanczos(truths: dict[str, Truth], pencil: dict[str, np.ndarray],
                                                    which: str) -> None:
    """eigs of M⁻¹H with the CG-solved Fisher metric (Lanczos in the M-inner product, mode "generalized") gives the
    eigenvalues of the dense-factored metric (mode "symmetric") and of scipy.linalg.eigh(H, F + δI) on the dense
    definitions (≤ 1e-8 relative); its eigenvectors are M-orthonormal and satisfy H x = λ M x."""
    t = truths["mlp"]
    op = cd.operator(t.full, "hessian")
    M_cg = cd.metric(t.full, "fisher", damping=DELTA, method="cg")
    M_dense = cd.metric(t.full, "fisher", damping=DELTA, method="dense")
    r_cg = cd.eigs(op, k=3, which=which, metric=M_cg, tol=1e-10, return_vectors=True)
    r_dense = cd.eigs(op, k=3, which=which, metric=M_dense, tol=1e-10)
    assert r_cg.info["mode"] == "generalized" and r_dense.info["mode"] == "symmetric"
    assert r_cg.converged and r_dense.converged and r_cg.metric == f"fisher+{DELTA:g}"
    ref = pencil["H"][::-1][:3] if which == "largest" else pencil["H"][:3]
    for r in (r_cg, r_dense):
        print(f"  {r.info['mode']}: max relative error vs scipy {np.max(np.abs(r.value / ref - 1)):.1e}, "
              f"{r.info['iterations']} Lanczos steps")
        np.testing.assert_allclose(r.value, ref, rtol=1e-8)
    Md = t.F + DELTA * torch.eye(t.problem.dim, dtype=torch.float64)
    X = torch.stack(r_cg.vectors, 1)
    assert_rel(X.T @ Md @ X, torch.eye(3, dtype=torch.float64), 1e-8, "M-orthonormal")
    lam = torch.tensor(r_cg.value, dtype=torch.float64)
    assert_rel(t.H @ X, Md @ X * lam, 1e-7, "H x = λ M x")


def test_trace_with_cg_metric(truths: dict[str, Truth], pencil: dict[str, np.ndarray]) -> None:
    """tr(M⁻¹G) with the CG-solved Fisher metric: Hutchinson (zᵀM⁻¹Gz is unbiased for any square matrix) lies within
    3 standard errors of the exact Σλ of the dense pencil. Everything that needs a factor M = WᵀW — Hutch++,
    XTrace, exact trace, SLQ and exact log-det, density — raises SolverError naming the cause."""
    t = truths["mlp"]
    op = cd.operator(t.full, "ggn")
    M = cd.metric(t.full, "fisher", damping=DELTA, method="cg")
    exact = float(pencil["G"].sum())
    r = cd.trace(op, method="hutchinson", matvecs=30, metric=M, seed=5)
    print(f"  hutchinson {r.value:.4f} ± {r.stderr:.3f}, exact {exact:.4f}: {abs(r.value - exact) / r.stderr:.2f} se")
    assert 0 < r.stderr and abs(r.value - exact) <= 3 * r.stderr, (r.value, exact, r.stderr)
    assert r.matvecs == 30
    refusals = [
        (r"trace\(method='hutchpp'\)", lambda: cd.trace(op, method="hutchpp", matvecs=30, metric=M)),
        (r"trace\(method='xtrace'\)", lambda: cd.trace(op, method="xtrace", matvecs=30, metric=M)),
        (r"an exact \(dense\) query", lambda: cd.trace(op, method="exact", metric=M)),
        ("logdet", lambda: cd.logdet(op, damping=0.1, metric=M, probes=2, steps=5)),
        (r"an exact \(dense\) query", lambda: cd.logdet(op, damping=0.1, metric=M, method="exact")),
        ("density", lambda: cd.density(op, metric=M, probes=2, steps=5)),
    ]
    for query, call in refusals:
        with pytest.raises(cd.SolverError, match=f"{query}.* with the fisher metric {CHEAP_FACTOR_MSG}"):
            call()


def test_grad_norm_with_metrics(truths: dict[str, Truth]) -> None:
    """grad_norm = gᵀM⁻¹g with g the dense gradient (mean of plain-autograd per-sample gradients) and M the dense
    definition: (1+δ)I, F + δI (dense and CG), G + δI, and in ψ the pulled-back Fisher g_ψᵀ(JᵀM_θJ)⁻¹g_ψ with
    g_ψ = Jᵀg; ``info["norm"]`` is its square root; without a metric it is gᵀg."""
    t = truths["mlp"]
    p, g = t.problem, t.g
    d = p.dim
    eye = torch.eye(d, dtype=torch.float64)

    def ref(Md: Tensor, gg: Tensor) -> float:
        return float(gg @ torch.from_numpy(np.linalg.solve(Md.numpy(), gg.numpy())))

    cases = {
        "none": (None, eye),
        "euclidean": (cd.metric(p, "euclidean", damping=0.5), 1.5 * eye),
        "fisher-dense": (cd.metric(p, "fisher", damping=DELTA, method="dense"), t.F + DELTA * eye),
        "fisher-cg": (cd.metric(p, "fisher", damping=DELTA, method="cg"), t.F + DELTA * eye),
        "ggn": (cd.metric(p, "ggn", damping=DELTA), t.G + DELTA * eye),
    }
    for name, (M, Md) in cases.items():
        r = cd.grad_norm(p, metric=M)
        want = ref(Md, g)
        assert math.isclose(r.value, want, rel_tol=1e-9), (name, r.value, want)
        assert math.isclose(r.info["norm"], math.sqrt(want), rel_tol=1e-9)
        assert r.query == "grad_norm" and r.coordinates == "theta"
    q = cd.reparametrize(p, REPARAMS["exp∘ntk"]())
    rp = q.model.reparam
    J = dense.autograd_jacobian(lambda x: rp.flatten_theta(rp.forward(rp.unflatten_psi(x))),
                                rp.flatten_psi(q.params))
    M = cd.metric(q, "pullback", of="fisher", damping=DELTA)
    r = cd.grad_norm(cd.operator(q, "ggn"), metric=M)
    want = ref(J.T @ (t.F + DELTA * eye) @ J, J.T @ g)
    assert math.isclose(r.value, want, rel_tol=1e-9) and r.coordinates == "psi" and r.curvature == "ggn"


# ---------------------------------------------------------------------------------------------- bad input


def test_fisher_metric_singular_without_damping(dead_inputs: tuple[cd.Problem, list[int]]) -> None:
    """Undamped Fisher of the 64-pixel digits MLP (dead inputs: exact zero rows): dense → SingularMetricError from
    the Cholesky; cg → SingularMetricError when pᵀAp ≤ 0 (a right-hand side in the null space gives pᵀAp = 0, a
    generic one makes CG diverge to pᵀAp < 0), and a non-convergence warning when stopped early. δ = 1e-8 fixes it."""
    p, dead = dead_inputs
    with pytest.raises(cd.SingularMetricError, match=r"fisher metric \(damping 0\) is singular or not positive "
                                                     r"definite \(Cholesky failed at column \d+\); add damping"):
        cd.metric(p, "fisher", method="dense")
    M = cd.metric(p, "fisher", method="cg")
    e = torch.zeros(p.dim, dtype=torch.float64)
    e[dead[0]] = 1.0  # 0.weight[0, dead pixel]: F e = 0
    with pytest.raises(cd.SingularMetricError, match=r"fisher metric is singular or not positive definite "
                                                     r"\(pᵀAp = 0\.000e\+00 in CG\); add damping"):
        M.solve(e)
    v = rand(p.dim, 6)
    with pytest.raises(cd.SingularMetricError, match=r"pᵀAp = -\d\.\d+e\+\d+ in CG"):
        M.solve(v)
    early = cd.metric(p, "fisher", method="cg", cg_maxiter=20)
    with pytest.warns(UserWarning, match=r"CG for the fisher metric stopped at relative residual .* after 20 "
                                         r"iterations; the metric may be ill-conditioned: add damping"):
        early.solve(v)
    ok = cd.metric(p, "fisher", damping=1e-8, method="dense")
    assert ok.has_factor and math.isfinite(ok.logdet())


def test_metric_bad_input(truths: dict[str, Truth], dead_inputs: tuple[cd.Problem, list[int]]) -> None:
    """Each misuse raises its specific error with a message naming the cause."""
    p = truths["mlp"].problem
    other = dead_inputs[0]  # dimension 385 ≠ 69
    for build in (lambda: cd.metric(p, "euclidean", damping=-0.1), lambda: cd.metric(p, "fisher", damping=-0.1),
                  lambda: cd.metric(p, "ggn", damping=-0.1, method="cg"),
                  lambda: cd.metric(cd.reparametrize(p, ntk()), "pullback", of="fisher", damping=-0.1)):
        with pytest.raises(cd.MetricError, match=r"damping must be ≥ 0, got -0\.1"):
            build()
    with pytest.raises(cd.UnknownNameError, match=r"unknown metric kind 'riemann'; choose one of: euclidean, "):
        cd.metric(p, "riemann")
    with pytest.raises(cd.UnknownNameError, match=r"unknown curvature-metric method 'qr'; choose one of: auto, dense, cg"):
        cd.metric(p, "fisher", method="qr")
    with pytest.raises(cd.MetricError, match=r"the euclidean metric takes no options, got \['method'\]"):
        cd.metric(p, "euclidean", method="cg")
    with pytest.raises(cd.MetricError, match=r"metric\(\) needs a curvdist.Problem, got Tensor"):
        cd.metric(torch.eye(3), "euclidean")
    # pullback misuse
    with pytest.raises(cd.MetricError, match="a pullback metric needs a problem made by cd.reparametrize, or "
                                             "reparam= and psi="):
        cd.metric(p, "pullback")
    q = cd.reparametrize(p, ntk())
    r = q.model.reparam
    with pytest.raises(cd.MetricError, match="a pullback metric with reparam= also needs the point psi="):
        cd.metric(p, "pullback", of=cd.metric(p, "euclidean"), reparam=r)
    with pytest.raises(cd.MetricError, match=r"pass the θ metric itself as of=<Metric> when giving reparam="):
        cd.metric(p, "pullback", of="euclidean", reparam=r, psi=q.params)
    with pytest.raises(cd.MetricError, match="damping/options belong to the θ metric when of= is a Metric"):
        cd.metric(q, "pullback", of=cd.metric(p, "euclidean"), damping=0.1)
    with pytest.raises(cd.MetricError, match=r"θ metric has dimension 385, the reparametrization maps to 69"):
        PullbackMetric(cd.metric(other, "euclidean"), r, q.params)
    # damping metric of the wrong dimension
    with pytest.raises(cd.ShapeError, match=r"damping metric has dimension 385, expected 69"):
        cd.metric(p, "fisher", damping=0.1, damping_metric=cd.metric(other, "euclidean"))
    # vectors of the wrong length
    with pytest.raises(cd.ShapeError, match=r"fisher metric acts on flat vectors of length 69, got \(70,\)"):
        cd.metric(p, "fisher", damping=0.1).solve(torch.ones(70, dtype=torch.float64))


def test_queries_reject_a_metric_of_another_dimension(truths: dict[str, Truth],
                                                      dead_inputs: tuple[cd.Problem, list[int]]) -> None:
    """A metric of another dimension (385) passed with a 69-dimensional operator → ProblemError naming both
    dimensions, for eigs, trace, logdet and density; a non-Metric → ProblemError."""
    op = cd.operator(truths["mlp"].problem, "ggn")
    M = cd.metric(dead_inputs[0], "euclidean", damping=0.1)
    msg = r"the metric has dimension 385 but the operator 69"
    for call in (lambda: cd.eigs(op, metric=M), lambda: cd.trace(op, metric=M, matvecs=9),
                 lambda: cd.trace(op, method="exact", metric=M), lambda: cd.logdet(op, metric=M, probes=1, steps=3),
                 lambda: cd.density(op, metric=M, probes=1, steps=3)):
        with pytest.raises(cd.ProblemError, match=msg):
            call()
    with pytest.raises(cd.ProblemError, match="metric must be a curvdist Metric"):
        cd.eigs(op, metric=torch.eye(69, dtype=torch.float64))


def test_grad_norm_rejects_a_metric_of_another_dimension(truths: dict[str, Truth],
                                                         dead_inputs: tuple[cd.Problem, list[int]]) -> None:
    """grad_norm with a metric of another dimension → ProblemError, like eigs/trace/logdet/density."""
    M = cd.metric(dead_inputs[0], "euclidean", damping=0.1)
    with pytest.raises(cd.ProblemError, match=r"the metric has dimension 385"):
        cd.grad_norm(truths["mlp"].problem, metric=M)
