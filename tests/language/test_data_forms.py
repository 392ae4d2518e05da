"""The data forms of token batches give one problem: a mapping, a list of mapping batches, a Dataset of dicts,
and the sequence-classification twin of the zoo's language models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import curvdist as cd
from curvdist.zoo import hf_sequence_classifier

from .conftest import CONFIGS, make_case


class _Rows(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def test_mapping_list_and_dataset_of_dicts_agree() -> None:
    case = make_case("gpt2")
    ref = cd.Problem(case.model, "causal_lm", case.data, batch_size=2)
    batches = [{k: v[i:i + 2] for k, v in case.data.items()} for i in range(0, 4, 2)]
    listed = cd.Problem(case.model, "causal_lm", batches)
    rows = cd.Problem(case.model, "causal_lm", _Rows(case.data), batch_size=2)
    for p in (listed, rows):
        assert p.num_samples == ref.num_samples and p.num_batches == ref.num_batches == 2
        assert p.value() == pytest.approx(ref.value(), rel=1e-14)
    v = torch.randn(ref.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(cd.operator(rows, "ggn") @ v, cd.operator(ref, "ggn") @ v, rtol=1e-12, atol=1e-15)


def test_sequence_classifier_with_cross_entropy() -> None:
    cfg = dict(CONFIGS["gpt2"], num_labels=3, pad_token_id=0)
    model = hf_sequence_classifier(cfg, seed=1, dtype="float64")
    case = make_case("gpt2")
    data = {"input_ids": case.data["input_ids"], "attention_mask": case.data["attention_mask"],
            "labels": torch.tensor([0, 2, 1, 2])}
    problem = cd.Problem(model, "cross_entropy", data, batch_size=4)
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    assert logits.shape == (4, 3)
    assert problem.value() == pytest.approx(float(F.cross_entropy(logits, data["labels"])), rel=1e-13)
