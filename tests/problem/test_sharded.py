"""The data-parallel seam without Ray: a ShardedProblem over the in-process reducer (one shard) and over a
one-rank torch.distributed (gloo) group gives bit-identical products, gradients and metric statistics to the local
Problem, and a parameter-subset reducer gives the blocks of block_spectra."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

import curvdist as cd
from curvdist.problem.reducers import tree_sum
from tests.cases import CASES, make_problem


def _same_numbers(local: cd.Problem, sharded: cd.ShardedProblem) -> None:
    assert sharded.num_samples == local.num_samples and sharded.dim == local.dim
    v = torch.randn(local.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kind in ("hessian", "ggn", "empirical_fisher"):
        assert torch.equal(cd.operator(local, kind) @ v, cd.operator(sharded, kind) @ v), kind
    # matmat (vmap over a block of vectors) through to_dense
    assert torch.equal(cd.operator(local, "ggn").to_dense(), cd.operator(sharded, "ggn").to_dense())
    assert sharded.value() == local.value()
    assert all(torch.equal(x, y) for x, y in zip(local.gradient(), sharded.gradient()))
    for kind in ("diag_ggn", "empirical_fisher_diag", "kflr"):
        assert torch.equal(cd.metric(local, kind, damping=0.1).to_dense(),
                           cd.metric(sharded, kind, damping=0.1).to_dense()), kind
    torch.testing.assert_close(cd.metric(local, "ekfac", damping=0.1, seed=2).to_dense(),
                               cd.metric(sharded, "ekfac", damping=0.1, seed=2).to_dense(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_in_process_reducer_equals_local(reduction: str) -> None:
    local = make_problem(CASES["mlp"](), reduction)
    sharded = cd.ShardedProblem.in_process(local)
    assert isinstance(sharded.reducer, cd.InProcessReducer) and sharded.backend == "local"
    _same_numbers(local, sharded)
    e_local = cd.eigs(cd.operator(local, "hessian"), k=2, metric=cd.metric(local, "kflr", damping=0.1))
    e_sharded = cd.eigs(cd.operator(sharded, "hessian"), k=2, metric=cd.metric(sharded, "kflr", damping=0.1))
    assert e_local.value == e_sharded.value


def test_process_group_reducer_equals_local() -> None:
    """One gloo rank: all_reduce is the identity, so every statistic equals the local one bit for bit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        local = make_problem(CASES["mlp"]())
        shard = cd.Problem(local.model, local.loss, local.data, reduction="sum")
        sharded = cd.ShardedProblem(local.model, local.loss, cd.ProcessGroupReducer(shard, label="gloo"))
        assert sharded.backend == "gloo[1]" and sharded.reducer.shards == 1
        _same_numbers(local, sharded)
    finally:
        dist.destroy_process_group()


def test_process_group_reducer_needs_an_initialized_group() -> None:
    local = make_problem(CASES["mlp"](), "sum")
    with pytest.raises(cd.ProblemError, match="torch.distributed is not initialized"):
        cd.ProcessGroupReducer(local)


def test_block_spectra_of_a_sharded_problem() -> None:
    local = make_problem(CASES["mlp"]())
    sharded = cd.ShardedProblem.in_process(local)
    a = cd.block_spectra(local, "ggn", "kflr", damping=0.1).value
    b = cd.block_spectra(sharded, "ggn", "kflr", damping=0.1).value
    assert a["blocks"].keys() == b["blocks"].keys()
    for name in a["blocks"]:
        assert a["blocks"][name]["eigenvalues"] == b["blocks"][name]["eigenvalues"]
    with pytest.raises(cd.ProblemError, match="cannot move the parameters"):
        sharded.restricted(list(local.param_names[:1])).set_params(local.params[:1])


def test_shards_are_added_in_order() -> None:
    parts = [{"g": torch.tensor([1.0, 2.0]), "a": None, "n": 3}, {"g": torch.tensor([0.5, 0.25]), "a": None, "n": 4}]
    total = tree_sum(parts)
    assert torch.equal(total["g"], torch.tensor([1.5, 2.25])) and total["a"] is None and total["n"] == 7
    assert torch.equal(parts[0]["g"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_sharded_problem_refuses_data_passes_and_other_points() -> None:
    sharded = cd.ShardedProblem.in_process(make_problem(CASES["mlp"]()))
    with pytest.raises(cd.ProblemError, match="live on its shards"):
        next(iter(sharded.batches()))
    with pytest.raises(cd.ProblemError, match="its own parameters only"):
        sharded.gradient(sharded.params)
    with pytest.raises(cd.ProblemError, match="ShardReducer"):
        cd.ShardedProblem(sharded.model, "cross_entropy", reducer=object())  # type: ignore[arg-type]
