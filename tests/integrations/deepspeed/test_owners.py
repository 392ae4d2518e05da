"""The owner plan of the preconditioner (curvdist.integrations.deepspeed.owners): k owners per parameter from the
grad_worker_fraction, primaries balanced by the cost of the blocks' eigendecompositions (checked against a brute
force over all assignments)."""

from __future__ import annotations

import itertools

import pytest

from curvdist.errors import ConfigError
from curvdist.integrations.deepspeed.owners import block_cost, owner_count, owner_sets

SHAPES = {"a.weight": (64, 32), "a.bias": (64,), "b.weight": (10, 64), "b.bias": (10,), "c.weight": (48, 48)}


@pytest.mark.parametrize("fraction,world,k", [(1.0, 4, 4), (0.25, 4, 1), (0.5, 4, 2), (0.1, 4, 1), (0.5, 3, 2),
                                              (1.0, 1, 1)])
def test_owner_count(fraction, world, k):
    assert owner_count(fraction, world) == k


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_owner_count_refuses_fractions_outside_0_1(fraction):
    with pytest.raises(ConfigError, match="grad_worker_fraction"):
        owner_count(fraction, 2)


def test_block_cost_is_the_eigendecompositions_of_the_factors():
    assert block_cost((64, 32)) == 64 ** 3 + 32 ** 3
    assert block_cost((8, 3, 5, 5)) == 8 ** 3 + 75 ** 3  # a conv kernel: out × (in·kh·kw)
    assert block_cost((10,)) == 10


@pytest.mark.parametrize("world", [2, 3])
def test_one_owner_per_parameter_balances_the_cost(world):
    names, shapes = list(SHAPES), list(SHAPES.values())
    primary, sets = owner_sets(names, shapes, world, 1)
    assert all(sets[n] == (primary[n],) for n in names)
    loads = [sum(block_cost(SHAPES[n]) for n in names if primary[n] == r) for r in range(world)]
    best = min(max(sum(block_cost(SHAPES[n]) for n, r in zip(names, assign) if r == w) for w in range(world))
               for assign in itertools.product(range(world), repeat=len(names)))
    # longest-processing-time first is within 4/3 of the optimal makespan (Graham 1969)
    assert max(loads) <= 4 / 3 * best
    assert sorted({primary[n] for n in names}) == list(range(world))  # every rank owns something


def test_k_owners_are_the_primary_and_the_next_ranks():
    names, shapes = list(SHAPES), list(SHAPES.values())
    primary, sets = owner_sets(names, shapes, 4, 2)
    for n in names:
        assert sets[n] == tuple(sorted({primary[n], (primary[n] + 1) % 4}))
    _, everyone = owner_sets(names, shapes, 4, 4)
    assert all(s == (0, 1, 2, 3) for s in everyone.values())
