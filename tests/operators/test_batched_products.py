"""Batched curvature products C [v₁ … v_k] (``apply_block``, ``op @ V``, ``apply_vectors``) against k single products,
and the solvers' opt-in block products (Hutchinson, Hutch++, XTrace, SLQ in lockstep) against their defaults.

Tolerance. A batched product runs the same operations as the single one on k stacked tangents/cotangents, so every
column agrees with its single product to rounding: ≤ 1e-12 relative in float64 (measured: a few 1e-16).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import curvdist as cd
from curvdist.errors import ShapeError, SolverError
from curvdist.solvers import hutchinson, hutchpp, lanczos, lanczos_lockstep, quadrature, xtrace
from tests.cases import CASES, make_problem, two_shard_problem

RTOL = 1e-12
#: the tiny transformers: attention, LayerNorm, GELU (``transformer``); token embeddings (``token_transformer``)
NAMES = ["mlp", "cnn", "transformer", "token_transformer"]
#: the Hessian in both exact modes (their block kernels differ), the GGN, and the Fisher (the GGN's kernel)
KINDS: dict[str, dict[str, Any]] = {
    "hessian_for": {"kind": "hessian", "mode": "forward_over_reverse"},
    "hessian_rev": {"kind": "hessian", "mode": "reverse_over_reverse"},
    "ggn": {"kind": "ggn"},
    "fisher": {"kind": "fisher"},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _problem(name: str) -> cd.Problem:
    return make_problem(CASES[name]())


def _op(name: str, variant: str) -> Any:
    spec = dict(KINDS[variant])
    return cd.operator(_problem(name), spec.pop("kind"), check_determinism=False, **spec)


def _block(d: int, k: int, seed: int = 0) -> Tensor:
    return torch.randn(d, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _columnwise(A: Tensor, B: Tensor) -> float:
    """max over columns of ‖a_i − b_i‖ / ‖b_i‖."""
    return float(((A - B).norm(dim=0) / B.norm(dim=0)).max())


@pytest.mark.parametrize("variant", sorted(KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_batched_product_equals_single_products_column_by_column(name: str, variant: str) -> None:
    op = _op(name, variant)
    n = len(CASES[name]().X)
    batch = CASES[name]().batch_size
    for k in (1, n + 3):  # one column, and more columns than a batch (and than the whole data set) has samples
        assert k == 1 or k > batch
        V = _block(op.dim, k, seed=k)
        CV = op.apply_block(V)
        assert CV.shape == (op.dim, k) and CV.dtype == torch.float64
        single = torch.stack([op.matvec(V[:, i]) for i in range(k)], dim=1)
        assert _columnwise(CV, single) <= RTOL, (name, variant, k)
        assert op.block_vectorized
    assert torch.equal(op @ V, CV)  # ``op @ V`` for a (d, k) matrix is apply_block
    assert torch.equal(op.apply_block(V, chunk=k), CV)


def test_a_hessian_with_kept_graphs_applies_its_block_through_them() -> None:
    """One batch: reverse-over-reverse keeps the graph of ∇ℓ (``reuse_graph``), and the block product is one second
    backward per vector through it — the single products' own arithmetic."""
    case = CASES["transformer"]()
    problem = cd.Problem(case.model(), case.loss, (case.X, case.y), batch_size=len(case.X))
    op = cd.operator(problem, "hessian", mode="reverse_over_reverse", check_determinism=False)
    assert op.reuse_graph
    V = _block(op.dim, 5)
    CV = op.apply_block(V)
    assert len(op._graphs) == 1
    single = torch.stack([op.matvec(V[:, i]) for i in range(5)], dim=1)
    assert _columnwise(CV, single) <= RTOL
    fresh = cd.operator(problem, "hessian", mode="reverse_over_reverse", reuse_graph=False, check_determinism=False)
    assert _columnwise(fresh.apply_block(V), single) <= RTOL


def test_chunks_and_solver_vectors_give_the_same_block() -> None:
    op = _op("cnn", "ggn")
    V = _block(op.dim, 7)
    full = op.apply_block(V)
    assert _columnwise(op.apply_block(V, chunk=3), full) <= RTOL  # passes of 3, 3 and 1 columns
    rows = op.apply_vectors(list(V.T))
    assert len(rows) == 7 and _columnwise(torch.stack(rows, 1), full) <= RTOL
    assert op.apply_vectors([]) == []


def test_a_float32_block_is_cast_to_the_operators_dtype_like_a_vector() -> None:
    op = _op("mlp", "ggn")
    V = _block(op.dim, 3).float()
    out = op.apply_block(V)
    assert out.dtype == torch.float64
    assert _columnwise(out, torch.stack([op.matvec(V[:, i]) for i in range(3)], 1)) <= RTOL


def test_sharded_operator_block_equals_the_local_one() -> None:
    case = CASES["mlp"]()
    local = make_problem(case)
    ops = [cd.operator(p, "ggn", check_determinism=False) for p in (local, two_shard_problem(case, local))]
    V = _block(local.dim, 5)
    assert _columnwise(ops[1].apply_block(V), ops[0].apply_block(V)) <= 1e-12


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("bad", "needle"), [
    (lambda d: torch.zeros(d, dtype=torch.float64), "shape"),  # a vector: use matvec
    (lambda d: torch.zeros(3, d, dtype=torch.float64), "pass V.T"),  # (k, d) instead of (d, k)
    (lambda d: torch.zeros(d + 1, 2, dtype=torch.float64), "({}, k)"),
    (lambda d: torch.zeros(d, 0, dtype=torch.float64), "k >= 1"),
    (lambda d: torch.zeros(d, 2, 1, dtype=torch.float64), "shape"),
    (lambda d: torch.zeros(d, 2, dtype=torch.int64), "torch.int64"),
    (lambda d: torch.zeros(d, 2, dtype=torch.complex128), "torch.complex128"),
    (lambda d: torch.zeros(d, 2, dtype=torch.bool), "torch.bool"),
    (lambda d: np.zeros((d, 2)), "torch.Tensor"),
])
def test_a_block_of_the_wrong_shape_or_dtype_is_refused_naming_the_cause(bad: Any, needle: str) -> None:
    op = _op("mlp", "ggn")
    with pytest.raises(ShapeError, match="apply_block") as info:
        op.apply_block(bad(op.dim))
    assert needle.format(op.dim) in str(info.value)


def test_op_matmul_refuses_a_bad_block_too() -> None:
    op = _op("mlp", "hessian_rev")
    with pytest.raises(ShapeError, match="pass V.T"):
        op @ torch.zeros(2, op.dim, dtype=torch.float64)
    with pytest.raises(ShapeError, match="chunk"):
        op.apply_block(_block(op.dim, 2), chunk=0)


# ----------------------------------------------------------------------------------------- the loop fallback
class _Softsign(torch.autograd.Function):
    """x / (1 + |x|) with forward- and reverse-mode derivatives (so jvp, vjp and double backward work) but no vmap
    rule: ``torch.func.vmap`` refuses it where it runs the function batched (a batched tangent or cotangent through
    it: forward-over-reverse, the GGN), and block products must fall back to a loop. (A reverse-over-reverse block
    vmaps only the backward's ordinary ops, and stays vectorized.)"""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x / (1 + x.abs())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g / (1 + x.abs()) ** 2

    @staticmethod
    def jvp(ctx: Any, t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return t / (1 + x.abs()) ** 2


class _NoVmap(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _Softsign.apply(x)


@pytest.mark.parametrize("variant", ["hessian_for", "ggn"])
def test_a_model_vmap_cannot_batch_falls_back_to_a_loop_with_the_same_numbers(variant: str) -> None:
    case = CASES["mlp"]()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5), _NoVmap(), nn.Linear(5, 4)).double().eval()
    spec = dict(KINDS[variant])
    op = cd.operator(make_problem(case, model=model), spec.pop("kind"), check_determinism=False, **spec)
    V = _block(op.dim, 4)
    CV = op.apply_block(V)
    assert not op.block_vectorized
    assert _columnwise(CV, torch.stack([op.matvec(V[:, i]) for i in range(4)], 1)) <= RTOL


# ----------------------------------------------------------------------------------------- solvers, opt-in
@pytest.mark.parametrize("estimator", [hutchinson, hutchpp, xtrace])
def test_trace_estimators_with_block_products_match_their_defaults(estimator: Any) -> None:
    op = _op("cnn", "ggn")
    space = op.vector_space()
    default = estimator(op.apply_vector, space, 24, seed=3)
    for block in (None, 5):
        e = estimator(op.apply_vector, space, 24, seed=3, block_apply=op.apply_vectors, block=block)
        assert e.matvecs == default.matvecs
        assert abs(e.value - default.value) <= RTOL * abs(default.value)
        np.testing.assert_allclose(e.samples, default.samples, rtol=1e-11, atol=1e-12 * abs(default.value))
    # the default is the one-product-at-a-time path, untouched: a second run is identical bit for bit
    again = estimator(op.apply_vector, space, 24, seed=3)
    assert again.value == default.value and np.array_equal(again.samples, default.samples)


def test_slq_probes_in_lockstep_match_one_after_the_other() -> None:
    op = _op("transformer", "hessian_rev")
    space = op.vector_space()
    default = quadrature(op.apply_vector, space, 5, 12, seed=4)
    for block in (None, 2):
        q = quadrature(op.apply_vector, space, 5, 12, seed=4, block_apply=op.apply_vectors, block=block)
        assert q.matvecs == default.matvecs
        np.testing.assert_array_equal(q.norms2, default.norms2)
        for a, b, wa, wb in zip(q.nodes, default.nodes, q.weights, default.weights):
            scale = float(np.abs(b).max())
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * scale)
            np.testing.assert_allclose(wa, wb, rtol=0, atol=1e-9)


def test_lockstep_runs_stop_on_their_own_breakdowns() -> None:
    """Runs of different lengths in one lockstep: with a rank-2 operator the Krylov space of a generic start has
    dimension 3 (the start's null-space part, then range(A)), that of an eigenvector dimension 1; each run ends at its
    own breakdown, where :func:`lanczos` ends it."""
    from curvdist.solvers import TorchSpace

    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    A = 3.0 * torch.outer(Q[:, 0], Q[:, 0]) + 1.0 * torch.outer(Q[:, 1], Q[:, 1])
    space = TorchSpace(6)
    starts = [torch.ones(6, dtype=torch.float64), Q[:, 0].clone()]
    runs = lanczos_lockstep(lambda xs: [A @ x for x in xs], space, starts, 5, restart=False)
    for z, run in zip(starts, runs):
        ref = lanczos(lambda x: A @ x, space, z, 5, restart=False)
        assert run.matvecs == ref.matvecs and len(run.alphas) == len(ref.alphas)
        np.testing.assert_allclose(run.alphas, ref.alphas, rtol=1e-13, atol=1e-13)
    assert [r.matvecs for r in runs] == [3, 1]


def test_block_options_are_validated() -> None:
    op = _op("mlp", "ggn")
    space = op.vector_space()
    with pytest.raises(SolverError, match="block_apply"):
        hutchpp(op.apply_vector, space, 9, block=3)
    with pytest.raises(SolverError, match="positive integer"):
        quadrature(op.apply_vector, space, 2, 3, block_apply=op.apply_vectors, block=0)
    with pytest.raises(SolverError, match="returned 1 vectors for 2"):
        hutchinson(op.apply_vector, space, 2, block_apply=lambda xs: [xs[0]])
