"""EKFAC (George et al. 2018): corrected eigenvalues against the dense float64 curvature in the Kronecker eigenbasis
(autograd truth), against curvlinops' ``EKFACLinearOperator``, every metric operation against the dense block
Q diag(E) Qᵀ formed here, the state round trip, invariance under per-tensor scalings, sharded statistics, the
identity basis of a vocabulary side, and the refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import curvdist as cd
from curvdist.errors import MetricError
from curvdist.geometry.metrics.kfac import KFACMetric
from tests import dense
from tests.cases import CASES, make_problem, two_shard_problem

TRUTH = {"type2": lambda m, c, r: dense.dense_ggn(m, c.loss, c.X, c.y, r),
         "empirical": lambda m, c, r: dense.dense_empirical_fisher(m, c.loss, c.X, c.y, r)}


def _basis(block: object) -> Tensor:
    """Q = Q₁ ⊗ Q₂ of a corrected block (identity where its basis is None)."""
    sizes = (block.shape[0], block.shape[1:].numel())  # type: ignore[attr-defined]
    return torch.kron(*[torch.eye(n, dtype=torch.float64) if U is None else U.contiguous()
                        for U, n in zip(block.evecs, sizes)])  # type: ignore[attr-defined]


def _truth_blocks(M: KFACMetric, C: Tensor) -> dict[str, Tensor]:
    """Per block of M: for a corrected block Q diag(diag(Qᵀ C_W Q)) Qᵀ, else C's block itself."""
    out, i = {}, 0
    for b in M.blocks:
        n = b.numel
        Cb = C[i:i + n, i:i + n]
        if b.corrected is not None:
            Q = _basis(b)
            Cb = (Q * torch.diagonal(Q.T @ Cb @ Q)) @ Q.T
        out[b.name] = Cb
        i += n
    return out


@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "cnn", "token_transformer"])
@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
def test_corrected_eigenvalues_are_the_curvature_diagonal_in_the_kronecker_eigenbasis(name: str,
                                                                                       fisher_type: str) -> None:
    """E = diag(Qᵀ C_W Q) for the dense float64 GGN / empirical Fisher from autograd; every other block (biases,
    norms, positional embeddings) is the exact curvature block; and apply/solve/M^{-1/2}/logdet are those of the
    dense metric built from the truth."""
    case = CASES[name]()
    problem = make_problem(case)
    model = problem.model
    C = TRUTH[fisher_type](model, case, "mean")
    M = cd.metric(problem, "ekfac", damping=0.3, fisher_type=fisher_type)
    assert M.kind == "ekfac" and any(b.corrected is not None for b in M.blocks)
    truth = _truth_blocks(M, C)
    for b in M.blocks:
        torch.testing.assert_close(b.dense(0.0), truth[b.name], rtol=1e-9, atol=1e-12 * float(C.abs().max()),
                                   msg=f"{name} {fisher_type} {b.name}")
    D = torch.block_diag(*[truth[b.name] for b in M.blocks]) + 0.3 * torch.eye(problem.dim, dtype=torch.float64)
    v = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(M.apply(v), D @ v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(M.solve(v), torch.linalg.solve(D, v), rtol=1e-9, atol=1e-12)
    lam, U = torch.linalg.eigh(D)
    torch.testing.assert_close(M.inv_sqrt_apply(v), (U * lam.rsqrt()) @ (U.T @ v), rtol=1e-9, atol=1e-12)
    assert M.logdet() == pytest.approx(float(torch.linalg.slogdet(D)[1]), rel=1e-10)


def test_sampled_type_is_the_mc_fisher_of_the_same_labels_in_the_eigenbasis() -> None:
    """fisher_type 'mc': E = diag(Qᵀ F_W Q) for the dense fisher_mc operator with the same seed and mc_samples
    (labels keyed by seed and global sample index: the same draws), different for another seed."""
    problem = make_problem(CASES["mlp"]())
    M = cd.metric(problem, "ekfac", damping=0.1, mc_samples=3, seed=7)
    F = cd.operator(problem, "fisher_mc", mc_samples=3, seed=7).to_dense()
    truth = _truth_blocks(M, F)
    for b in M.blocks:
        torch.testing.assert_close(b.dense(0.0), truth[b.name], rtol=1e-9, atol=1e-13)
    other = cd.metric(problem, "ekfac", damping=0.1, mc_samples=3, seed=8)
    assert not torch.allclose(other.to_dense(), M.to_dense())


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
def test_ekfac_equals_curvlinops(name: str, fisher_type: str) -> None:
    """Products with curvlinops' EKFACLinearOperator of the same type, per parameter. A convolution's bias is the
    one difference: curvlinops corrects it in the eigenbasis of its expand factor Σ_{n,t} b bᵀ, curvdist keeps the
    exact bias block (as its KFAC does) — checked against the dense GGN instead."""
    curvlinops = pytest.importorskip("curvlinops")
    case = CASES[name]()
    problem = make_problem(case)
    named = dict(problem.model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = curvlinops.EKFACLinearOperator(problem.model, nn.CrossEntropyLoss(reduction="mean"),
                                            [named[n] for n in problem.param_names], list(problem.batches()),
                                            fisher_type={"type2": "type-2"}.get(fisher_type, fisher_type),
                                            check_deterministic=False)
    M = cd.metric(problem, "ekfac", damping=1.0, fisher_type=fisher_type)
    V = torch.randn(problem.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = op @ V
    ours = torch.stack([M.apply_undamped(v) for v in V.T], 1)
    modules = dict(problem.model.named_modules())
    C = TRUTH[fisher_type](problem.model, case, "mean")
    i, compared = 0, 0
    for b in M.blocks:
        n = b.numel
        if b.name.endswith("bias") and isinstance(modules[b.name.rsplit(".", 1)[0]], nn.Conv2d):
            torch.testing.assert_close(ours[i:i + n], C[i:i + n, i:i + n] @ V[i:i + n], rtol=1e-9, atol=1e-13)
        else:
            torch.testing.assert_close(ours[i:i + n], theirs[i:i + n], rtol=1e-9,
                                       atol=1e-12 * float(theirs.abs().max()), msg=f"{name} {b.name}")
            compared += 1
        i += n
    assert compared >= 3


def test_ekfac_is_at_least_as_close_to_the_ggn_as_kflr() -> None:
    """George et al. 2018 §3.1: in the same eigenbasis the corrected diagonal is the Frobenius-nearest, so each
    weight block of EKFAC (type 2) is no farther from the dense GGN block than KFLR's (strictly closer here)."""
    case = CASES["cnn"]()
    problem = make_problem(case)
    C = dense.dense_ggn(problem.model, case.loss, case.X, case.y, "mean")
    e = cd.metric(problem, "ekfac", damping=1.0, fisher_type="type2")
    k = cd.metric(problem, "kflr", damping=1.0, backend="torch")
    i = 0
    for be, bk in zip(e.blocks, k.blocks):
        n = be.numel
        if be.corrected is not None:
            Cb = C[i:i + n, i:i + n]
            err_e, err_k = float((be.dense(0.0) - Cb).norm()), float((bk.dense(0.0) - Cb).norm())
            assert err_e < err_k, (be.name, err_e, err_k)
        i += n


def test_state_round_trip() -> None:
    """state_dict → from_state_dict (torch.save/load with weights_only) gives the very metric, identity bases
    included. (Invariance under per-tensor scalings: test_damping_reference.py, kind ekfac.)"""
    import io

    problem = make_problem(CASES["token_transformer"]())
    M = cd.metric(problem, "ekfac", damping=1e-2, fisher_type="type2", structured_above=8)
    state = M.state_dict()
    assert set(state["corrected"]) == {b.name for b in M.blocks if b.corrected is not None}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = KFACMetric.from_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(again.to_dense(), M.to_dense(), rtol=0, atol=0)
    assert again.kind == "ekfac" and again.logdet() == M.logdet()


def test_sharded_statistics_equal_one_process() -> None:
    """Two shards (sums of their samples): factors, bases and corrections reduced equal one process, for the
    sampled type too (labels keyed by the global sample index)."""
    case = CASES["token_transformer"]()
    problem = make_problem(case)
    sharded = two_shard_problem(case, problem)
    for options in ({"fisher_type": "type2"}, {"fisher_type": "mc", "seed": 3}):
        local = cd.metric(problem, "ekfac", damping=1e-3, **options)
        M = cd.metric(sharded, "ekfac", damping=1e-3, **options)
        torch.testing.assert_close(M.to_dense(), local.to_dense(), rtol=1e-9, atol=1e-12)


def test_a_vocabulary_side_takes_the_identity_basis() -> None:
    """Above structured_above the token side of the embedding is the identity basis (its factor is diagonal: the
    exact eigenbasis) and E is still diag(Qᵀ GGN_W Q) with Q = I ⊗ Q_d."""
    case = CASES["token_transformer"]()
    problem = make_problem(case)
    C = dense.dense_ggn(problem.model, case.loss, case.X, case.y, "mean")
    M = cd.metric(problem, "ekfac", damping=0.1, fisher_type="type2", structured_above=8)
    vocab = [b for b in M.blocks if b.corrected is not None and None in b.evecs]
    assert vocab, "no block with an identity side"
    truth = _truth_blocks(M, C)
    for b in M.blocks:
        torch.testing.assert_close(b.dense(0.0), truth[b.name], rtol=1e-9, atol=1e-12 * float(C.abs().max()))


def test_refusals_name_the_cause() -> None:
    problem = make_problem(CASES["mlp"]())
    with pytest.raises(MetricError, match="unknown fisher_type 'type-2'.*empirical, mc, type2"):
        cd.metric(problem, "ekfac", fisher_type="type-2")
    with pytest.raises(MetricError, match="mc_samples=2 applies to fisher_type 'mc' only"):
        cd.metric(problem, "ekfac", fisher_type="type2", mc_samples=2)
    with pytest.raises(MetricError, match="own kernels.*per-sample gradients"):
        cd.metric(problem, "ekfac", backend="backpack")
    with pytest.raises(cd.errors.SingularMetricError, match="ekfac metric is singular"):
        cd.metric(problem, "ekfac")  # the softmax's invariance: a zero corrected eigenvalue, no damping


def test_metric_spec_route() -> None:
    """{kind: ekfac, options: {fisher_type: type2}} in a config builds the same metric as the Python call."""
    from curvdist.queries.session import Coordinates
    from curvdist.queries.specs import MetricSpec

    problem = make_problem(CASES["mlp"]())
    spec = MetricSpec(kind="ekfac", damping=1e-2, options={"fisher_type": "type2"})
    torch.testing.assert_close(Coordinates("theta", problem, 0).metric(spec).to_dense(),
                               cd.metric(problem, "ekfac", damping=1e-2, fisher_type="type2").to_dense(),
                               rtol=0, atol=0)
