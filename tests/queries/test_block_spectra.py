"""Block-wise invariant spectra: per-block generalized eigenvalues against dense float64 ground truth, the exact
trace identity for block-diagonal metrics, and invariance under within-block reparametrizations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import curvdist as cd
from curvdist.errors import SolverError
from curvdist.geometry.reparam import scale
from curvdist.queries.blocks import block_spectra, partition
from tests.cases import CASES, make_problem
from tests.dense import dense_ggn


def _gen_eigs(C: np.ndarray, M: np.ndarray) -> np.ndarray:
    return np.sort(scipy.linalg.eigh(C, M, eigvals_only=True))[::-1]


@pytest.mark.parametrize("name", ["mlp", "token_transformer", "cnn_bn"])
@pytest.mark.parametrize("metric", ["kfac", "diag_ggn", "fisher"])
def test_block_spectra_match_dense_blocks(name: str, metric: str) -> None:
    case = CASES[name]()
    problem = make_problem(case)
    r = block_spectra(problem, "ggn", metric, damping=1e-2, k=4)
    G = dense_ggn(case.model(), case.loss, case.X, case.y, "mean").numpy()  # plain autograd, float64
    M = cd.metric(problem, metric, 1e-2).to_dense().numpy()
    offsets = np.cumsum([0] + [s.numel() for s in problem.shapes])
    index = {n: range(offsets[i], offsets[i + 1]) for i, n in enumerate(problem.param_names)}
    union = []
    for block, params in partition(problem, "layer").items():
        idx = np.concatenate([np.asarray(index[p]) for p in params])
        expected = _gen_eigs(G[np.ix_(idx, idx)], M[np.ix_(idx, idx)])
        np.testing.assert_allclose(r.value["blocks"][block]["eigenvalues"], expected, rtol=1e-8, atol=1e-10)
        union.append(expected)
    full = _gen_eigs(G, M)
    top = np.sort(np.concatenate(union))[::-1][:4]
    np.testing.assert_allclose(r.value["full_top"], full[:4], rtol=1e-8)
    np.testing.assert_allclose(r.value["full_trace"], full.sum(), rtol=1e-8)
    np.testing.assert_allclose(r.value["top_rel_error"], np.abs(top - full[:4]) / full[:4], rtol=1e-6, atol=1e-10)
    assert max(r.value["top_rel_error"]) > 1e-5  # dropping the cross-block terms changes the top eigenvalues
    if metric != "fisher":  # block-diagonal metric: the traces agree exactly
        assert r.value["trace_rel_error"] < 1e-9


def test_parameter_block_spectra_are_invariant_under_elementwise_scaling() -> None:
    """θ = c ⊙ ψ with factors over four orders of magnitude: the GGN and the diagonal-GGN metric are both tensors
    under a diagonal Jacobian, so every per-parameter spectrum of M_b⁻¹C_b is unchanged; Euclidean ones are not."""
    case = CASES["mlp_mse"]()
    theta = make_problem(case)
    g = torch.Generator().manual_seed(0)
    factors = {n: 10.0 ** (4 * torch.rand(s, generator=g, dtype=torch.float64) - 2)
               for n, s in zip(theta.param_names, theta.shapes)}
    psi = cd.reparametrize(theta, scale(factors))
    for metric, same in (("diag_ggn", True), (None, False)):
        a = block_spectra(theta, "ggn", metric, damping=0.0, groups="parameter", compare=False).value["blocks"]
        b = block_spectra(psi, "ggn", metric, damping=0.0, groups="parameter", compare=False).value["blocks"]
        for name_t, name_p in zip(a, b):
            close = np.allclose(a[name_t]["eigenvalues"], b[name_p]["eigenvalues"], rtol=1e-8, atol=1e-12)
            assert close == same, (metric, name_t)


def test_blocks_must_partition_the_parameters(mlp_problem: cd.Problem) -> None:
    with pytest.raises(SolverError, match="must partition"):
        block_spectra(mlp_problem, groups={"a": ["0.weight"]})
    with pytest.raises(cd.UnknownNameError, match="unknown block grouping .*; choose one of: layer, parameter"):
        block_spectra(mlp_problem, groups="module")



def test_large_blocks_by_lanczos_agree_with_dense_blocks(mlp_problem: cd.Problem) -> None:
    dense = block_spectra(mlp_problem, "ggn", "kflr", damping=1e-2, k=2, compare=False).value["blocks"]
    iterative = block_spectra(mlp_problem, "ggn", "kflr", damping=1e-2, k=2, compare=False, dense_block_dim=10,
                              trace_matvecs=400).value["blocks"]
    for name, d in dense.items():
        it = iterative[name]
        if d["dim"] <= 10:
            assert it["method"] == "dense"
            continue
        assert it["method"].startswith("lanczos")
        np.testing.assert_allclose(it["eigenvalues"], d["eigenvalues"][:2], rtol=1e-6)
        assert abs(it["trace"] - d["trace"]) <= 0.1 * abs(d["trace"])
