"""The own kernels' exact diagonals under a memory budget: any chunking gives the same diagonal, an allocation
failure is a MetricError naming the knob."""

from __future__ import annotations

import pytest
import torch

import curvdist as cd
from curvdist.geometry.blocks import diagonal
from curvdist.geometry.blocks.diagonal import chunk_sizes


def test_chunk_sizes_fit_the_budget() -> None:
    assert chunk_sizes(dim=1000, itemsize=8, samples=32, columns=10, memory_budget=10**9) == (32, 10)
    b, k = chunk_sizes(dim=1000, itemsize=8, samples=32, columns=10, memory_budget=16_000 * 25)
    assert (b, k) == (2, 10) and b * k * 2 * 1000 * 8 <= 16_000 * 25
    assert chunk_sizes(dim=10**9, itemsize=8, samples=32, columns=10, memory_budget=1) == (1, 1)


@pytest.mark.parametrize("kind", ["diag_ggn", "empirical_fisher_diag"])
def test_a_tiny_budget_gives_the_same_diagonal(mlp_problem: cd.Problem, kind: str) -> None:
    full = cd.metric(mlp_problem, kind, backend="torch").apply_undamped(torch.ones(mlp_problem.dim,
                                                                                  dtype=mlp_problem.dtype))
    one = cd.metric(mlp_problem, kind, backend="torch", memory_budget=1).apply_undamped(
        torch.ones(mlp_problem.dim, dtype=mlp_problem.dtype))
    torch.testing.assert_close(one, full, rtol=1e-12, atol=1e-15)


def test_bad_budget_and_allocation_failure_are_metric_errors(mlp_problem: cd.Problem, monkeypatch) -> None:
    with pytest.raises(cd.MetricError, match="memory_budget must be a positive number of bytes"):
        cd.metric(mlp_problem, "diag_ggn", backend="torch", memory_budget=0)

    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(diagonal, "output_factors", fail)
    with pytest.raises(cd.MetricError, match=r"ran out of memory with memory_budget=\d+ bytes.*pass a smaller "
                                             r"memory_budget"):
        cd.metric(mlp_problem, "diag_ggn", backend="torch")
