"""RiemannianSGD(statistics='step'): metric statistics from the training step's own forward pass equal those of a
separate pass over the same batch (Kronecker and diagonal kinds, sampled labels included), with gradient
accumulation; moving averages of the terms; state round trip; refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import curvdist as cd
from curvdist.errors import MetricError, ProblemError
from curvdist.geometry.blocks.kronecker import kfac_sums_probes
from curvdist.geometry.metrics.kfac import KFACMetric, normalized_factors
from curvdist.optim import RiemannianSGD
from curvdist.optim.riemannian_sgd import STATE_KEY
from tests.cases import CASES

KINDS = [("kflr", {}), ("kfac", {"mc_samples": 2, "seed": 3}), ("diag_ggn", {}),
         ("diag_fisher_mc", {"mc_samples": 2, "seed": 3}), ("empirical_fisher_diag", {})]


def _loss(model: nn.Module, X: Tensor, y: Tensor, total: int) -> Tensor:
    """The micro-batch's share of the mean cross-entropy over ``total`` samples."""
    return nn.functional.cross_entropy(model(X), y, reduction="sum") / total


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", ["mlp", "token_transformer"])
@pytest.mark.parametrize("kind,options", KINDS, ids=[k for k, _ in KINDS])
@pytest.mark.parametrize("micro", [1, 2])
def test_step_statistics_equal_a_separate_pass(name: str, kind: str, options: dict, micro: int) -> None:
    """One step, its batch in ``micro`` tracked micro-batches (gradient accumulation): the optimizer's metric is
    the separate-pass metric of the whole batch at the parameters before the step (float64, ≤ 1e-10), and the step
    is −lr·M⁻¹g with g the accumulated gradient."""
    case = CASES[name]()
    model = case.model()
    before = copy.deepcopy(model)
    X, y = case.X, case.y
    opt = RiemannianSGD(model, "cross_entropy", metric=kind, lr=0.3, damping=0.1, statistics="step",
                        metric_options=options)
    chunks = torch.arange(len(y)).tensor_split(micro)
    for idx in chunks:
        with opt.track(y[idx]):
            loss = _loss(model, X[idx], y[idx], len(y))
        loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    problem = cd.Problem(before, case.loss, (X, y))
    M = cd.metric(problem, kind, damping=0.1, backend="torch", **options)
    torch.testing.assert_close(opt.metric.to_dense(), M.to_dense(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(_flat(model) - _flat(before), -0.3 * M.solve(g), rtol=1e-9, atol=1e-12)


def test_moving_average_of_the_kronecker_terms() -> None:
    """Two steps with decay β and refresh 1: the second metric is (βG₀ + (1−β)G₁) ⊗ (βA₀ + (1−β)A₁) per layer, G_t,
    A_t the separate-pass factors at the parameters of step t (the sampled labels of step 1 keyed by the sample
    indices after the first batch)."""
    case = CASES["mlp"]()
    model = case.model()
    X, y = case.X, case.y
    beta = 0.7
    opt = RiemannianSGD(model, "cross_entropy", metric="kflr", lr=0.3, damping=0.1, statistics="step", refresh=1,
                        decay=beta)
    factors = []
    for _ in range(2):
        problem = cd.Problem(copy.deepcopy(model), case.loss, (X, y))
        G, A = kfac_sums_probes(problem, exact=True)
        factors.append(normalized_factors(problem.param_names, G, A, problem.scale, problem.num_samples))
        with opt.track(y):
            loss = _loss(model, X, y, len(y))
        loss.backward()
        opt.step()
        opt.zero_grad()
    names = list(factors[0])
    avg = {n: tuple(beta * a + (1 - beta) * b for a, b in zip(factors[0][n], factors[1][n])) for n in names}
    expected = KFACMetric(names, [p.shape for p in model.parameters()], avg, damping=0.1)
    torch.testing.assert_close(opt.metric.to_dense(), expected.to_dense(), rtol=1e-10, atol=1e-13)


def test_state_round_trip_resumes_the_same_steps(tmp_path) -> None:
    """3 steps, state_dict through torch.save/load(weights_only=True), 2 more: the parameters of 5 uninterrupted
    steps (the averages, the sample count for the sampled labels and the metric are restored)."""
    case = CASES["mlp"]()

    def make(model):
        return RiemannianSGD(model, "cross_entropy", metric="kfac", lr=0.2, damping=0.05, statistics="step",
                             refresh=2, momentum=0.9, metric_options={"seed": 1})

    def steps(model, opt, n):
        for _ in range(n):
            with opt.track(case.y):
                loss = _loss(model, case.X, case.y, len(case.y))
            opt.zero_grad()
            loss.backward()
            opt.step()

    full, part = case.model(), case.model()
    full_opt, part_opt = make(full), make(part)
    steps(full, full_opt, 5)
    steps(part, part_opt, 3)
    torch.save(part_opt.state_dict(), tmp_path / "opt.pt")
    resumed = copy.deepcopy(part)
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    steps(resumed, resumed_opt, 2)
    assert torch.equal(_flat(resumed), _flat(full))
    assert resumed_opt.state[STATE_KEY]["step_statistics"]["seen"] == 5 * len(case.y)


def test_refusals_name_the_cause() -> None:
    case = CASES["mlp"]()
    model = case.model()
    with pytest.raises(MetricError, match="offered for kfac, kflr.*not 'fisher'"):
        RiemannianSGD(model, "cross_entropy", metric="fisher", statistics="step")
    with pytest.raises(ProblemError, match="statistics must be 'separate' or 'step'"):
        RiemannianSGD(model, "cross_entropy", (case.X, case.y), statistics="hooks")
    opt = RiemannianSGD(model, "cross_entropy", metric="kflr", statistics="step")
    _loss(model, case.X, case.y, len(case.y)).backward()
    with pytest.raises(ProblemError, match="no statistics were tracked for this step.*optimizer.track"):
        opt.step()
    with pytest.raises(MetricError, match="no forward pass of the model ran inside track"):
        with opt.track(case.y):
            pass
    separate = RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric="kflr")
    with pytest.raises(ProblemError, match="track\\(\\) belongs to statistics='step'"):
        separate.track(case.y)


def _train(opt: RiemannianSGD, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
    for X, y in batches:
        opt.zero_grad()
        with opt.track(y):
            loss = _loss(model, X, y, len(y))
        loss.backward()
        opt.step()


def test_statistics_every_k_steps_average_only_those_steps() -> None:
    """statistics_every=2 over batches b0, b1, b2: the averages are those of an optimizer that tracks b0 and b2 only
    (at the same parameters: b1's step moves them, so the second run replays the same parameters by copying)."""
    case = CASES["mlp"]()
    X, y = case.X, case.y
    halves = [(X[i::3], y[i::3]) for i in range(3)]
    model = case.model()
    every = RiemannianSGD(model, "cross_entropy", metric="kflr", lr=0.2, damping=0.1, statistics="step",
                          refresh=1, decay=0.6, statistics_every=2)
    seen: list[nn.Module] = []
    for b in halves:
        seen.append(copy.deepcopy(model))
        _train(every, model, [b])
    # the reference tracks b0 at the parameters of step 0 and b2 at those of step 2
    ref_model = seen[0]
    ref = RiemannianSGD(ref_model, "cross_entropy", metric="kflr", lr=0.2, damping=0.1, statistics="step",
                        refresh=1, decay=0.6)
    _train(ref, ref_model, [halves[0]])
    ref_model.load_state_dict(seen[2].state_dict())
    _train(ref, ref_model, [halves[2]])
    for name in every.step_statistics.names:
        for a, b in zip(every.step_statistics.average[name], ref.step_statistics.average[name]):
            for x, z in zip(a, b):
                torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-14)
    assert every.steps == 3


def test_subspace_eigh_is_exact_in_an_eigenbasis_and_converges() -> None:
    """One step from an exact eigenbasis reproduces F = QΛQᵀ; repeated steps from a random basis converge to F's
    eigendecomposition (distinct eigenvalues, float64)."""
    from curvdist.optim.step_statistics import subspace_eigh

    g = torch.Generator().manual_seed(0)
    Q0, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    lam0 = torch.linspace(0.1, 5.0, 12, dtype=torch.float64) ** 2
    F = (Q0 * lam0) @ Q0.T
    lam, Q = subspace_eigh(F, Q0)
    torch.testing.assert_close((Q * lam) @ Q.T, F, rtol=1e-12, atol=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    for _ in range(400):
        lam, Q = subspace_eigh(F, Q)
    torch.testing.assert_close((Q * lam) @ Q.T, F, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(lam.sort().values, lam0, rtol=1e-8, atol=1e-10)


def test_subspace_basis_update_refreshes_from_the_previous_basis() -> None:
    """basis_update='subspace': the first refresh eigendecomposes (the metric equals basis_update='eigh'); a refresh
    on unchanged averages (statistics_every=2, refresh=1: step 1 tracks nothing) reproduces the same metric; after a
    change of the averages it approximates the eigendecomposed metric (one subspace step: M⁻¹g within 10 %)."""
    case = CASES["mlp"]()
    X, y = case.X, case.y
    batches = [(X[i::3], y[i::3]) for i in range(3)]
    runs = {}
    for basis in ("eigh", "subspace"):
        model = case.model()
        opt = RiemannianSGD(model, "cross_entropy", metric="kflr", lr=0.05, damping=0.1, statistics="step",
                            refresh=1, decay=0.9, statistics_every=2, basis_update=basis)
        metrics = []
        for b in batches:
            _train(opt, model, [b])
            metrics.append(opt.metric.to_dense())
        runs[basis] = metrics
    torch.testing.assert_close(runs["subspace"][0], runs["eigh"][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(runs["subspace"][1], runs["eigh"][1], rtol=1e-9, atol=1e-11)
    v = torch.randn(runs["eigh"][2].shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact, approx = torch.linalg.solve(runs["eigh"][2], v), torch.linalg.solve(runs["subspace"][2], v)
    assert not torch.allclose(exact, approx, rtol=1e-9)  # one subspace step is not the eigendecomposition
    assert float((approx - exact).norm() / exact.norm()) < 0.1


def test_statistics_every_and_basis_update_refusals() -> None:
    case = CASES["mlp"]()
    model = case.model()
    with pytest.raises(ProblemError, match="statistics_every must be a positive integer"):
        RiemannianSGD(model, "cross_entropy", metric="kflr", statistics="step", statistics_every=0)
    with pytest.raises(ProblemError, match="basis_update must be 'eigh' or 'subspace'"):
        RiemannianSGD(model, "cross_entropy", metric="kflr", statistics="step", basis_update="qr")
    with pytest.raises(ProblemError, match="belong to statistics='step'"):
        RiemannianSGD(model, "cross_entropy", (case.X, case.y), metric="kflr", basis_update="subspace")
