"""Per-layer blocks from curvdist's own kernels (module probes and torch.func) against dense float64 blocks,
against BackPACK where both apply, and their refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvdist as cd
from curvdist.errors import MetricError
from curvdist.geometry.blocks.attention import explicit_attention
from curvdist.geometry.blocks.probes import Recorder, uncovered
from curvdist.geometry.metrics.backpack_metrics import diag_fisher_mc, diag_ggn, empirical_fisher_diag
from curvdist.geometry.metrics.kfac import kfac, kfac_sums
from tests import dense
from tests.cases import CASES, Case, make_problem

DIAGONALS = {"diag_ggn": ("ggn", {}), "diag_fisher_mc": ("fisher_mc", {"mc_samples": 3, "seed": 7}),
             "empirical_fisher_diag": ("empirical_fisher", {})}
BUILDERS = {"diag_ggn": diag_ggn, "diag_fisher_mc": diag_fisher_mc, "empirical_fisher_diag": empirical_fisher_diag}


def _covered_problem(case: Case, **kw: object) -> cd.Problem:
    """All parameters except a bare model-level parameter (the feature transformer's positions)."""
    model = case.model()
    names = [n for n, _ in model.named_parameters() if "." in n]
    return cd.Problem(model, case.loss, (case.X, case.y), batch_size=case.batch_size, params=names, **kw)


_dense_blocks = dense.dense_blocks


_kfac_blocks = dense.kronecker_blocks


# ---------------------------------------------------------------------------------------------- diagonals
@pytest.mark.parametrize("kind", sorted(DIAGONALS))
def test_torch_diagonal_is_the_dense_diagonal(case: Case, reduction: str, kind: str) -> None:
    """Every parameter of every case, including LayerNorm, Embedding, attention and bare parameters."""
    problem = make_problem(case, reduction)
    op_kind, options = DIAGONALS[kind]
    M = BUILDERS[kind](problem, damping=1e-3, backend="torch", **options)
    C = cd.operator(problem, op_kind, **options).to_dense()
    torch.testing.assert_close(M.diagonal, C.diagonal(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["diag_ggn", "empirical_fisher_diag"])
@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "cnn"])
def test_torch_and_backpack_diagonals_agree(name: str, kind: str) -> None:
    problem = make_problem(CASES[name]())
    ours = BUILDERS[kind](problem, damping=1e-3, backend="torch").diagonal
    theirs = BUILDERS[kind](problem, damping=1e-3, backend="backpack").diagonal
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------------------------------------- Kronecker blocks
def _conv_one_location() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 3×3 convolution on 3×3 patches: one output location, so its weight is not shared."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)).double().eval()
    case = CASES["cnn"]()
    return model, case.X[:5, :, 2:5, 2:5].contiguous(), case.y[:5] % 4


@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "conv1"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_and_backpack_kflr_factors_agree(name: str, reduction: str) -> None:
    """Where no weight is shared (T = 1) BackPACK's factors are KFLR's, in both approximations."""
    if name == "conv1":
        model, X, y = _conv_one_location()
        problem = cd.Problem(model, "cross_entropy", (X, y), batch_size=2, reduction=reduction)
    else:
        problem = make_problem(CASES[name](), reduction)
    G2, A2 = kfac_sums(problem, exact=True, backend="backpack")
    for approx in ("expand", "reduce"):
        G1, A1 = kfac_sums(problem, exact=True, backend="torch", kfac_approx=approx)
        torch.testing.assert_close(G1, G2, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(A1, A2, rtol=1e-9, atol=1e-12)


def test_backpack_convolution_factors_with_shared_weights_are_refused_and_auto_uses_the_own_kernels() -> None:
    """BackPACK's factors of a convolution with |T| > 1 output locations are (bias block) ⊗ Σ_t a aᵀ/N, neither
    expand nor reduce: refused with backend='backpack'; backend='auto' takes the own kernels, for convolutions as
    for Linear layers on sequences (which BackPACK refuses itself)."""
    problem = make_problem(CASES["cnn"]())
    with pytest.raises(MetricError, match="neither KFAC-expand nor KFAC-reduce"):
        kfac(problem, damping=1e-3, exact=True, backend="backpack")
    torch.testing.assert_close(kfac(problem, 1e-3, exact=True).to_dense(),
                               kfac(problem, 1e-3, exact=True, backend="torch").to_dense(), rtol=0, atol=0)
    model, X, y = _conv_one_location()
    one = cd.Problem(model, "cross_entropy", (X, y))
    # one output location: auto takes BackPACK for KFLR, and the own kernels for the sampled KFAC (labels keyed by
    # the global sample index, which BackPACK cannot draw)
    torch.testing.assert_close(kfac(one, 1e-3, exact=True).to_dense(),
                               kfac(one, 1e-3, exact=True, backend="backpack").to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(kfac(one, 1e-3).to_dense(), kfac(one, 1e-3, backend="torch").to_dense(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("exact", [True, False])
def test_single_factor_blocks_are_exact(case: Case, exact: bool) -> None:
    """Biases (of Linear, Conv2d, attention projections) and LayerNorm/BatchNorm parameters get the exact block of
    the GGN (KFLR) or of the sampled Fisher with the same labels (KFAC)."""
    problem = _covered_problem(case)
    M = kfac(problem, damping=1e-3, exact=exact, backend="torch", **({} if exact else {"mc_samples": 2, "seed": 3}))
    dense = _dense_blocks(problem, "ggn") if exact else _dense_blocks(problem, "fisher_mc", mc_samples=2, seed=3)
    single = [b for b in M.blocks if len(b.evecs) == 1]
    assert single
    for b in single:
        torch.testing.assert_close(b.dense(0.0), dense[b.name], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "token_transformer"])
def test_kflr_blocks_are_exact_for_one_sample_and_one_position(name: str) -> None:
    """With one sample and one token, G ⊗ A is the exact GGN block of every weight (Linear, Embedding, attention
    projections, LayerNorm), the defining property of KFLR."""
    case = CASES[name]()
    X = case.X[:1, :1] if name == "token_transformer" else case.X[:1]
    model = case.model()
    problem = cd.Problem(model, case.loss, (X, case.y[:1]))
    M = kfac(problem, exact=True, damping=1e-3, backend="torch")
    dense = _dense_blocks(problem, "ggn")
    for name_, block in _kfac_blocks(M).items():
        torch.testing.assert_close(block, dense[name_], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_weight_sharing_factors_follow_their_definition(approx: str) -> None:
    """Sequence Linear/attention weights: the input-side sums and counts from the layer inputs (recorded by plain
    forward hooks) — expand: Σ_{n,t} a aᵀ over N·T positions, reduce: Σ_n ā ā ᵀ over N samples — and, for reduce,
    the output-side sum s·G = the bias block of the dense GGN (Σ_t b is the bias gradient); embeddings: token
    counts (expand) or per-sample token frequencies (reduce)."""
    case = CASES["token_transformer"]()
    problem = _covered_problem(case)
    G, A = kfac_sums(problem, exact=True, backend="torch", kfac_approx=approx)
    inputs: dict[str, list[torch.Tensor]] = {}
    model = problem.model
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: inputs.setdefault(p, []).append(i[0].detach())) for p in ("ln1", "mlp.0", "mlp.2")]
    try:
        for X, _ in problem.batches():
            model(X)
    finally:
        for h in hooks:
            h.remove()
    N, T = case.X.shape
    ln1_out = [torch.nn.functional.layer_norm(x, (4,), model.ln1.weight, model.ln1.bias) for x in inputs["ln1"]]
    for param, feats in (("attn.in_proj_weight", ln1_out), ("mlp.0.weight", inputs["mlp.0"]),
                         ("mlp.2.weight", inputs["mlp.2"])):
        a = torch.cat(feats)  # (N, T, in)
        assert isinstance(G[param], list) and len(G[param]) == 1 and isinstance(G[param][0], torch.Tensor)
        if approx == "expand":
            flat = a.reshape(-1, a.shape[-1])
            expected = (flat.T @ flat, N * T)
        else:
            mean = a.mean(1)
            expected = (mean.T @ mean, N)
        torch.testing.assert_close(A[param][0][0], expected[0], rtol=1e-10, atol=1e-12)
        assert A[param][0][1] == expected[1]
    dense = _dense_blocks(problem, "ggn")
    if approx == "reduce":
        for w, b in (("attn.in_proj_weight", "attn.in_proj_bias"), ("attn.out_proj.weight", "attn.out_proj.bias"),
                     ("mlp.0.weight", "mlp.0.bias")):
            torch.testing.assert_close(G[w][0] * problem.scale, dense[b], rtol=1e-8, atol=1e-12)
    # embeddings (V, d): the first factor is the input side, (token statistics, count)
    onehot = torch.nn.functional.one_hot(case.X, 17).double()  # (N, T, V)
    tokens, count = G["embed.weight"][0]
    if approx == "expand":
        torch.testing.assert_close(tokens, torch.diag(onehot.sum((0, 1))))
        assert count == N * T
    else:
        freq = onehot.mean(1)
        torch.testing.assert_close(tokens, freq.T @ freq)
        assert count == N
    positions, _ = G["pos.weight"][0]  # every position once per sample
    expected = N * torch.eye(T, dtype=torch.float64) if approx == "expand" else torch.full((T, T), N / T**2).double()
    torch.testing.assert_close(positions, expected)


def test_auto_backend_uses_backpack_where_it_applies_and_own_kernels_elsewhere() -> None:
    mlp = make_problem(CASES["mlp"]())
    torch.testing.assert_close(kfac(mlp, 1e-3, exact=True).to_dense(),
                               kfac(mlp, 1e-3, exact=True, backend="backpack").to_dense())
    # sampled KFAC: the own kernels (labels keyed by the global sample index), even where BackPACK applies
    torch.testing.assert_close(kfac(mlp, 1e-3).to_dense(), kfac(mlp, 1e-3, backend="torch").to_dense(), rtol=0,
                               atol=0)
    tt = make_problem(CASES["token_transformer"]())
    M = kfac(tt, damping=1e-3)  # LayerNorm, Embedding, attention: the own kernels
    torch.testing.assert_close(M.to_dense(), kfac(tt, 1e-3, backend="torch").to_dense())
    v = torch.randn(tt.dim, dtype=torch.float64)
    torch.testing.assert_close(M.apply(M.solve(v)), v, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float", "causal", "padding"])
def test_explicit_attention_equals_torch(batch_first: bool, mask: str | None) -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(6, 3, batch_first=batch_first).double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    kw: dict[str, object] = {}
    if mask == "bool":
        kw["attn_mask"] = torch.rand(5, 5) > 0.7
        kw["attn_mask"].fill_diagonal_(False)  # type: ignore[union-attr]
    elif mask == "float":
        kw["attn_mask"] = torch.randn(5, 5, dtype=torch.float64)
    elif mask == "causal":
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
        kw["is_causal"] = True
    elif mask == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * 5, [False, False, False, True, True]])
    names = {"in_proj_weight": "in_proj_weight", "in_proj_bias": "in_proj_bias"}
    out_names = {"weight": "out_proj.weight", "bias": "out_proj.bias"}
    rec = Recorder(set())
    ours, w1 = explicit_attention(m, "", rec, names, out_names, x, x, x, **kw)  # type: ignore[arg-type]
    theirs, w2 = m(x, x, x, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1, w2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- bad input
class _Gain(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * torch.tanh(x)


@pytest.mark.parametrize("exact", [True, False])
def test_parameters_without_a_layer_rule_get_exact_blocks(exact: bool) -> None:
    """A model's own tensor (the transformer's positions), a grouped convolution, a custom module and a PReLU have no
    rule:
    their blocks are the exact blocks of the GGN (KFLR) or of the sampled Fisher with the same labels (KFAC)."""
    options = {} if exact else {"mc_samples": 2, "seed": 1}
    op, op_options = ("ggn", {}) if exact else ("fisher_mc", options)
    problem = make_problem(CASES["transformer"]())
    assert uncovered(problem.model, problem.param_names) == {
        "the model itself (TransformerBlockClassifier)": ["pos"]}
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 3), _Gain(3), nn.PReLU()).double()
    X, y = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    conv = cd.Problem(model, "cross_entropy", (X, y), batch_size=3)  # (PReLU: no vmap rule for its double backward)
    for p, names in ((problem, ["pos"]), (conv, ["0.weight", "0.bias", "3.gain", "4.weight"])):
        blocks = _kfac_blocks(kfac(p, damping=1e-3, exact=exact, backend="torch", **options))
        dense = _dense_blocks(p, op, **op_options)
        for name in names:
            torch.testing.assert_close(blocks[name], dense[name], rtol=1e-8, atol=1e-12, msg=name)


def test_parameters_that_no_block_can_cover_are_listed() -> None:
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2)).double()
    X = torch.randint(0, 5, (4, 2))
    problem = cd.Problem(model, "cross_entropy", (X, torch.arange(4) % 2))
    with pytest.raises(MetricError) as err:
        kfac(problem, damping=1e-3)
    msg = str(err.value)
    for part in ("'0' (Embedding): max_norm renormalizes", "['0.weight']", "'ggn' or 'fisher'"):
        assert part in msg, (part, msg)
    assert "2.weight" not in msg


class _ReadsEmbeddingDirectly(nn.Module):
    """The head reads the embedding's weight directly, not through a module: a use no site sees."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(6, 4), nn.Linear(4, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.lin(self.emb(idx))) @ self.emb.weight.T).mean(1)


def test_a_parameter_used_outside_its_modules_is_refused() -> None:
    X = torch.randint(0, 6, (5, 3), generator=torch.Generator().manual_seed(0))
    problem = cd.Problem(_ReadsEmbeddingDirectly().double(), "cross_entropy", (X, torch.arange(5)))
    with pytest.raises(MetricError, match="emb.weight is used in the forward pass outside the modules that hold it"):
        kfac(problem, damping=1e-3)
    kfac(cd.Problem(problem.model, "cross_entropy", (X, torch.arange(5)), params=["lin.weight"]), damping=1e-3)


class _Unbatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table(torch.arange(4)).sum(0)


@pytest.mark.parametrize("model, match", [(_Unbatched(), "first axis is not the batch")])
def test_unsupported_usage_is_refused(model: nn.Module, match: str) -> None:
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    p = cd.Problem(model.double(), "cross_entropy", (X, y))
    with pytest.raises(MetricError, match=match):
        kfac(p, damping=1e-3, backend="torch")


def test_unknown_backend_is_refused(mlp_problem: cd.Problem) -> None:
    with pytest.raises(MetricError, match="backend must be one of"):
        kfac(mlp_problem, backend="jax")
    with pytest.raises(MetricError, match="backend must be one of"):
        diag_ggn(mlp_problem, backend="jax")
