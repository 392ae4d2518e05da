"""Curvature products of Hugging Face causal language models against dense float64 truth from plain autograd.

Truth: the Hessian by double backward of the loss written out with ``F.cross_entropy`` (shifted logits, −100
ignored, mean over all non-ignored tokens of the data set); the GGN/Fisher as Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t
and the empirical Fisher as Σ_t g_t g_tᵀ with the Jacobian J of the logits from one backward pass per entry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvdist as cd

from .conftest import VOCAB, LMCase, make_case


def _params(case: LMCase) -> list[torch.Tensor]:
    return [p for p in case.model.parameters()]


def _logits(case: LMCase) -> torch.Tensor:
    inputs = {k: v for k, v in case.data.items() if k != "labels"}
    return case.model(**inputs).logits


def _loss(case: LMCase) -> torch.Tensor:
    logits, labels = _logits(case), case.data["labels"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


def _valid(case: LMCase) -> torch.Tensor:
    """(B, T) mask of the logit positions scored by the causal loss."""
    labels = case.data["labels"]
    return torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1)


def _hvp_truth(case: LMCase, V: torch.Tensor) -> torch.Tensor:
    params = _params(case)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(_loss(case), params, create_graph=True)])
    cols = []
    for v in V.T:
        hv = torch.autograd.grad(g @ v, params, retain_graph=True, allow_unused=True)
        cols.append(torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                               for h, p in zip(hv, params)]))
    return torch.stack(cols, dim=1)


def _jvp(case: LMCase, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) and J v by plain autograd (the double-backward trick: Jv = ∂/∂u ⟨Jᵀu, v⟩)."""
    params = _params(case)
    logits = _logits(case)
    u = torch.zeros_like(logits, requires_grad=True)
    g = torch.autograd.grad(logits, params, grad_outputs=u, create_graph=True, allow_unused=True)
    gv = sum((gi * vi).sum() for gi, vi in zip(g, _split(case, v)) if gi is not None)
    return logits.detach(), torch.autograd.grad(gv, u)[0]


def _vjp(case: LMCase, u: torch.Tensor) -> torch.Tensor:
    params = _params(case)
    g = torch.autograd.grad(_logits(case), params, grad_outputs=u, allow_unused=True)
    return torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params)])


def _split(case: LMCase, v: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for p in _params(case):
        out.append(v[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _output_space_truth(case: LMCase, v: torch.Tensor, which: str, labels: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Σ_t J_tᵀ Λ_t J_t v / N with explicit V×V matrices Λ_t per valid token: diag(p) − ppᵀ (``ggn``) or r rᵀ with
    r = p − e_y at the given (causal-layout) labels (``outer``)."""
    logits, Jv = _jvp(case, v)
    B, T, V = logits.shape
    valid = _valid(case)
    labels = case.data["labels"] if labels is None else labels
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    u = torch.zeros_like(logits)
    for n in range(B):
        for t in range(T):
            if not valid[n, t] or int(nxt[n, t]) == -100:
                continue
            p = torch.softmax(logits[n, t], -1)
            if which == "ggn":
                lam = torch.diag(p) - torch.outer(p, p)
            else:
                r = p - F.one_hot(nxt[n, t], V).double()
                lam = torch.outer(r, r)
            u[n, t] = lam @ Jv[n, t]
    return _vjp(case, u) / int(valid.sum())


def _vectors(dim: int, k: int = 3) -> torch.Tensor:
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_mean_runs_over_the_non_ignored_tokens_of_the_whole_data_set(lm: LMCase) -> None:
    problem = lm.problem()
    assert problem.num_samples == int(_valid(lm).sum()) < lm.data["labels"].numel()
    with torch.no_grad():
        expected = float(_loss(lm))
    assert problem.value() == pytest.approx(expected, rel=1e-13)
    assert lm.problem(batch_size=1).value() == pytest.approx(expected, rel=1e-13)
    grad = torch.autograd.grad(_loss(lm), _params(lm))
    lm.close(problem.flatten(problem.gradient()), torch.cat([g.reshape(-1) for g in grad]))


def test_hessian_products_equal_double_backward(lm: LMCase) -> None:
    problem = lm.problem()
    V = _vectors(problem.dim)
    op = cd.operator(problem, "hessian")
    got = torch.stack([op @ v for v in V.T], dim=1)
    lm.close(got, _hvp_truth(lm, V))


@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher"])
def test_output_space_products_equal_dense_truth(lm: LMCase, kind: str) -> None:
    problem = lm.problem()
    V = _vectors(problem.dim, 2)
    op = cd.operator(problem, kind)
    which = "outer" if kind == "empirical_fisher" else "ggn"
    expected = torch.stack([_output_space_truth(lm, v, which) for v in V.T], dim=1)
    lm.close(torch.stack([op @ v for v in V.T], dim=1), expected)


def test_fisher_mc_is_a_sum_over_tokens_of_sampled_gradient_outer_products(lm: LMCase) -> None:
    """(1/S) Σ_s Σ over valid tokens of g gᵀ at the tokens the operator draws, with J from plain autograd."""
    problem = lm.problem(batch_size=4)
    op = cd.operator(problem, "fisher_mc", mc_samples=2, seed=3)
    (X, y), = list(problem.batches())
    with torch.no_grad():
        logits = _logits(lm)
    sampled = op.sampled_targets(logits, 0, y)  # (S, B, T), labels in the causal layout
    assert sampled.shape == (2, *y.shape)
    assert bool((sampled[:, y == -100] == -100).all()), "no token is drawn where the label is ignored"
    assert bool((sampled[:, :, 0] == -100).all()), "the first position is never a causal target"
    v = _vectors(problem.dim, 1)[:, 0]
    expected = sum(_output_space_truth(lm, v, "outer", labels=t) for t in sampled) / 2
    lm.close(op @ v, expected)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_micro_batches_equal_the_unsplit_product(lm: LMCase, kind: str) -> None:
    whole = cd.operator(lm.problem(batch_size=4), kind)
    split = cd.operator(lm.problem(batch_size=4, micro_batch_size=2), kind)
    v = _vectors(whole.dim, 1)[:, 0]
    lm.close(split @ v, whole @ v)


def test_token_cross_entropy_on_next_token_labels_equals_the_causal_loss() -> None:
    causal, shifted = make_case("gpt2"), make_case("gpt2", labels="next")
    labels = causal.data["labels"]
    shifted.data["labels"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    a, b = causal.problem(), shifted.problem(loss="token_cross_entropy")
    assert a.num_samples == b.num_samples
    assert a.value() == pytest.approx(b.value(), rel=1e-13)
    v = _vectors(a.dim, 1)[:, 0]
    torch.testing.assert_close(cd.operator(a, "ggn") @ v, cd.operator(b, "ggn") @ v, rtol=1e-12, atol=1e-15)


def test_bfloat16_model_products_accumulate_in_float32() -> None:
    case = make_case("gpt2")
    exact = cd.operator(case.problem(), "ggn")
    low = make_case("gpt2")
    low.model = low.model.to(torch.bfloat16)
    op = cd.operator(low.problem(), "ggn", check_determinism=False)
    assert op.dtype == torch.float32 and low.problem().accumulate_dtype == torch.float32
    v = _vectors(exact.dim, 1)[:, 0]
    got = op @ v.float()
    assert got.dtype == torch.float32
    rel = float((got.double() - exact @ v).norm() / (exact @ v).norm())
    assert rel < 0.1, rel  # bfloat16 forward passes: ~3 significant digits per op
