from __future__ import annotations

import pytest
import torch

import curvdist as cd

from .cases import CASES, Case


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]()


@pytest.fixture(params=["mean", "sum"])
def reduction(request: pytest.FixtureRequest) -> str:
    return request.param


def make_problem(case: Case, reduction: str = "mean", model: torch.nn.Module | None = None) -> cd.Problem:
    model = case.model() if model is None else model
    return cd.Problem(model, case.loss, (case.X, case.y), batch_size=case.batch_size, reduction=reduction)


@pytest.fixture
def mlp_problem() -> cd.Problem:
    return make_problem(CASES["mlp"]())
