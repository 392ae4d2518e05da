"""BackPACK metrics (diag GGN, MC Fisher diagonal, empirical Fisher diagonal, KFAC/KFLR) and the Adam metric.

Ground truth is independent of the code under test and of BackPACK: dense float64 matrices from plain
``torch.autograd`` (tests/dense.py), explicit layer inputs from forward hooks on a separate model instance,
``torch.nn.functional.unfold`` for convolution patches, and Adam's state read by hand.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curvdist as cd
from curvdist import zoo
from curvdist.errors import MetricError, SingularMetricError
from curvdist.geometry.metrics.adam import adam
from curvdist.geometry.metrics.backpack_metrics import (
    activation_derivatives,
    diag_fisher_mc,
    diag_ggn,
    empirical_fisher_diag,
)
from curvdist.geometry.metrics.kfac import KFACMetric, kfac
from tests import dense
from tests.cases import CASES, make_problem

DIAG_CASES = ["mlp", "mlp_mse", "cnn"]
RTOL, ATOL = 1e-9, 1e-12


# ---------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _dense_sum(case_name: str, kind: str) -> Tensor:
    """Dense sum-reduction GGN / empirical Fisher of a shared case (all parameters); mean = sum / N."""
    case = CASES[case_name]()
    fn = dense.dense_ggn if kind == "ggn" else dense.dense_empirical_fisher
    return fn(case.model(), case.loss, case.X, case.y, "sum")


def _dense(case_name: str, kind: str, reduction: str) -> Tensor:
    M = _dense_sum(case_name, kind)
    return M / len(CASES[case_name]().X) if reduction == "mean" else M


def _index(model: nn.Module, names) -> Tensor:
    """Positions of the named parameters (in the given order) in the all-parameter flat vector."""
    offsets, off = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = torch.arange(off, off + p.numel())
        off += p.numel()
    return torch.cat([offsets[n] for n in names])


def _block(M: Tensor, problem: cd.Problem, name: str) -> Tensor:
    """The diagonal block of a problem-ordered matrix M for one selected parameter."""
    off = 0
    for n, s in zip(problem.param_names, problem.shapes):
        if n == name:
            return M[off : off + s.numel(), off : off + s.numel()]
        off += s.numel()
    raise KeyError(name)


def _undamped_dense(metric, damping: float) -> Tensor:
    return metric.to_dense() - damping * torch.eye(metric.dim, dtype=metric.dtype)


def _layer_inputs(model: nn.Module, X: Tensor) -> dict[str, Tensor]:
    """Inputs of every leaf module, recorded with forward hooks (on a model the code under test never sees)."""
    seen: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
               for n, m in model.named_modules() if not list(m.children())]
    with torch.no_grad():
        model(X)
    for h in handles:
        h.remove()
    return seen


# ---------------------------------------------------------------------------------------------- diagonals
@pytest.mark.parametrize("case_name", DIAG_CASES)
def test_diag_ggn_and_empirical_fisher_match_dense(case_name, reduction):
    case = CASES[case_name]()
    problem = make_problem(case, reduction)
    assert problem.num_batches > 1  # the accumulation over batches is exercised
    G = _dense(case_name, "ggn", reduction)
    E = _dense(case_name, "ef", reduction)
    d = diag_ggn(problem, damping=1e-3)
    assert d.kind == "diag_ggn"
    torch.testing.assert_close(d.diagonal, G.diagonal(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(d.to_dense(), torch.diag(G.diagonal() + 1e-3), rtol=RTOL, atol=ATOL)
    e = empirical_fisher_diag(problem, damping=1e-3)
    assert e.kind == "empirical_fisher_diag"
    torch.testing.assert_close(e.diagonal, E.diagonal(), rtol=RTOL, atol=ATOL)


def test_diagonals_on_parameter_subset_follow_param_names_order(reduction):
    case = CASES["cnn"]()
    model = case.model()
    names = ["6.bias", "0.weight", "3.bias"]  # deliberately not in model order
    problem = cd.Problem(model, case.loss, (case.X, case.y), params=names, batch_size=2, reduction=reduction)
    idx = _index(model, names)
    G, E = _dense("cnn", "ggn", reduction), _dense("cnn", "ef", reduction)
    torch.testing.assert_close(diag_ggn(problem, 1e-3).diagonal, G.diagonal()[idx], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(empirical_fisher_diag(problem, 1e-3).diagonal, E.diagonal()[idx], rtol=RTOL,
                               atol=ATOL)


def test_empirical_fisher_diag_on_transformer_linear_layers():
    """First-order BackPACK works on Linear layers anywhere (3-d inputs too) when only they are selected."""
    case = CASES["transformer"]()
    model = case.model()
    names = ["embed.weight", "mlp.0.weight", "mlp.2.bias", "head.weight", "head.bias"]
    problem = cd.Problem(model, case.loss, (case.X, case.y), params=names, batch_size=3)
    E = dense.dense_empirical_fisher(model, case.loss, case.X, case.y, "mean")
    d = empirical_fisher_diag(problem, damping=1e-6).diagonal
    torch.testing.assert_close(d, E.diagonal()[_index(model, names)], rtol=RTOL, atol=ATOL)


def _act_models() -> dict[str, nn.Module]:
    torch.manual_seed(5)
    acts = {"softplus_b2_t1": nn.Softplus(beta=2.0, threshold=1.0), "gelu": nn.GELU(),
            "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "elu": nn.ELU()}
    return {k: nn.Sequential(nn.Linear(8, 6), a, nn.Linear(6, 5), copy.deepcopy(a), nn.Linear(5, 4)).double().eval()
            for k, a in acts.items()}


@pytest.mark.parametrize("act", ["softplus_b2_t1", "gelu", "gelu_tanh", "silu", "elu"])
def test_activation_rules_added_for_backpack(act):
    """Softplus/GELU/SiLU have no BackPACK GGN rule and ELU no Kronecker rule; the added rules are exact."""
    case = CASES["mlp"]()
    model = _act_models()[act]
    X = 2.0 * case.X  # reach both branches of softplus (threshold 1 at beta 2)
    problem = cd.Problem(model, case.loss, (X, case.y), batch_size=5)
    G = dense.dense_ggn(model, case.loss, X, case.y, "mean")
    torch.testing.assert_close(diag_ggn(problem, 1e-3).diagonal, G.diagonal(), rtol=RTOL, atol=ATOL)
    # KFLR bias blocks are exact GGN blocks (cross terms aside)
    K = _undamped_dense(kfac(problem, damping=1e-3, exact=True), 1e-3)
    for name in ("0.bias", "2.bias", "4.bias"):
        i = _index(model, [name])
        torch.testing.assert_close(_block(K, problem, name), G[i][:, i], rtol=RTOL, atol=ATOL)
    # the second derivatives (unused by the GGN, offered to BackPACK) against autograd
    a = model[1]
    x = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
    d1 = torch.autograd.grad(a(x).sum(), x, create_graph=True)[0]
    d2 = torch.autograd.grad(d1.sum(), x)[0]
    if isinstance(a, (nn.Softplus, nn.GELU, nn.SiLU)):
        r1, r2 = activation_derivatives(a, x.detach())
        torch.testing.assert_close(r1, d1.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r2, d2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- MC Fisher
def test_diag_fisher_mc_seeded_and_converges(reduction):
    case = CASES["mlp"]()
    problem = make_problem(case, reduction)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = diag_fisher_mc(problem, damping=1e-3, seed=7).diagonal
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    b = diag_fisher_mc(problem, damping=1e-3, seed=7).diagonal
    c = diag_fisher_mc(problem, damping=1e-3, seed=8).diagonal
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    if reduction == "sum":
        return  # the scale is checked by the exact diagonals; convergence once is enough
    g = _dense("mlp", "ggn", reduction).diagonal()

    def err(x: Tensor) -> float:
        return float((x - g).norm() / g.norm())

    one = [err(diag_fisher_mc(problem, 1e-3, mc_samples=1, seed=s).diagonal) for s in range(3)]
    many = [err(diag_fisher_mc(problem, 1e-3, mc_samples=2000, seed=s).diagonal) for s in range(3)]
    # measured: one-sample errors 0.2-0.6, 2000-sample errors 0.003-0.01 (≈ 1/√2000 of them)
    assert max(many) < 0.04
    assert sum(many) < sum(one) / 10


def test_diag_fisher_mc_mse_converges():
    case = CASES["mlp_mse"]()
    problem = make_problem(case, "sum")
    g = _dense("mlp_mse", "ggn", "sum").diagonal()
    d = diag_fisher_mc(problem, mc_samples=4000, seed=1, damping=1e-6).diagonal
    assert float((d - g).norm() / g.norm()) < 0.04  # measured ≈ 0.01 at 2000 samples


# ---------------------------------------------------------------------------------------------- KFLR / KFAC
def test_kflr_linear_blocks_equal_explicit_kronecker_products(reduction):
    """G = s · Σ_n B_n B_nᵀ with B_n = (∂f_n/∂z_n)ᵀ S_n, Λ_n = S_n S_nᵀ, and A = (1/N) Σ_n a_n a_nᵀ.

    Why: the GGN weight block is s Σ_n (B_nB_nᵀ) ⊗ (a_n a_nᵀ) = s N E[BBᵀ ⊗ aaᵀ]; KFAC replaces the expectation of
    the product by the product of expectations, s N E[BBᵀ] ⊗ E[aaᵀ] = (s Σ BBᵀ) ⊗ ((1/N) Σ aaᵀ). The bias block
    is s Σ_n B_nB_nᵀ = G itself, the exact GGN bias block.
    """
    case = CASES["mlp"]()
    model = case.model()
    problem = make_problem(case, reduction)
    N, s = len(case.X), problem.scale
    delta = 1e-3
    K = _undamped_dense(kfac(problem, damping=delta, exact=True), delta)
    inputs = _layer_inputs(case.model(), case.X)
    f = model(case.X).detach()
    Lam = dense.output_hessians(case.loss, f, case.y)  # (N, C, C)
    lam, U = torch.linalg.eigh(Lam)
    S = U * lam.clamp_min(0).sqrt()[:, None, :]  # Λ_n = S_n S_nᵀ
    torch.testing.assert_close(S @ S.transpose(1, 2), Lam, rtol=1e-10, atol=1e-12)
    G_dense = _dense("mlp", "ggn", reduction)
    for i in (0, 2):  # the Linear layers of Sequential(Linear, Tanh, Linear)
        a = inputs[str(i)]
        z = model[i](a).detach()
        rest = model[i + 1 :]
        Jz = torch.stack([dense.autograd_jacobian(lambda zz: rest(zz[None])[0], z[n]) for n in range(N)])  # (N,C,out)
        B = Jz.transpose(1, 2) @ S  # (N, out, C)
        G = s * torch.einsum("noc,npc->op", B, B)
        A = torch.einsum("ni,nj->ij", a, a) / N
        torch.testing.assert_close(_block(K, problem, f"{i}.weight"), torch.kron(G, A), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(_block(K, problem, f"{i}.bias"), G, rtol=RTOL, atol=ATOL)
        ib = _index(model, [f"{i}.bias"])
        torch.testing.assert_close(G, G_dense[ib][:, ib], rtol=RTOL, atol=ATOL)


def test_kflr_does_not_depend_on_batching_or_selection():
    case = CASES["mlp"]()
    model = case.model()
    full = kfac(cd.Problem(model, case.loss, (case.X, case.y), batch_size=13), damping=1e-3, exact=True)
    split = kfac(cd.Problem(model, case.loss, (case.X, case.y), batch_size=2), damping=1e-3, exact=True)
    torch.testing.assert_close(full.to_dense(), split.to_dense(), rtol=RTOL, atol=ATOL)
    # weight of one layer and bias of the other, alone: the same blocks
    sub = cd.Problem(model, case.loss, (case.X, case.y), params=["2.weight", "0.bias"], batch_size=4)
    K = kfac(sub, damping=1e-3, exact=True).to_dense()
    Kf = full.to_dense()
    probe = cd.Problem(model, case.loss, (case.X, case.y), batch_size=13)
    for name in sub.param_names:
        torch.testing.assert_close(_block(K, sub, name), _block(Kf, probe, name), rtol=RTOL, atol=ATOL)


def test_kflr_single_sample_single_layer_is_the_exact_ggn():
    case = CASES["mlp"]()
    torch.manual_seed(3)
    lin = nn.Linear(8, 4).double()
    X, y = case.X[:1], case.y[:1]
    for loss, target in (("cross_entropy", y), ("mse", torch.randn(1, 4, dtype=torch.float64))):
        problem = cd.Problem(lin, loss, (X, target))
        G = dense.dense_ggn(lin, loss, X, target, "mean")
        K = _undamped_dense(kfac(problem, damping=1e-2, exact=True), 1e-2)
        torch.testing.assert_close(K, torch.block_diag(G[:32, :32], G[32:, 32:]), rtol=RTOL, atol=ATOL)


def test_kflr_conv_single_location_single_sample_is_the_exact_ggn():
    """A 3×3 convolution on a 3×3 patch has one output location (|T| = 1): its block is exact for one sample."""
    case = CASES["cnn"]()
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)).double().eval()
    X, y = case.X[:1, :, 2:5, 2:5].contiguous(), case.y[:1] % 4
    problem = cd.Problem(model, "cross_entropy", (X, y), reduction="sum")
    G = dense.dense_ggn(model, "cross_entropy", X, y, "sum")
    K = _undamped_dense(kfac(problem, damping=1e-2, exact=True), 1e-2)
    for name in ("0.weight", "0.bias"):
        i = _index(model, [name])
        torch.testing.assert_close(_block(K, problem, name), G[i][:, i], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kflr_conv_blocks_follow_expand_and_reduce(reduction, approx):
    """Conv2d weight block = G ⊗ A over unfolded patches u_{n,t} and B_{n,t} = (∂f_n/∂z_{n,t})ᵀ S_n (Λ_n = S_n S_nᵀ),
    computed here from dense Jacobians w.r.t. the convolution output (Eschenhagen et al. 2023):

        expand   G = s Σ_n Σ_t B_{n,t} B_{n,t}ᵀ,          A = 1/(N·T) Σ_n Σ_t u_{n,t} u_{n,t}ᵀ
        reduce   G = s Σ_n (Σ_t B_{n,t})(Σ_t B_{n,t})ᵀ,    A = (1/N) Σ_n ū_n ū_nᵀ,  ū_n = (1/T) Σ_t u_{n,t}

    (reduce's G is the GGN bias block); the bias block is the exact GGN bias block for both."""
    case = CASES["cnn"]()
    model = case.model()
    problem = make_problem(case, reduction)
    N, s = len(case.X), problem.scale
    K = _undamped_dense(kfac(problem, damping=1e-3, exact=True, kfac_approx=approx), 1e-3)
    Gd = _dense("cnn", "ggn", reduction)
    inputs = _layer_inputs(case.model(), case.X)
    f = model(case.X).detach()
    lam, V = torch.linalg.eigh(dense.output_hessians(case.loss, f, case.y))
    S = V * lam.clamp_min(0).sqrt()[:, None, :]  # (N, C, C): Λ_n = S_n S_nᵀ
    for i in ("0", "3"):
        conv = model[int(i)]
        z = conv(inputs[i]).detach()
        rest = model[int(i) + 1:]
        J = torch.stack([dense.autograd_jacobian(lambda zz, rest=rest: rest(zz[None])[0], z[n]) for n in range(N)])
        B = torch.einsum("ncz,nck->nzk", J.reshape(N, J.shape[1], -1), S).reshape(N, z.shape[1], -1, S.shape[-1])
        U = F.unfold(inputs[i], conv.kernel_size, padding=conv.padding)  # (N, C_in·kh·kw, T)
        T = U.shape[-1]
        if approx == "expand":
            G = s * torch.einsum("notk,nptk->op", B, B)
            A = torch.einsum("nit,njt->ij", U, U) / (N * T)
        else:
            Bs, Um = B.sum(2), U.mean(2)
            G = s * torch.einsum("nok,npk->op", Bs, Bs)
            A = Um.T @ Um / N
        ib = _index(model, [f"{i}.bias"])
        torch.testing.assert_close(_block(K, problem, f"{i}.bias"), Gd[ib][:, ib], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(_block(K, problem, f"{i}.weight"), torch.kron(G, A), rtol=RTOL, atol=ATOL)


def test_kfac_mc_is_seeded_and_approaches_kflr():
    case = CASES["mlp"]()
    problem = make_problem(case)
    a = kfac(problem, damping=1e-3, seed=3).to_dense()
    b = kfac(problem, damping=1e-3, seed=3).to_dense()
    c = kfac(problem, damping=1e-3, seed=4).to_dense()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    exact = kfac(problem, damping=1e-3, exact=True)
    assert exact.kind == "kflr" and kfac(problem, damping=1e-3).kind == "kfac"
    ref = _undamped_dense(exact, 1e-3)
    many = _undamped_dense(kfac(problem, damping=1e-3, mc_samples=2000, seed=0), 1e-3)
    assert float((many - ref).norm() / ref.norm()) < 0.05  # measured ≈ 0.01


@pytest.mark.parametrize("exact", [False, True])
def test_kfac_metric_operations_are_consistent(exact):
    case = CASES["cnn"]()
    problem = make_problem(case)
    delta = 0.05
    M = kfac(problem, damping=delta, exact=exact)
    assert M.has_factor and M.has_inv_sqrt
    D = M.to_dense()
    torch.testing.assert_close(D, D.T, rtol=0, atol=0)
    torch.linalg.cholesky(D - 0.5 * delta * torch.eye(problem.dim, dtype=torch.float64))  # λ_min(D) ≥ δ/2 > 0
    g = torch.Generator().manual_seed(0)
    v = torch.randn(problem.dim, dtype=torch.float64, generator=g)
    torch.testing.assert_close(M.apply(v), D @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M.apply_undamped(v), D @ v - delta * v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M.solve(M.apply(v)), v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M.solve(v), torch.linalg.solve(D, v), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(M.inv_sqrt_apply(M.inv_sqrt_apply(v)), M.solve(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M.inv_factor_apply(M.inv_factor_t_apply(v)), M.solve(v), rtol=1e-10, atol=1e-12)
    sign, logabs = torch.linalg.slogdet(D)
    assert float(sign) == 1.0
    assert math.isclose(M.logdet(), float(logabs), rel_tol=1e-10)


def test_kfac_metric_from_explicit_factors_and_clipping():
    G = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64) + 1e-18 * torch.eye(2, dtype=torch.float64)
    with pytest.raises(SingularMetricError, match="add damping"):
        KFACMetric(["w"], [torch.Size([2, 2])], {"w": (G, A)})
    M = KFACMetric(["w", "b"], [torch.Size([2, 2]), torch.Size([2])], {"w": (G, A), "b": (G,)}, damping=0.5)
    A0 = torch.ones(2, 2, dtype=torch.float64)
    expected = torch.block_diag(torch.kron(G, A0), G) + 0.5 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(M.to_dense(), expected, rtol=1e-12, atol=1e-14)
    V = torch.arange(4.0, dtype=torch.float64).reshape(2, 2)
    v = torch.cat([V.reshape(-1), torch.ones(2, dtype=torch.float64)])
    torch.testing.assert_close(M.apply(v)[:4], (G @ V @ A0.T).reshape(-1) + 0.5 * V.reshape(-1))


def test_kflr_singular_without_damping():
    """The last layer's G is Σ_n Λ_n, whose null vector 1 (softmax is shift invariant) makes KFLR singular."""
    problem = make_problem(CASES["mlp"]())
    with pytest.raises(SingularMetricError, match=r"2\.(weight|bias).*add damping"):
        kfac(problem, exact=True)
    kfac(problem, exact=True, damping=1e-8)


# ---------------------------------------------------------------------------------------------- Adam
@pytest.mark.parametrize("opt_cls, kwargs", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.1}),
                                             (torch.optim.Adam, {"amsgrad": True})])
def test_adam_metric_from_optimizer_state(opt_cls, kwargs):
    case = CASES["mlp"]()
    model = case.model()
    opt = opt_cls(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6, **kwargs)
    for t in range(3):
        opt.zero_grad()
        F.cross_entropy(model(case.X[t:t + 6]), case.y[t:t + 6]).backward()
        opt.step()
    names = ["2.weight", "0.bias"]
    problem = cd.Problem(model, case.loss, (case.X, case.y), params=names)
    M = adam(problem, opt, damping=0.25)
    assert M.kind == "adam" and M.diagonal_only
    params = dict(model.named_parameters())
    key = "max_exp_avg_sq" if kwargs.get("amsgrad") else "exp_avg_sq"
    by_hand = []
    for n in names:
        st = opt.state[params[n]]
        assert float(st["step"]) == 3
        by_hand.append((st[key] / (1 - 0.95**3)).sqrt().reshape(-1) + 1e-6)
    d = torch.cat(by_hand)
    torch.testing.assert_close(M.to_dense(), torch.diag(d + 0.25), rtol=1e-12, atol=0)
    torch.testing.assert_close(adam(problem, opt, eps=0.5).diagonal, d - 1e-6 + 0.5, rtol=1e-12, atol=0)


def test_adam_metric_errors():
    case = CASES["mlp"]()
    model = case.model()
    problem = cd.Problem(model, case.loss, (case.X, case.y))
    with pytest.raises(MetricError, match=r"no Adam state.*take at least one optimizer step"):
        adam(problem, torch.optim.Adam(model.parameters()))
    with pytest.raises(MetricError, match="Adam or AdamW.*SGD"):
        adam(problem, torch.optim.SGD(model.parameters(), lr=0.1))
    other = case.model()  # equal values, different tensors
    opt = torch.optim.Adam(other.parameters())
    F.cross_entropy(other(case.X), case.y).backward()
    opt.step()
    with pytest.raises(MetricError, match=r"does not hold the selected parameters \['0.weight'"):
        adam(problem, opt)
    partial = torch.optim.Adam([dict(model.named_parameters())["0.weight"]])
    with pytest.raises(MetricError, match=r"does not hold the selected parameters \['0.bias', '2.weight'"):
        adam(problem, partial)


# ---------------------------------------------------------------------------------------------- bad input
def test_backpack_kfac_on_transformer_names_the_layers():
    case = CASES["transformer"]()
    problem = make_problem(case)
    with pytest.raises(MetricError) as err:
        kfac(problem, damping=1e-3, backend="backpack")
    msg = str(err.value)
    for part in ("'ln1' (LayerNorm)", "'attn' (MultiheadAttention)", "'attn.out_proj'", "ln1.weight",
                 "TransformerBlockClassifier", "'ggn' or 'fisher'"):
        assert part in msg, (part, msg)
    # only Linear layers selected: BackPACK still cannot backpropagate through the block
    sub = cd.Problem(case.model(), case.loss, (case.X, case.y), params=["head.weight"])
    with pytest.raises(MetricError, match="BackPACK cannot compute the kfac metric.*TransformerBlockClassifier"):
        kfac(sub, damping=1e-3, backend="backpack")


def test_backpack_diag_ggn_on_transformer_names_uncovered_parameters():
    problem = make_problem(CASES["transformer"]())
    with pytest.raises(MetricError) as err:
        diag_ggn(problem, damping=1e-3, backend="backpack")
    msg = str(err.value)
    for part in ("cannot cover all selected parameters", "'pos'", "'ln1.weight'", "'ln2.bias'",
                 "'attn.in_proj_weight'", "'attn.out_proj.weight'", "not supported by BackPACK"):
        assert part in msg, (part, msg)
    assert "'head.weight'" not in msg
    with pytest.raises(MetricError, match="empirical_fisher_diag metric cannot cover"):
        empirical_fisher_diag(problem, backend="backpack")


def test_singular_diagonal_needs_damping():
    """Digits have pixels that are 0 in every image: the weights they feed have zero curvature."""
    X, y = zoo.digits(n=40, dtype="float64")
    model = zoo.mlp(64, (5,), 10, dtype="float64").eval()
    problem = cd.Problem(model, "cross_entropy", (X, y), batch_size=16)
    dead = (X == 0).all(dim=0)
    assert bool(dead.any())
    for build in (diag_ggn, empirical_fisher_diag):
        with pytest.raises(SingularMetricError, match=r"parameter 0\.weight.*add damping"):
            build(problem)
        M = build(problem, damping=1e-6)
        d = M.diagonal[: 5 * 64].reshape(5, 64)
        assert bool((d[:, dead] == 0).all()) and bool((d[:, ~dead] > 0).all())
    with pytest.raises(SingularMetricError, match="add damping"):
        kfac(problem, exact=True)


def _dense_sum_of(model: nn.Module, case) -> Tensor:
    return dense.dense_ggn(model, case.loss, case.X, case.y, "sum")


def test_refusals_of_silently_wrong_backpack_cases():
    case = CASES["cnn"]()
    torch.manual_seed(0)
    circ = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(),
                         nn.Linear(128, 10)).double()
    problem = cd.Problem(circ, "cross_entropy", (case.X, case.y))
    for build in (diag_ggn, empirical_fisher_diag, kfac):
        with pytest.raises(MetricError, match="padding_mode='circular'"):
            build(problem, damping=1e-3, backend="backpack")
    # backend="auto" takes curvdist's own kernels, which pad as the convolution does
    torch.testing.assert_close(diag_ggn(problem, damping=1e-3).diagonal,
                               _dense_sum_of(circ, case).diagonal() / len(case.X), rtol=1e-9, atol=1e-12)
    lin = nn.Linear(4, 4).double()
    shared = nn.Sequential(lin, nn.Tanh(), lin).double()
    Xs = torch.randn(6, 4, dtype=torch.float64)
    problem = cd.Problem(shared, "cross_entropy", (Xs, torch.arange(6) % 4))
    with pytest.raises(MetricError, match="called more than once"):
        diag_ggn(problem, damping=1e-3)
    with pytest.raises(MetricError, match="mc_samples must be a positive int"):
        diag_fisher_mc(make_problem(CASES["mlp"]()), mc_samples=0)


def test_users_model_is_left_untouched():
    from backpack.context import CTX

    case = CASES["cnn"]()
    model = case.model()
    problem = make_problem(case, model=model)
    grad_before = problem.gradient()
    n_handles = len(CTX.hook_handles)
    diag_ggn(problem, damping=1e-3)
    diag_fisher_mc(problem, damping=1e-3)
    empirical_fisher_diag(problem, damping=1e-3)
    kfac(problem, damping=1e-3)
    assert len(CTX.hook_handles) == n_handles
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
        assert not any(hasattr(m, a) for a in ("input0", "output", "_backpack_extend"))
    for p in model.parameters():
        assert p.requires_grad and p.grad is None
        assert not any(hasattr(p, a) for a in ("diag_ggn_exact", "diag_ggn_mc", "sum_grad_squared", "kfac"))
    for a, b in zip(problem.gradient(), grad_before):  # torch.func still works on the model
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_factory_builds_these_metrics():
    from curvdist.geometry.metrics import metric

    case = CASES["mlp"]()
    model = case.model()
    problem = make_problem(case, model=model)
    v = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for kind, direct in (("diag_ggn", diag_ggn(problem, 0.1)), ("empirical_fisher_diag",
                                                                  empirical_fisher_diag(problem, 0.1)),
                         ("diag_fisher_mc", diag_fisher_mc(problem, 0.1, seed=2)),
                         ("kflr", kfac(problem, 0.1, exact=True)), ("kfac", kfac(problem, 0.1, seed=2))):
        built = metric(problem, kind, damping=0.1, **({"seed": 2} if kind in ("diag_fisher_mc", "kfac") else {}))
        assert built.kind == kind
        torch.testing.assert_close(built.apply(v), direct.apply(v), rtol=1e-12, atol=0)
    opt = torch.optim.Adam(model.parameters())
    F.cross_entropy(model(case.X), case.y).backward()
    opt.step()
    assert metric(problem, "adam", damping=0.1, optimizer=opt).kind == "adam"
