"""Bad token input: each a one-line curvdist error naming the cause, never a traceback from inside torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import curvdist as cd
from curvdist.problem.outputs import ModelOutputError

from .conftest import VOCAB, make_case


@pytest.fixture(scope="module")
def case():
    return make_case("gpt2")


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_labels_outside_the_vocabulary(case) -> None:
    data = dict(case.data, labels=case.data["labels"].clone())
    data["labels"][1, 2] = VOCAB + 3
    with pytest.raises(cd.DataError, match=rf"labels must lie in \[0, {VOCAB - 1}\].*got range \[\d+, {VOCAB + 3}\]") as e:
        cd.Problem(case.model, "causal_lm", data, batch_size=2)
    _one_line(e)


def test_labels_outside_the_vocabulary_in_a_later_batch(case) -> None:
    data = dict(case.data, labels=case.data["labels"].clone())
    data["labels"][-1, 1] = -5
    with pytest.raises(cd.DataError, match="labels must lie in"):
        cd.Problem(case.model, "causal_lm", data, batch_size=1)


def test_all_labels_ignored(case) -> None:
    data = dict(case.data, labels=torch.full_like(case.data["labels"], -100))
    with pytest.raises(cd.DataError, match=r"no terms: every label is ignored \(-100\)") as e:
        cd.Problem(case.model, "causal_lm", data, batch_size=2)
    _one_line(e)


def test_mismatched_input_ids_and_labels(case) -> None:
    batch = {k: v[:2] for k, v in case.data.items()}
    batch["labels"] = batch["labels"][:, :-1]
    with pytest.raises(cd.DataError, match=r"labels of shape \(2, 5\) do not match the logits' .* = \(2, 6\)") as e:
        cd.Problem(case.model, "causal_lm", [batch])
    _one_line(e)


def test_a_mapping_whose_tensors_differ_in_length(case) -> None:
    batch = {k: v[:2] for k, v in case.data.items()}
    batch["attention_mask"] = case.data["attention_mask"][:3]
    with pytest.raises(cd.DataError, match="one length along the first axis"):
        cd.Problem(case.model, "causal_lm", [batch])


def test_a_ragged_batch_mapping(case) -> None:
    batch = {"input_ids": [[1, 2, 3], [4, 5]], "labels": case.data["labels"][:2]}
    with pytest.raises(cd.DataError, match=r"'input_ids' is a ragged list \(pad the sequences") as e:
        cd.Problem(case.model, "causal_lm", [batch])
    _one_line(e)


def test_a_mapping_without_labels(case) -> None:
    batch = {k: v for k, v in case.data.items() if k != "labels"}
    with pytest.raises(cd.DataError, match="without a 'labels' key"):
        cd.Problem(case.model, "causal_lm", [batch])


class _NoLogits(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.inner(**inputs).logits}


def test_an_output_without_logits(case) -> None:
    with pytest.raises(ModelOutputError, match=r"returned a dict without 'logits' \(keys \['hidden'\]\)") as e:
        cd.Problem(_NoLogits(case.model), "causal_lm", case.data, batch_size=2)
    assert isinstance(e.value, cd.ProblemError)
    _one_line(e)


def test_outputs_as_dict_tuple_and_model_output_agree(case) -> None:
    class AsTuple(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.inner(**inputs).logits,)

    ref = cd.Problem(case.model, "causal_lm", case.data, batch_size=2).value()
    assert cd.Problem(AsTuple(case.model), "causal_lm", case.data, batch_size=2).value() == ref


def test_a_raw_model_output_reaching_a_loss_is_a_curvdist_error(case) -> None:
    """A user who hands the Hugging Face output object to a loss directly gets a DataError, not AttributeError."""
    out = case.model(input_ids=case.data["input_ids"][:2])
    with pytest.raises(cd.DataError, match="ModelOutput|logits"):
        cd.Problem(case.model, "causal_lm", case.data).loss.check(out, case.data["labels"][:2])


def test_import_curvdist_does_not_import_transformers() -> None:
    code = "import sys, curvdist, curvdist.zoo; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_names_the_extra(monkeypatch) -> None:
    import importlib.util

    from curvdist.integrations import hf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(cd.DependencyError, match=r"curvdist\[hf\]"):
        hf.import_transformers()
