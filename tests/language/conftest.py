"""Tiny Hugging Face language models (GPT-2 and LLaMA style, random seeded weights from a config) on a seeded
synthetic corpus with padding and −100 labels: the shared cases of the language-model tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import curvdist as cd
from curvdist.zoo import hf_causal_lm, markov_corpus

pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the dev install")

VOCAB = 12
CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2},
    "llama": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 8, "intermediate_size": 12,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 8},
}


@dataclass
class LMCase:
    name: str
    model: nn.Module
    data: dict[str, torch.Tensor]

    def close(self, got: torch.Tensor, expected: torch.Tensor) -> None:
        """float64 agreement. LLaMA's RMSNorm normalizes in float32 whatever the model's dtype (transformers
        casts up to float32 and back), so its derivatives agree to float32 rounding (relative to the largest entry)
        rather than float64's; GPT-2 is float64 throughout."""
        if self.name == "llama":
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
        else:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)

    def problem(self, **kw: Any) -> cd.Problem:
        kw.setdefault("batch_size", 3)
        return cd.Problem(self.model, kw.pop("loss", "causal_lm"), self.data, **kw)


def make_case(name: str, n: int = 4, labels: str = "causal") -> LMCase:
    model = hf_causal_lm(CONFIGS[name], seed=1, dtype="float64")
    data = markov_corpus(n=n, vocab_size=VOCAB, max_length=6, min_length=3, seed=2, labels=labels)
    data["labels"][0, 2] = -100  # an ignored label inside a sequence, besides the padding
    return LMCase(name, model, data)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def lm(request: pytest.FixtureRequest) -> LMCase:
    return make_case(request.param)
