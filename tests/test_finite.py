"""``all_finite`` decides what the elementwise ``torch.isfinite(t).all()`` decides, including the cases where the
sum it starts from misleads: entries that overflow the sum, and infinities of both signs that cancel to NaN."""

from __future__ import annotations

import pytest
import torch

import curvdist as cd
from curvdist.errors import SolverError
from curvdist.finite import all_finite

BIG = {torch.float16: 6e4, torch.bfloat16: 3e38, torch.float32: 3e38, torch.float64: 1.7e308}


def _cases(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    cases = {"finite": x, "empty": x[:0], "overflowing sum": torch.full((8,), BIG[dtype], dtype=dtype),
             "overflowing sum, both signs": torch.tensor([BIG[dtype]] * 4 + [-BIG[dtype]] * 4, dtype=dtype)}
    for name, bad in [("nan", float("nan")), ("+inf", float("inf")), ("-inf", float("-inf"))]:
        y = x.clone()
        y[417] = bad
        cases[name] = y
    y = x.clone()
    y[3], y[900] = float("inf"), float("-inf")  # the sum is NaN
    cases["+inf and -inf"] = y
    return cases


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_the_elementwise_test(dtype):
    for name, t in _cases(dtype).items():
        for u in (t, t[1::2]):  # and a strided view (odd entries: the bad ones at 417 and 3 stay in it)
            assert all_finite(u) is bool(torch.isfinite(u).all()), name
    assert not torch.isfinite(_cases(dtype)["overflowing sum"].sum())  # the case the fallback exists for


def test_all_finite_of_complex_integer_and_boolean_tensors():
    z = torch.randn(10, dtype=torch.complex128)
    assert all_finite(z)
    z[4] = complex(0.0, float("nan"))
    assert not all_finite(z)
    assert all_finite(torch.arange(10)) and all_finite(torch.ones(3, dtype=torch.bool))


def test_a_solve_refuses_a_product_that_turns_nan():
    """The check every product of a solve passes through still refuses a NaN: a Hessian whose products turn NaN
    after the third (one entry of 7)."""
    from curvdist import zoo

    problem = cd.Problem(zoo.mlp(in_features=64, hidden=[4], out_features=10, seed=0).double(), "cross_entropy",
                         zoo.digits(n=20, dtype="float64"))
    op = cd.operator(problem, "hessian")
    calls = []
    plain = op.apply_vector

    def sick(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        out = plain(v)
        if len(calls) > 3:
            out[7] = float("nan")
        return out

    op.apply_vector = sick
    with pytest.raises(SolverError, match="NaN or inf during the solve"):
        cd.eigs(op, k=1, tol=1e-12)
    assert len(calls) == 4
