"""Kronecker metrics of transformers without edits: GPT-2 (``Conv1D``, an embedding tied to the head, position ids
broadcast over the batch, padding), a timm ViT (a LayerNorm subclass, a class token and positional embedding),
RMSNorm, the language-model losses, and block spectra per transformer block — against dense GGN blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvdist as cd
from curvdist import zoo
from curvdist.errors import MetricError
from curvdist.geometry.blocks.probes import uncovered
from curvdist.geometry.metrics.kfac import KFACMetric, kfac, nearest_kronecker
from tests import dense

GPT2 = {"model_type": "gpt2", "vocab_size": 8, "n_positions": 6, "n_embd": 4, "n_layer": 1, "n_head": 2}


_dense_blocks = dense.dense_blocks


_blocks = dense.kronecker_blocks


def _one_token_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
            "labels": torch.tensor([[3]])}


# ---------------------------------------------------------------------------------------------- GPT-2
def test_gpt2_kflr_on_one_token_is_the_exact_ggn_block_of_every_parameter() -> None:
    """One sequence of one token: every KFLR block — Conv1D weights (A ⊗ G in their (in, out) layout), the token
    and position embeddings, LayerNorm parameters, biases and the untied head — is the exact GGN block."""
    model = zoo.hf_causal_lm({**GPT2, "tie_word_embeddings": False}, dtype="float64")
    problem = cd.Problem(model, "token_cross_entropy", _one_token_batch())
    M = kfac(problem, damping=1e-3, exact=True)
    dense = _dense_blocks(problem)
    for name, block in _blocks(M).items():
        torch.testing.assert_close(block, dense[name], rtol=1e-8, atol=1e-12, msg=name)
    assert any(len(b.evecs) == 2 and "c_attn" in b.name for b in M.blocks)  # type: ignore[attr-defined]


def test_gpt2_tied_embedding_is_the_nearest_kronecker_product_of_both_uses() -> None:
    """The tied embedding/head weight: per use a Kronecker term, taken from the untied model with the same weights
    (the embedding's and the head's blocks); the tied block is the nearest Kronecker product of their sum, computed
    here independently as the top singular pair of the rearranged dense matrix."""
    data = zoo.markov_corpus(n=2, vocab_size=8, max_length=4, min_length=4)
    tied = zoo.hf_causal_lm(GPT2, dtype="float64")
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = zoo.hf_causal_lm({**GPT2, "tie_word_embeddings": False}, dtype="float64")
    untied.load_state_dict(tied.state_dict())
    with torch.no_grad():
        untied.lm_head.weight.copy_(tied.transformer.wte.weight)
    names = ["transformer.wte.weight"]
    M = kfac(cd.Problem(tied, "causal_lm", data, params=names), damping=1e-3, exact=True)
    U = kfac(cd.Problem(untied, "causal_lm", data, params=names + ["lm_head.weight"]), damping=1e-3, exact=True)
    (Fe, He), (Fh, Hh) = U.factors()["transformer.wte.weight"], U.factors()["lm_head.weight"]
    V, d = Fe.shape[0], He.shape[0]
    total = torch.kron(Fe, He) + torch.kron(Fh, Hh)
    R = total.reshape(V, d, V, d).permute(0, 2, 1, 3).reshape(V * V, d * d)  # vec(F) vec(H)ᵀ layout
    u, sv, vh = torch.linalg.svd(R)
    expected = sv[0] * torch.kron(u[:, 0].reshape(V, V), vh[0].reshape(d, d))
    torch.testing.assert_close(_blocks(M)["transformer.wte.weight"], expected, rtol=1e-8, atol=1e-12)
    F, H = nearest_kronecker([(Fe, He), (Fh, Hh)])
    assert float(torch.linalg.eigvalsh(F).min()) > -1e-12 and float(torch.linalg.eigvalsh(H).min()) > -1e-12


def test_gpt2_padding_positions_do_not_enter_the_factors() -> None:
    """Right padding with attention_mask 0 changes neither the outputs of the real tokens nor, since padded
    positions are left out of A and of its count, the metric."""
    model = zoo.hf_causal_lm(GPT2, dtype="float64")
    data = zoo.markov_corpus(n=2, vocab_size=8, max_length=3, min_length=3)
    padded = {k: torch.cat([v, torch.full((2, 2), {"input_ids": 0, "attention_mask": 0, "labels": -100}[k])], 1)
              for k, v in data.items()}
    for approx in ("expand", "reduce"):
        a = kfac(cd.Problem(model, "causal_lm", data), 1e-3, exact=True, kfac_approx=approx)
        b = kfac(cd.Problem(model, "causal_lm", padded), 1e-3, exact=True, kfac_approx=approx)
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-9, atol=1e-12)


def test_gpt2_kfac_with_sampled_labels_and_block_spectra_per_transformer_block() -> None:
    model = zoo.hf_causal_lm(GPT2, dtype="float64")
    data = zoo.markov_corpus(n=3, vocab_size=8, max_length=4, min_length=2)
    problem = cd.Problem(model, "causal_lm", data, batch_size=2)
    a = cd.metric(problem, "kfac", damping=1e-3, seed=1)
    b = cd.metric(problem, "kfac", damping=1e-3, seed=1)
    assert torch.equal(a.to_dense(), b.to_dense()) and a.kind == "kfac"
    v = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.apply(a.solve(v)), v, rtol=1e-7, atol=1e-9)
    blocks: dict[str, list[str]] = {}
    for n in problem.param_names:
        blocks.setdefault("transformer.h.0" if n.startswith("transformer.h.0.") else n.rpartition(".")[0], []).append(n)
    result = cd.block_spectra(problem, "ggn", "kflr", damping=1e-3, groups=blocks, k=3, compare=False).value
    assert set(result["blocks"]) == set(blocks)
    assert all(b["trace"] > 0 for b in result["blocks"].values())


# ---------------------------------------------------------------------------------------------- timm ViT
@pytest.fixture(scope="module")
def vit() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from curvdist.integrations.hf import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16,
                              depth=1, num_heads=2, num_classes=3).double().eval()
    X = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    return model, X, torch.tensor([0, 2, 1])


def test_timm_vit_gets_kronecker_metrics_without_edits(vit: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """timm's LayerNorm subclass is covered; the class token and positional embedding get exact blocks (the dense
    GGN's for KFLR, the dense sampled Fisher's with the same labels for KFAC)."""
    model, X, y = vit
    assert type(model.norm) is not nn.LayerNorm and isinstance(model.norm, nn.LayerNorm)
    assert uncovered(model, [n for n, _ in model.named_parameters()]) == {
        "the model itself (VisionTransformer)": ["cls_token", "pos_embed"]}
    exact = ["cls_token", "pos_embed", "blocks.0.norm1.weight", "norm.bias", "head.bias", "blocks.0.attn.proj.bias"]
    problem = cd.Problem(model, "cross_entropy", (X, y), batch_size=2, params=exact + ["blocks.0.attn.qkv.weight"])
    ggn = _dense_blocks(problem, "ggn")
    for kind, options, truth in (("kflr", {}, ggn),
                                 ("kfac", {"mc_samples": 2, "seed": 3}, _dense_blocks(problem, "fisher_mc",
                                                                                      mc_samples=2, seed=3))):
        blocks = _blocks(cd.metric(problem, kind, damping=1e-3, **options))
        for name in exact:
            torch.testing.assert_close(blocks[name], truth[name], rtol=1e-8, atol=1e-12, msg=name)
    small = kfac(problem, damping=1e-3, exact=True, dense_max=20)  # pos_embed (80 entries): its exact diagonal
    block = next(b for b in small.blocks if b.name == "pos_embed")
    assert block.diagonal
    torch.testing.assert_close(block.dense(0.0), torch.diag(ggn["pos_embed"].diagonal()), rtol=1e-8, atol=1e-12)
    again = KFACMetric.from_state_dict(small.state_dict())  # a diagonal block survives the round trip
    torch.testing.assert_close(again.to_dense(), small.to_dense(), rtol=1e-12, atol=0)
    assert again.factors()["pos_embed"][0].shape == (80,)


# ---------------------------------------------------------------------------------------------- norms
class _Normed(nn.Module):
    """Tokens → embedding → RMSNorm (torch) → a custom RMSNorm class (exact generic block) → mean → head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(7, 4)
        self.rms = nn.RMSNorm(4, eps=1e-5)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.rms.weight.uniform_(0.5, 1.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.rms(self.emb(idx))
        h = self.scale * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head(torch.tanh(h).mean(1))


def test_rmsnorm_and_unknown_norm_classes_get_exact_blocks() -> None:
    model = _Normed().double()
    X = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(1))
    problem = cd.Problem(model, "cross_entropy", (X, torch.tensor([0, 1, 2, 0, 1])), batch_size=2)
    M = kfac(problem, damping=1e-3, exact=True)
    dense = _dense_blocks(problem)
    for name in ("rms.weight", "scale", "head.bias"):
        torch.testing.assert_close(_blocks(M)[name], dense[name], rtol=1e-8, atol=1e-12, msg=name)


def test_parameters_whose_samples_are_coupled_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    X = torch.randn(6, 3, dtype=torch.float64)
    problem = cd.Problem(model.eval(), "cross_entropy", (X, torch.arange(6) % 2))
    model.train()
    with pytest.raises(MetricError, match=r"'1' \(BatchNorm1d\): BatchNorm in train mode.*\['1.weight', '1.bias'\]"):
        kfac(problem, damping=1e-3, backend="torch")
