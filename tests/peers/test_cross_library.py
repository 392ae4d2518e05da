"""Agreement with curvlinops (an independent implementation) on the digits MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvdist as cd
from curvdist import zoo

curvlinops = pytest.importorskip("curvlinops")


@pytest.fixture(scope="module")
def setup():
    model = zoo.mlp(64, (12,), 10, "tanh", seed=0, dtype="float64").eval()
    X, y = zoo.digits(n=300, dtype="float64")
    batches = [(X[i : i + 128], y[i : i + 128]) for i in range(0, len(X), 128)]
    return model, batches


@pytest.mark.parametrize("kind,cls", [("hessian", "HessianLinearOperator"), ("ggn", "GGNLinearOperator")])
def test_matvecs_agree_with_curvlinops(setup, kind, cls):
    model, batches = setup
    params = [p for p in model.parameters()]
    theirs = getattr(curvlinops, cls)(model, torch.nn.CrossEntropyLoss(reduction="mean"), params, batches)
    ours = cd.operator(cd.Problem(model, "cross_entropy", batches), kind)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(ours.dim, 3, generator=g, dtype=torch.float64)
    expected = theirs.to_scipy() @ V.numpy()
    got = np.stack([ours.matvec(V[:, j]).numpy() for j in range(3)], 1)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
