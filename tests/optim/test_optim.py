"""RiemannianSGD: the update is −lr·(M + δI)⁻¹g against a dense solve, it trains, and bad refreshes leave the
parameters unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

import curvdist as cd
from curvdist import zoo
from curvdist.geometry.metrics import DiagonalMetric
from curvdist.optim import RiemannianSGD
from curvdist.optim.riemannian_sgd import STATE_KEY
from tests import dense
from tests.cases import CASES


def _grad(model, X, y):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(X), y)
    loss.backward()
    return loss


def test_step_is_the_preconditioned_gradient():
    case = CASES["mlp"]()
    model = case.model()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    F = dense.dense_ggn(model, "cross_entropy", case.X, case.y, "mean")
    opt = RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric="fisher", lr=0.5, damping=0.1)
    _grad(model, case.X, case.y)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = -0.5 * torch.linalg.solve(F + 0.1 * torch.eye(len(F), dtype=F.dtype), g)
    torch.testing.assert_close(after - before, expected, rtol=1e-9, atol=1e-12)


def _losses(make_opt, X, y, steps):
    """Full-batch training of the digits MLP from a fixed initialization; the loss after every step."""
    model = zoo.mlp(64, (16,), 10, seed=0, dtype="float64")
    opt = make_opt(model)
    out = []
    for _ in range(steps):
        _grad(model, X, y)
        opt.step()
        with torch.no_grad():
            out.append(float(torch.nn.functional.cross_entropy(model(X), y)))
    return out


@pytest.mark.parametrize("kind,lr,adam_steps,within", [("fisher", 0.5, 100, 30), ("kflr", 0.5, 100, 30),
                                                       ("kfac", 0.5, 100, 30), ("ekfac", 0.5, 100, 30),
                                                       ("diag_ggn", 0.05, 30, 40)])
def test_reaches_adams_loss_in_fewer_steps(kind, lr, adam_steps, within):
    """Digits (300 images), full batch: the loss Adam (lr 0.01) has after ``adam_steps`` steps, reached by
    RiemannianSGD (δ = 0.1, metric rebuilt every 5 steps) within ``within`` steps (measured: 20, 20, 22 and ~32)."""
    X, y = zoo.digits(n=300, dtype="float64")
    adam = _losses(lambda m: torch.optim.Adam(m.parameters(), lr=0.01), X, y, adam_steps)
    ours = _losses(lambda m: RiemannianSGD(m, "cross_entropy", (X, y), metric=kind, lr=lr, damping=0.1, refresh=5),
                   X, y, within)
    assert min(ours) <= adam[-1], (kind, adam[-1], ours[-5:])
    assert ours[-1] < 0.2 * ours[0] or kind == "diag_ggn"


def test_bad_refresh_leaves_parameters_unchanged():
    case = CASES["mlp"]()
    model = case.model()
    before = [p.detach().clone() for p in model.parameters()]

    def nan_metric(problem):
        return DiagonalMetric(torch.full((problem.dim,), float("nan"), dtype=problem.dtype))

    opt = RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric=nan_metric)
    _grad(model, case.X, case.y)
    with pytest.raises(cd.MetricError, match="NaN or inf"):
        opt.step()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_singular_factor_without_damping():
    X, y = zoo.digits(n=40, dtype="float64")  # all-zero pixels feed the first layer
    model = zoo.mlp(64, (5,), 10, seed=0, dtype="float64")
    opt = RiemannianSGD(model, "cross_entropy", (X, y), metric="kflr", damping=0.0)
    _grad(model, X, y)
    with pytest.raises(cd.SingularMetricError, match="add damping"):
        opt.step()


def test_bad_arguments():
    case = CASES["mlp"]()
    model = case.model()
    data = (case.X, case.y)
    with pytest.raises(cd.ProblemError, match="lr must be positive"):
        RiemannianSGD(model, "cross_entropy", data, lr=0)
    with pytest.raises(cd.ProblemError, match="needs loss= and data="):
        RiemannianSGD(model, metric="kfac")
    opt = RiemannianSGD(model, "cross_entropy", data)
    with pytest.raises(cd.ProblemError, match="no gradient"):
        opt.step()


def test_adam_metric_is_adams_preconditioner():
    """metric="adam": M = diag(√v̂) + δ with v the moving average of g² — for two steps against the closed form."""
    case = CASES["mlp"]()
    model = case.model()
    opt = RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric="adam", lr=0.1, damping=1e-3, beta2=0.9)
    v = None
    for t in (1, 2):
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        _grad(model, case.X, case.y)
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        v = 0.1 * g * g if v is None else 0.9 * v + 0.1 * g * g
        expected = -0.1 * g / ((v / (1 - 0.9**t)).sqrt() + 1e-3)
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(after - before, expected, rtol=1e-10, atol=1e-14)


def test_fisher_by_cg_with_momentum():
    """metric="fisher" solved by CG, heavy-ball momentum: d_t = (F + δI)⁻¹g_t, b_t = μ b_{t−1} + d_t, θ ← θ − α b_t,
    against dense float64 solves (the metric refreshed every step)."""
    case = CASES["mlp"]()
    model = case.model()
    opt = RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric="fisher", lr=0.3, damping=0.1, refresh=1,
                        momentum=0.9, metric_options={"method": "cg", "cg_tol": 1e-13})
    buf = None
    for _ in range(2):
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        F = dense.dense_ggn(model, "cross_entropy", case.X, case.y, "mean")
        _grad(model, case.X, case.y)
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        d = torch.linalg.solve(F + 0.1 * torch.eye(len(F), dtype=F.dtype), g)
        buf = d if buf is None else 0.9 * buf + d
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(after - before, -0.3 * buf, rtol=1e-8, atol=1e-11)


# --------------------------------------------------------------------------- state: save, resume, precondition
def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _resume_case(metric, **options):
    """The mlp case; an optimizer factory with momentum 0.9 and the metric rebuilt every 2 steps."""
    case = CASES["mlp"]()

    def make(model):
        return RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric=metric, lr=0.2, damping=0.05,
                             refresh=2, momentum=0.9, **options)

    def steps(model, opt, n):
        for _ in range(n):
            _grad(model, case.X, case.y)
            opt.step()

    return case, make, steps


@pytest.mark.parametrize("metric", ["kfac", "ekfac", "adam", "diag_ggn", "fisher"])
def test_state_dict_resumes_the_same_steps(metric, tmp_path):
    """3 steps, state_dict (through torch.save/torch.load(weights_only=True)), a fresh model and optimizer at those
    parameters load it, 2 more steps: the parameters of 5 uninterrupted steps, exactly. ``fisher`` (matrix-free,
    nothing saved) resumes at a refresh step (t = 4) too, so it is exact as well."""
    case, make, steps = _resume_case(metric)
    model = case.model()
    opt = make(model)
    steps(model, opt, 4 if metric == "fisher" else 3)
    full = case.model()
    full_opt = make(full)
    steps(full, full_opt, 4 if metric == "fisher" else 3)
    assert torch.equal(_flat(full), _flat(model))
    sd = copy.deepcopy(opt.state_dict())
    entry = sd["state"][STATE_KEY]
    assert entry["step"] == opt.steps and entry["momentum_buffer"] is not None
    assert (entry["exp_avg_sq"] is not None) == (metric == "adam")
    assert (entry["metric"] is not None) == (metric in ("kfac", "ekfac", "diag_ggn"))
    torch.save(sd, tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)

    resumed = case.model()
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), model.parameters()):
            p.copy_(q)
    del model, opt
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(sd)
    assert resumed_opt.steps == full_opt.steps
    if metric in ("kfac", "ekfac", "diag_ggn"):
        assert type(resumed_opt.metric) is type(full_opt.metric)
        x = torch.linspace(-1, 1, full_opt.dim, dtype=torch.float64)
        assert torch.equal(resumed_opt.metric.solve(x), full_opt.metric.solve(x))
    steps(full, full_opt, 2)
    steps(resumed, resumed_opt, 2)
    assert torch.equal(_flat(resumed), _flat(full))


def test_resume_mid_refresh_without_metric_statistics_warns():
    """A matrix-free metric is not saved: resumed at t = 3 (refresh 2) it is rebuilt at t = 3, and that is said."""
    case, make, steps = _resume_case("fisher")
    model = case.model()
    opt = make(model)
    steps(model, opt, 3)
    fresh = make(case.model())
    with pytest.warns(UserWarning, match="rebuilt at the next step"):
        fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.metric is None and fresh.steps == 3


def test_load_state_dict_refuses_a_foreign_state():
    case, make, steps = _resume_case("kfac")
    model = case.model()
    opt = make(model)
    steps(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    other = RiemannianSGD(case.model(), "cross_entropy", (case.X, case.y), metric="diag_ggn")
    with pytest.raises(cd.MetricError, match="holds a kfac metric"):
        other.load_state_dict(copy.deepcopy(sd))
    assert other.steps == 0 and other.metric is None
    with pytest.raises(cd.ProblemError, match="no 'riemannian_sgd' entry"):
        other.load_state_dict(torch.optim.SGD(case.model().parameters(), lr=0.1).state_dict())
    sd["state"][STATE_KEY]["momentum_buffer"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(cd.ShapeError, match="momentum_buffer"):
        make(case.model()).load_state_dict(sd)


@pytest.mark.parametrize("metric", ["kfac", "adam"])
def test_precondition_is_what_the_step_applies(metric):
    """Two optimizers in the same state: precondition(g) on one, step() on the other, for 3 steps: the step moves
    the parameters by exactly −lr·d, and both advance their state alike."""
    case, make, steps = _resume_case(metric)
    a, b = case.model(), case.model()
    opt_a, opt_b = make(a), make(b)
    for t in range(3):
        _grad(a, case.X, case.y)
        g = torch.cat([p.grad.reshape(-1) for p in a.parameters()])
        d = opt_a.precondition(g)
        before = _flat(a)
        expected = before.clone().add_(d, alpha=-0.2)
        with torch.no_grad():
            for p, piece in zip(a.parameters(), torch.split(d, [p.numel() for p in a.parameters()])):
                p.add_(piece.view_as(p), alpha=-0.2)
        steps(b, opt_b, 1)
        assert torch.equal(_flat(b), expected) and torch.equal(_flat(a), expected)
        assert opt_a.steps == opt_b.steps == t + 1
    with pytest.raises(cd.ShapeError, match="flat gradient of length"):
        opt_a.precondition(torch.zeros(3, dtype=torch.float64))


def test_a_failed_step_leaves_the_state_unchanged():
    """A direction that is not finite raises and changes neither the parameters nor the state (Adam's v)."""
    case = CASES["mlp"]()
    model = case.model()
    opt = RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric="adam", momentum=0.5)
    _grad(model, case.X, case.y)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    before = _flat(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(cd.MetricError, match="NaN or inf"):
        opt.step()
    entry = opt.state_dict()["state"][STATE_KEY]
    assert torch.equal(_flat(model), before) and entry["step"] == 1
    assert torch.equal(entry["exp_avg_sq"], sd["state"][STATE_KEY]["exp_avg_sq"])
    assert torch.equal(entry["momentum_buffer"], sd["state"][STATE_KEY]["momentum_buffer"])


def test_kl_clip_scales_the_direction():
    """kl_clip κ: the step is ν·(−lr (M + δI)⁻¹g) with ν = min(1, √(κ / (lr² gᵀd))), d and ν formed here from the
    dense float64 GGN; a κ above lr² gᵀd leaves the step unchanged."""
    case = CASES["mlp"]()
    for kappa, clipped in ((1e-4, True), (1e3, False)):
        model = case.model()
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        F = dense.dense_ggn(model, "cross_entropy", case.X, case.y, "mean")
        opt = RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric="fisher", lr=0.5, damping=0.1,
                            kl_clip=kappa)
        _grad(model, case.X, case.y)
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        d = torch.linalg.solve(F + 0.1 * torch.eye(len(F), dtype=F.dtype), g)
        vg = 0.25 * float(g @ d)
        nu = min(1.0, (kappa / vg) ** 0.5)
        assert (nu < 1) == clipped
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(after - before, -0.5 * nu * d, rtol=1e-9, atol=1e-12)
    with pytest.raises(cd.ProblemError, match="kl_clip must be positive"):
        RiemannianSGD(case.model(), "cross_entropy", (case.X, case.y), kl_clip=0.0)
