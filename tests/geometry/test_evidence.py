"""The ``evidence`` query (:mod:`curvdist.queries.evidence`): the invariant Laplace log-evidence with structured
metrics (KFLR, diagonal GGN), past the dense route's size.

Ground truth: at the mode the query reports, every term is recomputed here densely in float64 from per-sample
Jacobians by ``torch.func`` (the KFLR factors, the GGN diagonal, the GGN, the log-likelihood and the prior), not
through the code under test; invariance compares the query in θ with the query on the reparametrized model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import curvdist as cd
from curvdist import zoo
from curvdist.errors import MemoryBudgetError, MetricError
from curvdist.geometry.laplace import log_det_metric
from curvdist.geometry.reparam import scale
from curvdist.resources import peak_rss_mb, reset_peak, rss_mb

ALPHA = 1.0
SCALES = {"0.weight": 3.0, "2.bias": 0.5, "2.weight": 0.2}


def _mlp(inputs: int, hidden: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()


@pytest.fixture(scope="module")
def small() -> cd.Problem:
    """4×4 digits, 60 samples, 16-6-10 tanh MLP (172 parameters), mean reduction, 2 batches."""
    X, y = zoo.digits(split="train", dtype="float64")
    X = X[:60].reshape(-1, 8, 8)[:, ::2, ::2].reshape(-1, 16)
    return cd.Problem(_mlp(16, 6), "cross_entropy", (X, y[:60]), batch_size=30)


def _dense_terms(problem: cd.Problem, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample quantities of the 2-layer MLP at ``flat``, by torch.func: outputs, Λ, the Jacobian of the logits
    (N, C, d), and per layer the inputs a and the Jacobians of the logits w.r.t. the pre-activations."""
    model = problem.model
    X = torch.cat([x for x, _ in problem.batches()])
    y = torch.cat([t for _, t in problem.batches()])
    names = problem.param_names
    params = dict(zip(names, problem.unflatten(flat)))

    def logits(p_flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, problem.unflatten(p_flat))), (x.unsqueeze(0),))[0]

    J = torch.stack([jacrev(logits)(flat, x) for x in X])  # (N, C, d)
    W1, b1, W2, b2 = (params[n] for n in ("0.weight", "0.bias", "2.weight", "2.bias"))
    z1 = X @ W1.T + b1
    h = torch.tanh(z1)
    out = h @ W2.T + b2
    p = torch.softmax(out, dim=-1)
    Lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (N, C, C)
    dz1 = W2.unsqueeze(0) * (1 - h**2).unsqueeze(1)  # ∂f/∂z1 (N, C, hidden)
    dz2 = torch.eye(10, dtype=X.dtype).expand(X.shape[0], 10, 10)  # ∂f/∂z2
    return {"X": X, "y": y, "out": out, "Lam": Lam, "J": J, "a": [X, h], "dz": [dz1, dz2]}


def _dense_log_det_metric(t: dict[str, torch.Tensor], kind: str, alpha: float) -> torch.Tensor:
    """log det(F + αI), F = KFLR or diag GGN summed over the samples, from the dense per-sample pieces."""
    total = torch.zeros((), dtype=torch.float64)
    N = t["X"].shape[0]
    for a, dz in zip(t["a"], t["dz"]):
        G = torch.einsum("nco,ncd,ndp->op", dz, t["Lam"], dz)  # Σ_n (∂f/∂z)ᵀ Λ (∂f/∂z)
        if kind == "kflr":
            A = a.T @ a / N
            W = torch.kron(G.contiguous(), A.contiguous())
            total = total + torch.logdet(W + alpha * torch.eye(W.shape[0], dtype=W.dtype))
            total = total + torch.logdet(G + alpha * torch.eye(G.shape[0], dtype=G.dtype))
        else:
            per_sample_b2 = torch.einsum("nco,ncd,ndo->no", dz, t["Lam"], dz)  # diag of (∂f/∂z)ᵀ Λ (∂f/∂z) per n
            total = total + torch.log(per_sample_b2.T @ (a * a) + alpha).sum() + torch.log(G.diagonal() + alpha).sum()
    return total


def _dense_evidence(problem: cd.Problem, flat: torch.Tensor, kind: str, alpha: float) -> float:
    """log p̃(x) + (d/2) log 2π − ½ log det(M⁻¹A), M = F + αI, A = GGN + αI, all dense."""
    t = _dense_terms(problem, flat)
    d = flat.numel()
    ll = -torch.nn.functional.cross_entropy(t["out"], t["y"], reduction="sum")
    prior = -0.5 * alpha * flat.dot(flat) + 0.5 * d * math.log(alpha / (2 * math.pi))
    ld_m = _dense_log_det_metric(t, kind, alpha)
    A = torch.einsum("ncd,nce,nef->df", t["J"], t["Lam"], t["J"]) + alpha * torch.eye(d, dtype=torch.float64)
    return float(ll + prior - 0.5 * ld_m + 0.5 * d * math.log(2 * math.pi) - 0.5 * (torch.logdet(A) - ld_m))


@pytest.mark.parametrize("kind", ["kflr", "diag_ggn"])
def test_structured_log_det_metric_is_the_dense_one_and_differentiable(small: cd.Problem, kind: str) -> None:
    x = small.flatten(small.params).detach()
    f = log_det_metric(small, kind, ALPHA)
    expected = _dense_log_det_metric(_dense_terms(small, x), kind, ALPHA)
    assert float(f(x).detach()) == pytest.approx(float(expected), rel=1e-12)
    # the library's own structured metric agrees (M = s·(F + αI) for the mean reduction)
    M = cd.metric(small, kind, ALPHA * small.scale)
    assert M.logdet() - small.dim * math.log(small.scale) == pytest.approx(float(expected), rel=1e-12)
    # its gradient is the dense one's (autograd through the dense per-sample construction)
    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(f(xr), xr)[0]
    xd = x.clone().requires_grad_(True)
    gd = torch.autograd.grad(_dense_log_det_metric(_dense_terms(small, xd), kind, ALPHA), xd)[0]
    torch.testing.assert_close(g, gd, rtol=1e-9, atol=1e-12 * float(gd.abs().max()))


@pytest.mark.parametrize(("kind", "max_iter"), [("kflr", 500), ("diag_ggn", 40)])
def test_evidence_equals_the_dense_route_and_is_invariant(small: cd.Problem, kind: str, max_iter: int) -> None:
    """At the point the mode search returns, log Z equals the dense computation; θ and ψ give the same log Z (the
    search takes the same metric-whitened path in both, converged or capped)."""
    r = cd.evidence(small, ALPHA, kind, logdet_method="exact", max_iter=max_iter)
    assert r.query == "evidence" and r.info["logdet_method"] == "exact"
    assert r.value == pytest.approx(_dense_evidence(small, r.vectors, kind, ALPHA), rel=1e-10)
    assert r.info["mode_distance"] > 0
    if max_iter == 500:  # converged: a stationary point of log p̃ (gradient small in the metric's norm)
        assert r.converged and r.info["mode_grad_norm"] < 1e-4
    else:
        assert r.info["mode_iterations"] == max_iter
    q = cd.reparametrize(small, scale(SCALES))
    rq = cd.evidence(q, ALPHA, kind, logdet_method="exact", max_iter=max_iter)
    print(f"{kind}: log Z θ {r.value:.12g}, ψ {rq.value:.12g}")
    assert rq.value == pytest.approx(r.value, rel=1e-8)
    assert rq.coordinates == "psi" and r.coordinates == "theta"


def test_evidence_leaves_the_parameters_and_slq_agrees_with_exact(small: cd.Problem) -> None:
    before = small.flatten(small.params).detach().clone()
    exact = cd.evidence(small, ALPHA, "kflr", logdet_method="exact", max_iter=30)
    slq = cd.evidence(small, ALPHA, "kflr", logdet_method="slq", probes=40, steps=30, seed=1, max_iter=30)
    assert torch.equal(small.flatten(small.params).detach(), before)
    torch.testing.assert_close(slq.vectors, exact.vectors, rtol=0, atol=0)  # the same mode search
    assert slq.stderr > 0 and slq.info["logdet_method"] == "slq"
    assert abs(slq.value - exact.value) <= 4 * slq.stderr
    assert slq.info["log_p_tilde"] == exact.info["log_p_tilde"]


def test_evidence_refusals(small: cd.Problem) -> None:
    with pytest.raises(MetricError, match=r"kflr.*diag_ggn.*fisher"):
        cd.evidence(small, ALPHA, "kfac")
    with pytest.raises(MetricError, match="prior precision"):
        cd.evidence(small, 0.0, "kflr")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 10)).double()
    X, y = zoo.digits(split="train", dtype="float64")
    p = cd.Problem(conv, "cross_entropy", (X[:8].reshape(-1, 1, 8, 8)[:, :, :4, :4], y[:8]))
    with pytest.raises(MetricError, match=r"nn.Linear layers only.*0.weight.*fisher"):
        cd.evidence(p, ALPHA, "kflr")


def test_the_dense_route_is_refused_past_its_memory_naming_the_structured_kinds() -> None:
    X, y = zoo.digits(split="train", dtype="float64")
    p = cd.Problem(_mlp(64, 140), "cross_entropy", (X[:200], y[:200]))  # 10,510 parameters
    with pytest.raises(MemoryBudgetError, match=r"dense route.*kflr or diag_ggn"):
        cd.evidence(p, ALPHA, "fisher")


@pytest.mark.slow
def test_evidence_at_ten_thousand_parameters_is_invariant_in_under_4_gb() -> None:
    """8×8 digits, 200 samples, 64-140-10 MLP (10,510 parameters): the dense route would need terabytes; the
    structured one (KFLR, SLQ) runs in a few hundred MB and gives the same log Z in θ and ψ."""
    X, y = zoo.digits(split="train", dtype="float64")
    p = cd.Problem(_mlp(64, 140), "cross_entropy", (X[:200], y[:200]), batch_size=100)
    start = rss_mb()
    reset_peak()
    r = cd.evidence(p, ALPHA, "kflr", logdet_method="slq", probes=20, steps=30, seed=0)
    rq = cd.evidence(cd.reparametrize(p, scale({"0.weight": 3.0, "2.bias": 0.5, "2.weight": 0.2})), ALPHA, "kflr",
                     logdet_method="slq", probes=20, steps=30, seed=0)
    peak = peak_rss_mb() - start
    print(f"10,510 parameters: log Z θ {r.value:.10g} ± {r.stderr:.2g}, ψ {rq.value:.10g}; {r.seconds:.0f} s, "
          f"{rq.seconds:.0f} s; peak above start {peak:.0f} MB")
    assert r.converged and rq.converged
    assert rq.value == pytest.approx(r.value, rel=1e-6)
    assert peak < 4 * 1024
