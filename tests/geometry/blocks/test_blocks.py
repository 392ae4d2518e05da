"""Per-layer blocks from curvdist's own kernels (module probes and torch.func) against dense float64 blocks,
against BackPACK where both apply, and their refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvdist as cd
from curvdist.errors import MetricError
from curvdist.geometry.blocks.attention import explicit_attention
from curvdist.geometry.blocks.probes import Recorder
from curvdist.geometry.metrics.backpack_metrics import diag_fisher_mc, diag_ggn, empirical_fisher_diag
from curvdist.geometry.metrics.kfac import kfac, kfac_sums
from tests.cases import CASES, Case, make_problem

DIAGONALS = {"diag_ggn": ("ggn", {}), "diag_fisher_mc": ("fisher_mc", {"mc_samples": 3, "seed": 7}),
             "empirical_fisher_diag": ("empirical_fisher", {})}
BUILDERS = {"diag_ggn": diag_ggn, "diag_fisher_mc": diag_fisher_mc, "empirical_fisher_diag": empirical_fisher_diag}


def _covered_problem(case: Case, **kw: object) -> cd.Problem:
    """All parameters except a bare model-level parameter (the feature transformer's positions)."""
    model = case.model()
    names = [n for n, _ in model.named_parameters() if "." in n]
    return cd.Problem(model, case.loss, (case.X, case.y), batch_size=case.batch_size, params=names, **kw)


def _dense_blocks(problem: cd.Problem, kind: str, **options: object) -> dict[str, torch.Tensor]:
    """The diagonal blocks of the dense matrix of operator ``kind``, one per parameter."""
    C = cd.operator(problem, kind, **options).to_dense()
    out, i = {}, 0
    for name, shape in zip(problem.param_names, problem.shapes):
        k = shape.numel()
        out[name] = C[i:i + k, i:i + k]
        i += k
    return out


def _kfac_blocks(M: object) -> dict[str, torch.Tensor]:
    return {b.name: b.dense(0.0) for b in M.blocks}  # type: ignore[attr-defined]


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
@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "cnn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_and_backpack_kflr_factors_agree(name: str, reduction: str) -> None:
    problem = make_problem(CASES[name](), reduction)
    G1, A1 = kfac_sums(problem, exact=True, backend="torch")
    G2, A2 = kfac_sums(problem, exact=True, backend="backpack")
    for n in problem.param_names:
        torch.testing.assert_close(G1[n], G2[n], rtol=1e-9, atol=1e-12)
        if A2[n] is None:
            assert A1[n] is None
        else:
            torch.testing.assert_close(A1[n], A2[n], rtol=1e-9, atol=1e-12)


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


def test_weight_sharing_factors_follow_their_definition() -> None:
    """Conv2d/sequence Linear/attention weights: A from the layer inputs (recorded by plain forward hooks) and the
    output factor G = (bias block)/T, with the bias block taken from the dense GGN."""
    case = CASES["token_transformer"]()
    problem = _covered_problem(case)
    G, A = kfac_sums(problem, exact=True, backend="torch")
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
    ln1_out = [torch.nn.functional.layer_norm(x, (4,), model.ln1.weight, model.ln1.bias) for x in inputs["ln1"]]
    for param, feats in (("attn.in_proj_weight", ln1_out), ("mlp.0.weight", inputs["mlp.0"]),
                         ("mlp.2.weight", inputs["mlp.2"])):
        a = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        torch.testing.assert_close(A[param], a.T @ a, rtol=1e-10, atol=1e-12)
    dense = _dense_blocks(problem, "ggn")
    T = case.X.shape[1]
    for w, b in (("attn.in_proj_weight", "attn.in_proj_bias"), ("attn.out_proj.weight", "attn.out_proj.bias"),
                 ("mlp.0.weight", "mlp.0.bias")):
        torch.testing.assert_close(G[w] * problem.scale * T, dense[b], rtol=1e-8, atol=1e-12)
    # embeddings: token counts (the vocabulary factor) and the output factor of the positions
    counts = torch.bincount(case.X.reshape(-1), minlength=17).double()
    torch.testing.assert_close(G["embed.weight"], torch.diag(counts))
    torch.testing.assert_close(G["pos.weight"], torch.diag(torch.full((6,), float(case.X.shape[0]))).double())


def test_auto_backend_uses_backpack_where_it_applies_and_own_kernels_elsewhere() -> None:
    mlp = make_problem(CASES["mlp"]())
    torch.testing.assert_close(kfac(mlp, 1e-3).to_dense(), kfac(mlp, 1e-3, backend="backpack").to_dense())
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
def test_uncovered_parameters_are_listed() -> None:
    problem = make_problem(CASES["transformer"]())
    with pytest.raises(MetricError, match=r"cannot cover all selected parameters: the model itself "
                                          r"\(TransformerBlockClassifier\) \(parameters \['pos'\]\)"):
        kfac(problem, damping=1e-3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 3), nn.PReLU()).double()
    X, y = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    p = cd.Problem(model, "cross_entropy", (X, y))
    with pytest.raises(MetricError) as err:
        kfac(p, damping=1e-3, backend="torch")
    msg = str(err.value)
    for part in ("'0' (Conv2d): grouped convolution (groups=2)", "['0.weight', '0.bias']", "'3' (PReLU)",
                 "['3.weight']", "'ggn' or 'fisher'"):
        assert part in msg, (part, msg)
    assert "2.weight" not in msg


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


class _Unbatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table(torch.arange(4)).sum(0)


@pytest.mark.parametrize("model, match", [(_Shared(), "called more than once"),
                                          (_Unbatched(), "first axis is not the batch")])
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
