from __future__ import annotations

import pytest

import curvdist as cd

from .cases import CASES, Case, make_problem


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]()


@pytest.fixture(params=["mean", "sum"])
def reduction(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def mlp_problem() -> cd.Problem:
    return make_problem(CASES["mlp"]())
