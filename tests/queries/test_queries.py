"""Queries on real operators against dense ground truth; result records and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import curvdist as cd
from tests import dense
from tests.cases import CASES, make_problem


@pytest.fixture(scope="module")
def cnn():
    case = CASES["cnn"]()
    model = case.model()
    problem = make_problem(case, model=model)
    return problem, dense.dense_hessian(model, case.loss, case.X, case.y, "mean"), \
        dense.dense_ggn(model, case.loss, case.X, case.y, "mean")


def test_eigs_of_every_case_match_dense(case):
    model = case.model()
    problem = make_problem(case, model=model)
    H = dense.dense_hessian(model, case.loss, case.X, case.y, "mean")
    s = torch.linalg.eigvalsh(H)
    r = cd.eigs(cd.operator(problem, "hessian"), k=3, tol=1e-10)
    np.testing.assert_allclose(r.value, s.flip(0)[:3].numpy(), rtol=1e-8, atol=1e-10 * float(s.abs().max()))
    bottom = cd.eigs(cd.operator(problem, "hessian"), k=2, which="smallest", tol=1e-10)
    np.testing.assert_allclose(bottom.value, s[:2].numpy(), rtol=1e-7, atol=1e-9 * float(s.abs().max()))
    assert r.converged and r.matvecs == r.info["iterations"] and r.curvature == "hessian"


def test_trace_queries(cnn):
    problem, H, _ = cnn
    op = cd.operator(problem, "hessian")
    true = float(torch.trace(H))
    exact = cd.trace(op, method="exact")
    assert exact.value == pytest.approx(true, rel=1e-10) and exact.matvecs == problem.dim
    for method in ("hutchinson", "hutchpp", "xtrace"):
        r = cd.trace(op, method=method, matvecs=90, seed=3)
        assert abs(r.value - true) <= 4 * r.stderr, (method, r.value, true, r.stderr)
        assert r.matvecs <= 90 and r.seed == 3 and r.info["method"] == method


def test_diag_query(cnn):
    problem, _, G = cnn
    r = cd.diag(cd.operator(problem, "ggn"), method="xdiag", matvecs=2 * problem.dim, seed=0)
    # 2·d matvecs: the sketch spans the whole space, so XDiag is exact up to rounding
    torch.testing.assert_close(r.value, torch.diagonal(G), rtol=1e-7, atol=1e-10)


def test_logdet_and_density(cnn):
    problem, _, G = cnn
    op = cd.operator(problem, "ggn")
    delta = 1e-2
    true = float(torch.logdet(G + delta * torch.eye(problem.dim, dtype=torch.float64)))
    r = cd.logdet(op, damping=delta, probes=10, steps=40, seed=1)
    assert abs(r.value - true) <= 3 * r.stderr, (r.value, true, r.stderr)
    with pytest.raises(cd.NotPositiveDefiniteError):
        cd.logdet(cd.operator(problem, "hessian"), probes=1, steps=60)
    d = cd.density(op, probes=3, steps=40)
    grid, phi = d.value["grid"], d.value["density"]
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-3)
    lo, hi = d.info["support"]
    eig = torch.linalg.eigvalsh(G)
    assert lo >= float(eig[0]) - 1e-8 and hi <= float(eig[-1]) + 1e-8
    assert hi == pytest.approx(float(eig[-1]), rel=1e-6)  # 40 steps resolve the top eigenvalue


@pytest.mark.parametrize("metric", [None, "kflr"])
def test_block_products_give_the_single_product_estimates(cnn, metric):
    """block=k: the probes' products batched k at a time (op.apply_vectors; the metric's factors per vector) — the
    same trace, log-det and density as one product at a time, up to rounding (float64), with the same budget."""
    problem, _, _ = cnn
    op = cd.operator(problem, "ggn")
    M = cd.metric(problem, metric, damping=0.1) if metric else None
    sizes: list[int] = []
    block_apply = op.apply_vectors
    op.apply_vectors = lambda vs, **kw: (sizes.append(len(vs)), block_apply(vs, **kw))[1]  # count the blocks
    for method in ("hutchinson", "hutchpp", "xtrace"):
        single = cd.trace(op, method=method, matvecs=24, seed=2, metric=M)
        batched = cd.trace(op, method=method, matvecs=24, seed=2, metric=M, block=5)
        assert batched.value == pytest.approx(single.value, rel=1e-10) and batched.matvecs == single.matvecs
    assert sizes and max(sizes) == 5 and sum(sizes) == 3 * 24 - 24 % 2  # xtrace uses an even budget
    single = cd.logdet(op, damping=0.01, probes=4, steps=15, seed=1, metric=M)
    batched = cd.logdet(op, damping=0.01, probes=4, steps=15, seed=1, metric=M, block=3)
    assert batched.value == pytest.approx(single.value, rel=1e-9)
    d1 = cd.density(op, probes=3, steps=12, seed=0, metric=M)
    d2 = cd.density(op, probes=3, steps=12, seed=0, metric=M, block=3)
    np.testing.assert_allclose(d2.value["density"], d1.value["density"], rtol=1e-7, atol=1e-9)
    with pytest.raises(cd.SolverError, match="block must be a positive integer"):
        cd.trace(op, matvecs=12, block=0)


def test_result_records_and_json(mlp_problem):
    r = cd.trace(cd.operator(mlp_problem, "ggn"), method="hutchpp", matvecs=12, seed=4)
    d = json.loads(r.to_json())
    for key in ("query", "curvature", "metric", "coordinates", "value", "stderr", "matvecs", "seconds",
                "converged", "seed", "dtype", "backend"):
        assert key in d
    assert d["metric"] == "euclidean" and d["coordinates"] == "theta" and d["dtype"] == "float64"
    with pytest.raises(Exception):
        r.value = 0  # frozen
    diag = cd.diag(cd.operator(mlp_problem, "ggn"), matvecs=8)
    assert len(json.loads(diag.to_json())["value"]) == mlp_problem.dim
    e = cd.eigs(cd.operator(mlp_problem, "ggn"), k=2, return_vectors=True)
    assert len(e.vectors) == 2 and "vectors" not in e.to_dict()


def test_float32_eigs():
    case = CASES["mlp"]()
    model = case.model()
    H = dense.dense_hessian(model, case.loss, case.X, case.y, "mean")
    p32 = cd.Problem(case.model().float(), case.loss, (case.X.float(), case.y))
    r = cd.eigs(cd.operator(p32, "hessian"), k=2)
    assert r.dtype == "float32" and r.converged
    np.testing.assert_allclose(r.value, torch.linalg.eigvalsh(H).flip(0)[:2].numpy(), rtol=1e-4)


def test_queries_reject_bad_input(mlp_problem):
    op = cd.operator(mlp_problem, "hessian")
    with pytest.raises(cd.SolverError, match=f"k={mlp_problem.dim + 1} eigenvalues requested"):
        cd.eigs(op, k=mlp_problem.dim + 1)
    with pytest.raises(cd.UnknownNameError, match="unknown trace method 'hutch\\+'; choose one of: hutchinson"):
        cd.trace(op, method="hutch+")
    with pytest.raises(cd.UnknownNameError, match="unknown diagonal method 'xdiagg'; choose one of: hutchinson, xdiag"):
        cd.diag(op, method="xdiagg")
    with pytest.raises(cd.UnknownNameError, match="unknown logdet method 'lanczos'; choose one of: slq, exact"):
        cd.logdet(op, method="lanczos")
    with pytest.raises(cd.ProblemError, match="expected a curvature operator"):
        cd.eigs(torch.eye(3), k=1)
    with pytest.raises(cd.SolverError, match="damping"):
        cd.logdet(op, damping=-1.0)
