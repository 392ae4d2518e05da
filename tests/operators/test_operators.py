"""Every curvature operator against its dense float64 definition, on every shared case and both reductions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvdist as cd
from tests import dense
from tests.cases import CASES, make_problem

TRUTH = {
    "hessian": dense.dense_hessian,
    "ggn": dense.dense_ggn,
    "fisher": dense.dense_ggn,  # checked against the Fisher's definition separately below
    "empirical_fisher": dense.dense_empirical_fisher,
}


@pytest.mark.parametrize("kind", sorted(TRUTH))
def test_operator_matches_dense_definition(case, reduction, kind):
    model = case.model()
    problem = make_problem(case, reduction, model)
    expected = TRUTH[kind](model, case.loss, case.X, case.y, reduction)
    op = cd.operator(problem, kind)
    D = op.to_dense()
    torch.testing.assert_close(D, expected, rtol=1e-9, atol=1e-11)
    # a single matvec (not the vectorized path) agrees too
    v = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matvec(v), expected @ v, rtol=1e-9, atol=1e-11)


def test_fisher_equals_its_definition_by_label_enumeration(reduction):
    case = CASES["mlp"]()
    model = case.model()
    F = cd.operator(make_problem(case, reduction, model), "fisher").to_dense()
    torch.testing.assert_close(F, dense.dense_fisher_by_enumeration(model, case.X, case.y, reduction),
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "cnn"])
def test_fisher_mc_matches_outer_products_of_sampled_label_gradients(name, reduction):
    case = CASES[name]()
    model = case.model()
    problem = make_problem(case, reduction, model)
    op = cd.operator(problem, "fisher_mc", mc_samples=3, seed=7)
    D = op.to_dense()
    expected = torch.zeros_like(D)
    for b, (X, y) in enumerate(problem.batches()):
        with torch.no_grad():
            out = model(X)
        for t in op.sampled_targets(out, b):
            G = dense.per_sample_grads(model, case.loss, X, t)
            expected += G.T @ G / 3
    expected *= dense.scale(reduction, len(case.X))
    torch.testing.assert_close(D, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["mlp", "mlp_mse"])
def test_fisher_mc_converges_to_fisher(name):
    case = CASES[name]()
    problem = make_problem(case)
    F = cd.operator(problem, "fisher").to_dense()
    errs = []
    for S in (1, 400):
        errs.append(np.mean([float((cd.operator(problem, "fisher_mc", mc_samples=S, seed=s).to_dense() - F).norm())
                             for s in range(3)]) / float(F.norm()))
    # Monte-Carlo error decays like 1/sqrt(S): 20x fewer error expected, demand at least 8x
    assert errs[1] < errs[0] / 8, errs
    assert errs[1] < 0.1


def test_fisher_mc_is_reproducible_and_seed_dependent(mlp_problem):
    a = cd.operator(mlp_problem, "fisher_mc", seed=1).to_dense()
    b = cd.operator(mlp_problem, "fisher_mc", seed=1).to_dense()
    c = cd.operator(mlp_problem, "fisher_mc", seed=2).to_dense()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_vector_forms(mlp_problem):
    op = cd.operator(mlp_problem, "ggn")
    H = op.to_dense()
    v = torch.randn(op.dim, dtype=torch.float64)
    parts = mlp_problem.unflatten(v)
    out_seq = op.matvec(list(parts))
    assert isinstance(out_seq, tuple) and [t.shape for t in out_seq] == [p.shape for p in parts]
    torch.testing.assert_close(mlp_problem.flatten(out_seq), H @ v)
    out_dict = op.matvec(dict(zip(mlp_problem.param_names, parts)))
    assert list(out_dict) == list(mlp_problem.param_names)
    torch.testing.assert_close(mlp_problem.flatten(out_dict), H @ v)
    torch.testing.assert_close(op @ v, H @ v)


def test_scipy_export(mlp_problem):
    from scipy.sparse.linalg import eigsh

    op = cd.operator(mlp_problem, "hessian")
    H = op.to_dense()
    A = op.to_scipy()
    x = np.random.default_rng(0).standard_normal(op.dim)
    np.testing.assert_allclose(A @ x, (H @ torch.from_numpy(x)).numpy(), rtol=1e-10, atol=1e-12)
    top = eigsh(A, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), torch.linalg.eigvalsh(H)[-2:].numpy(), rtol=1e-8)


def test_float32_agrees_with_float64():
    case = CASES["mlp"]()
    m64 = case.model()
    m32 = case.model().float()
    p64 = make_problem(case, model=m64)
    p32 = cd.Problem(m32, case.loss, (case.X.float(), case.y), batch_size=case.batch_size)
    assert p32.dtype == torch.float32
    for kind in ("hessian", "ggn"):
        D32 = cd.operator(p32, kind).to_dense()
        assert D32.dtype == torch.float32
        torch.testing.assert_close(D32.double(), cd.operator(p64, kind).to_dense(), rtol=1e-4, atol=1e-5)


def test_parameter_subset():
    case = CASES["mlp"]()
    model = case.model()
    full = dense.dense_hessian(model, case.loss, case.X, case.y, "mean")
    problem = cd.Problem(model, case.loss, (case.X, case.y), params=["2.weight", "2.bias"], batch_size=4)
    n_first = sum(p.numel() for n, p in model.named_parameters() if n.startswith("0."))
    assert problem.dim == full.shape[0] - n_first
    torch.testing.assert_close(cd.operator(problem, "hessian").to_dense(), full[n_first:, n_first:])


def test_fisher_mc_rejects_bad_sample_count(mlp_problem):
    with pytest.raises(cd.ProblemError, match="mc_samples"):
        cd.operator(mlp_problem, "fisher_mc", mc_samples=0)


def test_operator_rejects_unknown_kind_and_options(mlp_problem):
    with pytest.raises(cd.UnknownNameError, match="unknown curvature kind 'hesian'; choose one of: hessian, ggn"):
        cd.operator(mlp_problem, "hesian")
    with pytest.raises(cd.ProblemError, match="invalid options"):
        cd.operator(mlp_problem, "hessian", mc_samples=3)


def test_matvec_rejects_wrong_shapes(mlp_problem):
    op = cd.operator(mlp_problem, "hessian")
    with pytest.raises(cd.ShapeError, match=f"length {op.dim}"):
        op.matvec(torch.zeros(op.dim + 1, dtype=torch.float64))
    with pytest.raises(cd.ShapeError, match="shape"):
        op.matvec([torch.zeros(3, dtype=torch.float64)] * len(mlp_problem.shapes))


def test_to_dense_refuses_large_dimension(mlp_problem):
    with pytest.raises(cd.SolverError, match="max_dim"):
        cd.operator(mlp_problem, "ggn").to_dense(max_dim=10)
