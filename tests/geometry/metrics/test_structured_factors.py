"""Structured Kronecker factors (:mod:`curvdist.geometry.structured`): a diagonal plus a weighted low-rank term,
the damped blocks F ⊗ H + δI built on them, and KFAC at a real vocabulary.

Ground truth is dense float64 linear algebra on matrices assembled here from the raw pieces (d, B, w, H), not
through the code under test; at V = 50,257 (where dense is impossible) invariance θ → ψ is the check."""

from __future__ import annotations

import pytest
import torch

import curvdist as cd
from curvdist.errors import MemoryBudgetError, SingularMetricError
from curvdist.geometry.metrics.kfac import KFACMetric, nearest_kronecker
from curvdist.geometry.reparam import scale
from curvdist.geometry.structured import LowRankFactor, StructuredKronecker, frobenius
from curvdist.resources import peak_rss_mb, reset_peak, rss_mb

pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the dev install")

from curvdist.zoo import hf_causal_lm, markov_corpus  # noqa: E402

DT = torch.float64
N, M, R = 13, 4, 5


def _factor(case: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, B, w) of the factor cases: KFAC's sum of rank-one terms (d = 0), a diagonal plus a positive low-rank
    term, KFLR's E[Λ] = diag(Σp) − Σ ppᵀ (negative weights), and a pure diagonal (an embedding's token counts)."""
    B = torch.randn(R, N, generator=g, dtype=DT)
    if case == "rank_one_terms":
        return torch.zeros(N, dtype=DT), B, torch.ones(R, dtype=DT)
    if case == "diagonal_plus_low_rank":
        return torch.rand(N, generator=g, dtype=DT) + 0.1, B, torch.rand(R, generator=g, dtype=DT)
    if case == "softmax_hessians":
        P = torch.softmax(3 * B, dim=1)
        return P.sum(0), P, -torch.ones(R, dtype=DT)
    assert case == "diagonal"
    return torch.rand(N, generator=g, dtype=DT), B[:0], torch.ones(0, dtype=DT)


CASES = ("rank_one_terms", "diagonal_plus_low_rank", "softmax_hessians", "diagonal")


@pytest.mark.parametrize("side", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_structured_block_equals_the_dense_kronecker_block(case: str, side: int) -> None:
    g = torch.Generator().manual_seed(CASES.index(case))
    d, B, w = _factor(case, g)
    F_dense = torch.diag(d) + B.T @ torch.diag(w) @ B
    X = torch.randn(M, M, generator=g, dtype=DT)
    H = X @ X.T + 0.1 * torch.eye(M, dtype=DT)
    lam, U = torch.linalg.eigh(H)
    block = torch.kron(F_dense, H) if side == 0 else torch.kron(H, F_dense)
    delta = 0.3
    Md = block + delta * torch.eye(N * M, dtype=DT)
    S = StructuredKronecker(LowRankFactor(d, B, w), lam, U, side, "w")
    v = torch.randn(N * M, generator=g, dtype=DT)

    torch.testing.assert_close(S.power(v, 1.0, delta), Md @ v, rtol=1e-12, atol=0)
    torch.testing.assert_close(S.power(v, -1.0, delta), torch.linalg.solve(Md, v), rtol=1e-10, atol=0)
    # the factor W (M = WᵀW): W⁻¹ W⁻ᵀ = M⁻¹, and W⁻ᵀ M W⁻¹ = I
    torch.testing.assert_close(S.power(S.inv_factor_t(v, delta), -0.5, delta), torch.linalg.solve(Md, v),
                               rtol=1e-10, atol=0)
    Winv = torch.stack([S.power(e, -0.5, delta) for e in torch.eye(N * M, dtype=DT)], dim=1)
    torch.testing.assert_close(Winv.T @ Md @ Winv, torch.eye(N * M, dtype=DT), rtol=0, atol=1e-10)
    if S.symmetric:  # a constant diagonal (or none): W⁻¹ is the symmetric M^{-1/2}
        torch.testing.assert_close(Winv, Winv.T, rtol=0, atol=1e-12)
    assert S.symmetric == (case in ("rank_one_terms", "diagonal"))
    assert S.logdet(delta) == pytest.approx(float(torch.logdet(Md)), rel=1e-12)
    expected = torch.linalg.eigvalsh(block)
    torch.testing.assert_close(torch.sort(S.eigenvalues()).values, expected, rtol=0,
                               atol=1e-11 * float(expected.abs().max()))


def test_structured_factor_eigenvalues_of_a_large_factor_need_a_constant_diagonal() -> None:
    g = torch.Generator().manual_seed(0)
    n = 50_257
    B = torch.randn(6, n, generator=g, dtype=DT)
    kfac_like = LowRankFactor.from_rows(B)  # d = 0: exact from the 6 × 6 Gram matrix
    mu = kfac_like.eigvalsh()
    torch.testing.assert_close(mu[-6:], torch.linalg.eigvalsh(B @ B.T), rtol=1e-12, atol=0)
    assert mu.shape == (n,) and float(mu[:-6].abs().max()) == 0.0
    counts = torch.rand(n, generator=g, dtype=DT)  # an embedding's token factor: its eigenvalues are its entries
    torch.testing.assert_close(LowRankFactor.from_diagonal(counts).eigvalsh(), torch.sort(counts).values)
    with pytest.raises(cd.errors.MetricError, match=r"50257-dimensional .* dense_eig_max"):
        LowRankFactor(torch.rand(n, generator=g, dtype=DT), B, torch.ones(6, dtype=DT)).eigvalsh()


def test_frobenius_products_and_the_nearest_kronecker_product_stay_structured() -> None:
    g = torch.Generator().manual_seed(1)
    counts = torch.rand(N, generator=g, dtype=DT)  # an embedding's token counts (a diagonal factor)
    head = LowRankFactor.from_rows(torch.randn(R, N, generator=g, dtype=DT))
    G_emb = torch.randn(M, M, generator=g, dtype=DT)
    G_emb = G_emb @ G_emb.T
    A_head = torch.randn(M, M, generator=g, dtype=DT)
    A_head = A_head @ A_head.T
    head_dense = head.rows.T @ head.rows
    assert frobenius(counts, head) == pytest.approx(float((torch.diag(counts) * head_dense).sum()), rel=1e-13)
    assert frobenius(head, head) == pytest.approx(float((head_dense * head_dense).sum()), rel=1e-13)
    F, Hk = nearest_kronecker([(counts, G_emb), (head, A_head)])
    F_ref, H_ref = nearest_kronecker([(torch.diag(counts), G_emb), (head_dense, A_head)])
    assert isinstance(F, LowRankFactor)
    torch.testing.assert_close(torch.kron(F.dense(), Hk), torch.kron(F_ref, H_ref), rtol=1e-12, atol=1e-14)
    # it is the nearest Kronecker product: the residual is orthogonal to it (the top singular triplet)
    total = torch.kron(torch.diag(counts), G_emb) + torch.kron(head_dense, A_head)
    K = torch.kron(F_ref, H_ref)
    assert float(((total - K) * K).sum()) == pytest.approx(0.0, abs=1e-10 * float((K * K).sum()))


# ---------------------------------------------------------------------------------------------- KFAC on a tied LM
SMALL_VOCAB = 40  # above structured_above=20 below, while every other factor side (4, 12, 16) stays dense


def _tied_gpt2(vocab: int) -> cd.Problem:
    cfg = {"model_type": "gpt2", "vocab_size": vocab, "n_positions": 8, "n_embd": 4, "n_layer": 1, "n_head": 1}
    model = hf_causal_lm(cfg, seed=1, dtype="float64")
    data = markov_corpus(n=4, vocab_size=vocab, max_length=6, min_length=3, seed=2)
    data["labels"][0, 2] = -100
    return cd.Problem(model, "causal_lm", data, batch_size=3)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_with_a_structured_tied_embedding_equals_the_dense_factors(approx: str) -> None:
    problem = _tied_gpt2(SMALL_VOCAB)
    opts = {"mc_samples": 2, "seed": 3, "kfac_approx": approx}
    dense = cd.metric(problem, "kfac", 0.1, structured_above=10**9, **opts)
    structured = cd.metric(problem, "kfac", 0.1, structured_above=20, **opts)
    assert [b.name for b in structured.blocks if b.structured is not None] == ["transformer.wte.weight"]
    assert all(b.structured is None for b in dense.blocks)
    Md = dense.to_dense()
    torch.testing.assert_close(structured.to_dense(), Md, rtol=0, atol=1e-12 * float(Md.abs().max()))
    assert structured.logdet() == pytest.approx(float(torch.logdet(Md)), rel=1e-12)
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(structured.solve(v), torch.linalg.solve(Md, v), rtol=1e-9, atol=0)
    torch.testing.assert_close(structured.inv_factor_apply(structured.inv_factor_t_apply(v)),
                               torch.linalg.solve(Md, v), rtol=1e-9, atol=0)
    wte = next(b for b in structured.blocks if b.structured is not None)
    twin = next(b for b in dense.blocks if b.name == wte.name)
    torch.testing.assert_close(torch.sort(wte.eigenvalues).values, torch.sort(twin.eigenvalues).values,
                               rtol=0, atol=1e-12 * float(twin.eigenvalues.abs().max()))
    # the state reproduces the very metric, structure included
    again = KFACMetric.from_state_dict(structured.state_dict())
    assert [b.name for b in again.blocks if b.structured is not None] == ["transformer.wte.weight"]
    torch.testing.assert_close(again.solve(v), structured.solve(v), rtol=1e-12, atol=0)


def test_kflr_rows_outnumbering_the_vocabulary_are_densified() -> None:
    """KFLR's head factor has V rows per token; once they outnumber V the dense V × V factor is cheaper (and
    equals the dense route)."""
    problem = _tied_gpt2(SMALL_VOCAB)
    dense = cd.metric(problem, "kflr", 0.1, structured_above=10**9)
    structured = cd.metric(problem, "kflr", 0.1, structured_above=20)
    assert all(b.structured is None for b in structured.blocks)
    torch.testing.assert_close(structured.to_dense(), dense.to_dense(), rtol=0, atol=1e-14)


def test_an_undamped_structured_block_that_is_singular_is_refused() -> None:
    problem = _tied_gpt2(SMALL_VOCAB)
    with pytest.raises(SingularMetricError, match="add damping"):
        cd.metric(problem, "kfac", 0.0, structured_above=20)


# ---------------------------------------------------------------------------------------------- GPT-2's vocabulary
GPT2_VOCAB = 50_257


@pytest.fixture(scope="module")
def gpt2_vocab_problem() -> cd.Problem:
    return _tied_gpt2(GPT2_VOCAB)


def test_kfac_queries_at_gpt2_vocabulary_are_invariant_and_fit_in_memory(gpt2_vocab_problem: cd.Problem) -> None:
    """A tied GPT-2 of width 4 with 50,257 tokens (201,312 parameters): the dense route would need a 50,257²
    factor (20 GB in float64); the structured one stays under 3 GB, and M⁻¹GGN's top eigenvalues and trace are the
    same in θ and in ψ = θ/c (per-tensor scales, damping pulled back) to rounding."""
    p = gpt2_vocab_problem
    start = rss_mb()
    reset_peak()
    M = cd.metric(p, "kfac", 1e-3, mc_samples=1, seed=0)
    assert any(b.structured is not None and b.structured.n == GPT2_VOCAB for b in M.blocks)
    top = cd.eigs(cd.operator(p, "ggn"), k=3, metric=M, tol=1e-10)
    tr = cd.trace(cd.operator(p, "ggn"), metric=M, matvecs=30, seed=1)
    q = cd.reparametrize(p, scale({"transformer.wte.weight": 3.0, "transformer.h.0.mlp.c_fc.weight": 0.5,
                                   "transformer.h.0.attn.c_attn.bias": 4.0}))
    Mq = cd.metric(q, "kfac", 1e-3, damping_reference="pullback", mc_samples=1, seed=0)
    top_q = cd.eigs(cd.operator(q, "ggn"), k=3, metric=Mq, tol=1e-10)
    tr_q = cd.trace(cd.operator(q, "ggn"), metric=Mq, matvecs=30, seed=1)
    peak = peak_rss_mb() - start
    print(f"V=50257: top {top.value}, ψ {top_q.value}; trace {tr.value:.6g} vs {tr_q.value:.6g}; "
          f"peak above start {peak:.0f} MB")
    assert top.converged and top_q.converged
    torch.testing.assert_close(torch.tensor(top_q.value), torch.tensor(top.value), rtol=1e-8, atol=0)
    assert tr_q.value == pytest.approx(tr.value, rel=1e-8)
    assert top.value[0] > 0 and tr.value > top.value[0]
    assert peak < 3 * 1024


def test_kflr_at_gpt2_vocabulary_is_refused_before_allocating(gpt2_vocab_problem: cd.Problem) -> None:
    with pytest.raises(MemoryBudgetError, match=r"GiB.*kfac"):
        cd.metric(gpt2_vocab_problem, "kflr", 1e-3)
