"""Every query and metric on a tiny GPT-2 (float64), against one dense GGN from explicit products.

The dense GGN here is built column by column from ``cd.operator(problem, "ggn")``, whose products are checked
against plain-autograd truth in ``test_token_products.py``; the queries' solvers (Lanczos, Hutch++, SLQ, CG) and
the metrics' own kernels are what is tested.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import curvdist as cd
from curvdist.zoo import hf_causal_lm

from .conftest import CONFIGS, make_case


@pytest.fixture(scope="module")
def setup():
    case = make_case("gpt2")
    problem = case.problem(batch_size=4)
    op = cd.operator(problem, "ggn")
    G = op.to_dense()
    return case, problem, op, 0.5 * (G + G.T)


def test_eigs_trace_logdet_density_of_the_ggn(setup) -> None:
    _, problem, op, G = setup
    lam = torch.linalg.eigvalsh(G).flip(0)
    np.testing.assert_allclose(cd.eigs(op, k=2, tol=1e-10).value, lam[:2].numpy(), rtol=1e-7)
    assert cd.trace(op, method="exact").value == pytest.approx(float(G.trace()), rel=1e-10)
    est = cd.trace(op, method="hutchpp", matvecs=300, seed=2)
    assert abs(est.value - float(G.trace())) <= 0.1 * float(G.trace())
    ld = cd.logdet(op, damping=0.1, probes=10, steps=30, seed=1)
    exact = float(torch.logdet(G + 0.1 * torch.eye(problem.dim, dtype=G.dtype)))
    assert abs(ld.value - exact) <= 4 * ld.stderr + 1e-3 * abs(exact)
    dens = cd.density(op, probes=2, steps=30)
    assert dens.info["support"][1] >= 0.99 * float(lam[0])


def test_diag_ggn_and_the_diagonal_estimator(setup) -> None:
    _, problem, op, G = setup
    M = cd.metric(problem, "diag_ggn", damping=1e-3)  # positions no sequence reaches have zero curvature
    torch.testing.assert_close(M.apply_undamped(torch.ones(problem.dim, dtype=G.dtype)), torch.diagonal(G),
                               rtol=1e-9, atol=1e-13)


def test_fisher_metric_solves_with_the_dense_matrix(setup) -> None:
    _, problem, op, G = setup
    M = cd.metric(problem, "fisher", damping=0.1)
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(0), dtype=G.dtype)
    A = G + 0.1 * torch.eye(problem.dim, dtype=G.dtype)
    torch.testing.assert_close(M.solve(v), torch.linalg.solve(A, v), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["kfac", "kflr"])
def test_kronecker_metrics_cover_every_gpt2_parameter(setup, kind: str) -> None:
    _, problem, _, _ = setup
    M = cd.metric(problem, kind, damping=1e-2)
    assert M.dim == problem.dim
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(M.apply(M.solve(v)), v, rtol=1e-8, atol=1e-10)


def test_model_from_a_local_directory_equals_the_saved_one(tmp_path: Path) -> None:
    case = make_case("gpt2")
    case.model.save_pretrained(tmp_path / "tiny")
    loaded = hf_causal_lm(path=str(tmp_path / "tiny"), dtype="float64")
    a = case.problem().value()
    b = cd.Problem(loaded, "causal_lm", case.data, batch_size=3).value()
    assert a == pytest.approx(b, rel=1e-14)
    with pytest.raises(cd.ConfigError, match="not a local directory"):
        hf_causal_lm(path=str(tmp_path / "missing"))
    with pytest.raises(cd.ConfigError, match="exactly one of config"):
        hf_causal_lm(CONFIGS["gpt2"], path=str(tmp_path / "tiny"))
