"""KFAC-expand and KFAC-reduce (Eschenhagen et al. 2023) for weights shared over positions: against curvlinops'
``KFACLinearOperator`` (a timm ViT, a CNN, a causal attention language model), against dense GGN blocks where each
approximation is exact, against independent formulas for a module called twice; the ``kfac_approx`` option through
``cd.metric``, config specs and sharded statistics; every loss and HF-style outputs through the own kernels."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import curvdist as cd
from curvdist import zoo
from curvdist.errors import MetricError, UnknownNameError
from curvdist.geometry.blocks.kronecker import kfac_sums_probes
from curvdist.geometry.metrics.backpack_metrics import diag_ggn
from curvdist.geometry.metrics.kfac import KFACMetric, kfac, normalized_factors
from curvdist.problem.losses import CrossEntropy, Loss
from tests import dense
from tests.cases import CASES, make_problem, two_shard_problem

curvlinops = pytest.importorskip("curvlinops")
APPROX = ["expand", "reduce"]


# ---------------------------------------------------------------------------------------------- helpers
def _ours(problem: cd.Problem, kind: str, approx: str) -> KFACMetric:
    """The undamped Kronecker metric of statistic ``kind`` (ggn | fisher_mc | empirical), own kernels."""
    G, A = kfac_sums_probes(problem, kfac_approx=approx, kind=kind)
    factors = normalized_factors(problem.param_names, G, A, problem.scale, problem.num_samples)
    return KFACMetric(problem.param_names, problem.shapes, factors, damping=1.0)


def _products(M: KFACMetric, V: Tensor) -> Tensor:
    return torch.stack([M.apply_undamped(v) for v in V.T], 1)


def _compare_with_curvlinops(problem: cd.Problem, model_func: nn.Module, batches: list, fisher: str, approx: str,
                             rtol: float = 1e-9, **kw: object) -> None:
    """KFAC products on random vectors, per parameter, of curvlinops and of the own kernels."""
    named = dict(problem.model.named_parameters())
    params = [named[n] for n in problem.param_names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = curvlinops.KFACLinearOperator(model_func, nn.CrossEntropyLoss(reduction="mean"), params, batches,
                                           fisher_type=fisher, kfac_approx=approx, check_deterministic=False, **kw)
    V = torch.randn(problem.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = op @ V
    ours = _products(_ours(problem, {"type-2": "ggn", "empirical": "empirical"}[fisher], approx), V)
    i = 0
    for name, shape in zip(problem.param_names, problem.shapes):
        k = shape.numel()
        torch.testing.assert_close(ours[i:i + k], theirs[i:i + k], rtol=rtol, atol=1e-12 * float(theirs.abs().max()),
                                   msg=f"{fisher} {approx} {name}")
        i += k


_dense_blocks = dense.dense_blocks


def _blocks(M: KFACMetric) -> dict[str, Tensor]:
    return {b.name: b.dense(0.0) for b in M.blocks}


# ---------------------------------------------------------------------------------------------- vs curvlinops
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("approx", APPROX)
def test_timm_vit_weights_match_curvlinops(fisher: str, approx: str) -> None:
    """The weights applied to every token of a ViT — patch embedding (Conv2d), qkv, proj, fc1, fc2 — and the head,
    in both approximations (before, KFLR's qkv block had trace 10.2 against the GGN's 0.655)."""
    from curvdist.integrations.hf import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=8,
                              depth=1, num_heads=2, num_classes=3).double().eval()
    X, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    names = [f"{p}.weight" for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    problem = cd.Problem(model, "cross_entropy", (X, y), batch_size=3, params=names)
    _compare_with_curvlinops(problem, model, [(X[:3], y[:3]), (X[3:], y[3:])], fisher, approx)


@pytest.mark.parametrize("approx", APPROX)
def test_cnn_matches_curvlinops(approx: str) -> None:
    """Conv2d weights and biases (curvlinops' reduce is the exact bias block, like curvdist's in both)."""
    problem = make_problem(CASES["cnn"]())
    batches = [(X, y) for X, y in problem.batches()]
    if approx == "expand":
        problem = problem.restricted([n for n in problem.param_names if n.endswith("weight")])
    _compare_with_curvlinops(problem, problem.model, batches, "type-2", approx)


class _TinyLM(nn.Module):
    """Token + position embeddings → causal single-head attention (q, k, v, o as Linear layers) → Linear head;
    ``mix=False`` lets every position attend to itself only (no position influences another)."""

    def __init__(self, vocab: int = 6, d: int = 4, T: int = 5, mix: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.5 * torch.randn(T, d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, vocab)
        self.mix = mix

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        T = h.shape[1]
        scores = self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(h.shape[-1])
        allowed = torch.ones(T, T, dtype=torch.bool).tril() if self.mix else torch.eye(T, dtype=torch.bool)
        h = h + self.o(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ self.v(torch.tanh(h)))
        return self.head(torch.tanh(h))


class _Shifted(nn.Module):
    """curvlinops' view of a causal LM: logits (B, V, T−1) of the positions that have a next token."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, X: dict[str, Tensor]) -> Tensor:
        return self.lm(**X)[:, :-1].transpose(1, 2)


def _lm_problem(mix: bool) -> tuple[cd.Problem, list]:
    data = zoo.markov_corpus(n=5, vocab_size=6, max_length=5, min_length=5, seed=2)
    model = _TinyLM(mix=mix).double()
    names = ["q.weight", "k.weight", "v.weight", "o.weight", "head.weight"]
    problem = cd.Problem(model, "causal_lm", data, batch_size=3, params=names)
    batches = [({k: v for k, v in X.items()}, y[:, 1:]) for X, y in problem.batches()]
    return problem, batches


@pytest.mark.parametrize("approx", APPROX)
def test_causal_lm_with_attention_matches_curvlinops_empirical(approx: str) -> None:
    """Every loss term is a token: the projections of a causal attention layer and the head, with the observed
    labels' gradients backpropagated for all positions at once (curvlinops' empirical type)."""
    problem, batches = _lm_problem(mix=True)
    _compare_with_curvlinops(problem, _Shifted(problem.model), batches, "empirical", approx,
                             batch_size_fn=lambda X: X["input_ids"].shape[0])


def test_causal_lm_without_position_mixing_matches_curvlinops_type2() -> None:
    """KFLR-expand equals curvlinops' type-2 where no position influences another's loss terms (the two differ
    only by the cross-token terms curvlinops adds when a layer's output at one position reaches several tokens)."""
    problem, batches = _lm_problem(mix=False)
    _compare_with_curvlinops(problem, _Shifted(problem.model), batches, "type-2", "expand",
                             batch_size_fn=lambda X: X["input_ids"].shape[0])


# ---------------------------------------------------------------------------------------------- vs the dense GGN
class _PerPosition(nn.Module):
    """tokens → embedding → Linear ``lin`` → + per-position bias P (T, d) → tanh → ``mixing`` over positions →
    head. P's GGN block has the per-position output-side blocks of ``lin`` on its diagonal."""

    def __init__(self, vocab: int = 5, d: int = 3, T: int = 4, mixing: bool = True) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.emb, self.lin, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.P = nn.Parameter(0.3 * torch.randn(T, d))
        self.register_buffer("mixing", torch.randn(T, T, dtype=torch.float64) if mixing else torch.eye(T))

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.lin(self.emb(idx)) + self.P)  # (B, T, d)
        return self.head(torch.einsum("st,btd->bsd", self.mixing, h)).sum(1)


def test_output_factors_are_the_positionwise_blocks_of_the_ggn() -> None:
    """s·G_expand = Σ_t (P's GGN block)[t, t] and s·G_reduce = Σ_{t,t'} (P's GGN block)[t, t'] = the bias block:
    the output-side sums of both approximations, from the dense GGN."""
    model = _PerPosition().double()
    X = torch.randint(0, 5, (6, 4), generator=torch.Generator().manual_seed(0))
    problem = cd.Problem(model, "cross_entropy", (X, torch.arange(6) % 3), batch_size=4)
    dense = _dense_blocks(problem)
    P = dense["P"].reshape(4, 3, 4, 3)
    for approx, expected in (("expand", torch.einsum("itjt->ij", P.permute(1, 0, 3, 2))),
                             ("reduce", P.sum((0, 2)))):
        G, _ = kfac_sums_probes(problem, exact=True, kfac_approx=approx)
        torch.testing.assert_close(G["lin.weight"][0] * problem.scale, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dense["lin.bias"], P.sum((0, 2)), rtol=1e-9, atol=1e-12)


def test_each_approximation_is_exact_where_it_should_be() -> None:
    """expand: the same input at every position of every sample and no position influencing another's loss terms
    (per-token losses; reduce coincides with expand there); reduce: one sample whose inputs are the same at every
    position, the positions mixed — where expand is not exact."""
    tokens = torch.full((4, 4), 2)
    model = _PerPosition().double()
    with torch.no_grad():
        model.P.zero_()  # the head's input is then the same everywhere too

    class PerToken(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Tensor) -> Tensor:
            return self.m.head(torch.tanh(self.m.lin(self.m.emb(input_ids)) + self.m.P))

    problem = cd.Problem(PerToken(model), "token_cross_entropy", {"input_ids": tokens, "labels": torch.randint(
        0, 3, (4, 4), generator=torch.Generator().manual_seed(1))}, params=["m.lin.weight", "m.head.weight"])
    dense = _dense_blocks(problem)
    expand = _blocks(kfac(problem, 1e-3, exact=True, kfac_approx="expand"))
    reduce = _blocks(kfac(problem, 1e-3, exact=True, kfac_approx="reduce"))
    for name in problem.param_names:
        torch.testing.assert_close(expand[name], dense[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(reduce[name], dense[name], rtol=1e-9, atol=1e-12)
    mixed = _PerPosition().double()
    one = cd.Problem(mixed, "cross_entropy", (torch.full((1, 4), 3), torch.tensor([1])), params=["lin.weight"])
    dense = _dense_blocks(one)["lin.weight"]
    torch.testing.assert_close(_blocks(kfac(one, 1e-3, exact=True, kfac_approx="reduce"))["lin.weight"], dense,
                               rtol=1e-9, atol=1e-12)
    assert float((_blocks(kfac(one, 1e-3, exact=True))["lin.weight"] - dense).norm()) > 1e-3 * float(dense.norm())


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("approx", APPROX)
def test_a_module_called_twice_shares_its_weight_over_its_calls(approx: str) -> None:
    """The two calls are two positions of one weight: with B_c = (∂f/∂z_c)ᵀ S (from a functional re-implementation
    with perturbations at both outputs) and a_c the calls' inputs, expand is (s Σ_{n,c} B_c B_cᵀ) ⊗ (Σ_{n,c} a_c
    a_cᵀ / 2N), reduce (s Σ_n (B_1+B_2)(B_1+B_2)ᵀ) ⊗ (Σ_n ā ā ᵀ / N), ā = (a_1+a_2)/2."""
    model = _Shared().double()
    X, y = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), torch.arange(5) % 3
    problem = cd.Problem(model, "cross_entropy", (X, y), batch_size=2)
    W, b = model.lin.weight.detach(), model.lin.bias.detach()
    Bs, As = [], []
    for n in range(5):
        a1 = X[n]
        a2 = torch.tanh(W @ a1 + b)

        def f(e: Tensor, a1: Tensor = a1) -> Tensor:
            return W @ torch.tanh(W @ a1 + b + e[:3]) + b + e[3:]

        J = dense.autograd_jacobian(f, torch.zeros(6, dtype=torch.float64))  # (C, 6)
        lam, V = torch.linalg.eigh(dense.output_hessians("cross_entropy", f(torch.zeros(6))[None], y[n:n + 1])[0])
        S = V * lam.clamp_min(0).sqrt()
        Bs.append((J[:, :3].T @ S, J[:, 3:].T @ S))
        As.append((a1, a2))
    s = problem.scale
    if approx == "expand":
        G = s * sum(B @ B.T for pair in Bs for B in pair)
        A = sum(torch.outer(a, a) for pair in As for a in pair) / 10
    else:
        G = s * sum((B1 + B2) @ (B1 + B2).T for B1, B2 in Bs)
        A = sum(torch.outer((a1 + a2) / 2, (a1 + a2) / 2) for a1, a2 in As) / 5
    blocks = _blocks(kfac(problem, 1e-3, exact=True, kfac_approx=approx))
    torch.testing.assert_close(blocks["lin.weight"], torch.kron(G, A), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(blocks["lin.bias"], _dense_blocks(problem)["lin.bias"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- the option
def test_kfac_approx_through_metric_specs_and_sharded_statistics() -> None:
    from curvdist.queries.session import Coordinates
    from curvdist.queries.specs import MetricSpec

    case = CASES["token_transformer"]()
    problem = make_problem(case)
    expand = kfac(problem, 1e-3, exact=True)
    reduce = cd.metric(problem, "kflr", damping=1e-3, kfac_approx="reduce")
    assert not torch.allclose(expand.to_dense(), reduce.to_dense())
    torch.testing.assert_close(cd.metric(problem, "kflr", damping=1e-3).to_dense(), expand.to_dense(), rtol=0, atol=0)
    spec = MetricSpec(kind="kflr", damping=1e-3, options={"kfac_approx": "reduce"})
    torch.testing.assert_close(Coordinates("theta", problem, 0).metric(spec).to_dense(), reduce.to_dense(),
                               rtol=0, atol=0)
    with pytest.raises(UnknownNameError, match="kfac_approx 'mean'; choose one of: expand, reduce"):
        cd.metric(problem, "kfac", damping=1e-3, kfac_approx="mean")

    sharded = two_shard_problem(case, problem)
    for approx, local in (("expand", expand), ("reduce", reduce)):
        M = cd.metric(sharded, "kflr", damping=1e-3, kfac_approx=approx)
        torch.testing.assert_close(M.to_dense(), local.to_dense(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- losses and outputs
class _RenamedCE(CrossEntropy):
    name = "my_cross_entropy"


class _HalfSquares(Loss):
    """ℓ = ½‖f − y‖², Λ = I, y ~ N(f, I); no factorization of Λ given."""

    name = "half_squares"

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (output - target).pow(2).sum(1)

    def output_hessian_apply(self, output: Tensor, target: Tensor, v: Tensor) -> Tensor:
        return v

    def sample_targets(self, output: Tensor, generator: torch.Generator, samples: int,
                       target: Tensor | None = None) -> Tensor:
        noise = torch.randn((samples, *output.shape), generator=generator, dtype=torch.float64)
        return output.detach().unsqueeze(0) + noise.to(output)

    def check(self, output: Tensor, target: Tensor) -> None:
        pass


def test_user_losses_route_to_the_own_kernels() -> None:
    case = CASES["mlp"]()
    ce = make_problem(case)
    mine = cd.Problem(case.model(), _RenamedCE(), (case.X, case.y), batch_size=case.batch_size)
    torch.testing.assert_close(kfac(mine, 1e-3, exact=True).to_dense(),
                               kfac(ce, 1e-3, exact=True, backend="torch").to_dense(), rtol=1e-12, atol=0)
    torch.testing.assert_close(diag_ggn(mine, 1e-3).diagonal, diag_ggn(ce, 1e-3, backend="torch").diagonal,
                               rtol=1e-12, atol=0)
    for build in (kfac, diag_ggn):
        with pytest.raises(MetricError, match="BackPACK metrics support curvdist's 'cross_entropy' and 'mse'"):
            build(mine, damping=1e-3, backend="backpack")
    half = cd.Problem(case.model(), _HalfSquares(), (case.X, torch.randn(len(case.X), 4, dtype=torch.float64)))
    with pytest.raises(MetricError, match="half_squares loss cannot give exact output-space factors"):
        kfac(half, 1e-3, exact=True)
    with pytest.raises(MetricError, match="half_squares loss cannot give exact output-space factors"):
        diag_ggn(half, 1e-3)
    M = kfac(half, 1e-3, mc_samples=3, seed=2)  # sampled labels need no factorization: the bias block is exact
    torch.testing.assert_close(_blocks(M)["2.bias"], _dense_blocks(half, "fisher_mc", mc_samples=3, seed=2)["2.bias"],
                               rtol=1e-9, atol=1e-12)


class _HFStyle(nn.Module):
    """Returns a dict with ``logits`` (as Hugging Face models return a ModelOutput)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.inner(x)}


@pytest.mark.filterwarnings("ignore:For backward hooks to be called")
def test_model_outputs_with_logits_reach_the_loss_as_logits() -> None:
    case = CASES["mlp"]()
    plain = make_problem(case)
    wrapped = cd.Problem(_HFStyle(plain.model), case.loss, (case.X, case.y), batch_size=case.batch_size)
    torch.testing.assert_close(kfac(wrapped, 1e-3).to_dense(), kfac(plain, 1e-3, backend="torch").to_dense(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(diag_ggn(wrapped, 1e-3).diagonal, diag_ggn(plain, 1e-3).diagonal, rtol=1e-10, atol=0)
    torch.testing.assert_close(kfac(wrapped, 1e-3, backend="backpack").to_dense(),
                               kfac(plain, 1e-3, backend="backpack").to_dense(), rtol=1e-12, atol=0)
