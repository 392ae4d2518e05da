"""Pipeline cuts given as units per stage, and measured (``balance: time``): the seconds each unit of a stack takes
are found where a unit is made slow on purpose (a sleep in its forward or in its backward pass), in sequential
stacks and in block stacks whose blocks take the hidden state by keyword; the cuts equalize them."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import curvdist as cd
from curvdist.distributed.stacks import counts_from_cuts, cuts_from_counts, split_points
from curvdist.distributed.unit_times import timed_balance, unit_seconds

#: the sleeps that make a unit slow, and the most any other unit of these tiny stacks takes
FORWARD_SLEEP, BACKWARD_SLEEP, FAST = 0.05, 0.15, 0.03


class _SleepInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        time.sleep(BACKWARD_SLEEP)
        return g


class _Unit(nn.Module):
    """A linear map, slow in its forward pass (``forward_sleep``) or its backward pass (``backward_sleep``)."""

    def __init__(self, forward_sleep: bool = False, backward_sleep: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.forward_sleep, self.backward_sleep = forward_sleep, backward_sleep

    def forward(self, x=None, hidden_states=None):
        x = hidden_states if x is None else x
        if self.forward_sleep:
            time.sleep(FORWARD_SLEEP)
        x = torch.tanh(self.lin(x))
        return _SleepInBackward.apply(x) if self.backward_sleep else x


class _Blocks(nn.Module):
    """A block stack (embedding, blocks called with the hidden state by keyword, head) returning a tuple."""

    def __init__(self, slow: dict[int, str]) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList(_Unit(slow.get(i) == "forward", slow.get(i) == "backward") for i in range(4))
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = (block(hidden_states=h),)[0]
        return (self.head(h),)


def _loss(out):
    return (out ** 2).sum()


def _sequential(slow: dict[int, str]) -> nn.Sequential:
    return nn.Sequential(*(_Unit(slow.get(i) == "forward", slow.get(i) == "backward") for i in range(5)))


def test_unit_seconds_find_the_slow_forward_and_backward_passes_of_a_sequential_stack():
    torch.manual_seed(0)
    seconds = unit_seconds(_sequential({1: "forward", 3: "backward"}), torch.randn(6, 4), _loss, repeats=1)
    assert len(seconds) == 5
    assert FORWARD_SLEEP <= seconds[1] < FORWARD_SLEEP + FAST
    assert BACKWARD_SLEEP <= seconds[3] < BACKWARD_SLEEP + FAST
    assert all(seconds[k] < FAST for k in (0, 2, 4)), seconds


def test_unit_seconds_of_a_block_stack_count_the_embedding_and_the_head_as_units():
    torch.manual_seed(0)
    model = _Blocks({0: "backward", 2: "forward"})
    model.head.weight.grad = torch.ones_like(model.head.weight)  # a gradient of the user's, kept as it is
    seconds = unit_seconds(model, torch.randint(0, 5, (3, 2)), lambda out: _loss(out[0]), repeats=1)
    assert len(seconds) == 6  # [embedding, block 0, …, block 3, head]
    assert BACKWARD_SLEEP <= seconds[1] < BACKWARD_SLEEP + FAST
    assert FORWARD_SLEEP <= seconds[3] < FORWARD_SLEEP + FAST
    assert all(seconds[k] < FAST for k in (0, 2, 4, 5)), seconds
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")  # nothing left


def test_timed_cuts_equalize_the_measured_seconds():
    """Block 1 sleeps 0.15 s in its backward pass and block 3 0.05 s in its forward pass, the rest take
    milliseconds: in two stages the cut follows block 1 (0.15 against 0.05 s); in three, block 1 is a stage of its
    own (0.15 against 0.05 s on either side of it)."""
    torch.manual_seed(0)
    model, ids = _Blocks({1: "backward", 3: "forward"}), torch.randint(0, 5, (3, 2))
    loss = lambda out: _loss(out[0])  # noqa: E731
    assert timed_balance(model, 2, ids, loss, repeats=1) == [2, 2]
    assert timed_balance(model, 3, ids, loss, repeats=1) == [1, 1, 2]
    # a sequential stack: its slow module 2 gets a stage of its own
    seq = _sequential({2: "backward"})
    assert timed_balance(seq, 3, torch.randn(6, 4), _loss, repeats=1) == [2, 1, 2]


def test_a_stack_whose_boundary_is_passed_twice_is_refused():
    """A block called twice per forward pass has no one time: refused, naming the way out."""
    model = _Blocks({})
    model.blocks[1] = model.blocks[0]
    with pytest.raises(cd.ProblemError, match="passed .* times in one forward pass"):
        unit_seconds(model, torch.randint(0, 5, (3, 2)), lambda out: _loss(out[0]), repeats=1)


def test_explicit_units_per_stage():
    """A list gives the blocks (modules) of each stage; the embedding goes with stage 0, the head with the last."""
    blocks, seq = _Blocks({}), _sequential({})
    assert split_points(blocks, 2, [3, 1]) == [(0, 4), (4, 6)]
    assert split_points(blocks, 3, [0, 4, 0]) == [(0, 1), (1, 5), (5, 6)]
    assert split_points(seq, 2, [2, 3]) == [(0, 2), (2, 5)]
    for model, stages in ((blocks, 2), (blocks, 3), (seq, 2), (seq, 4)):
        cuts = split_points(model, stages)
        assert cuts_from_counts(model, stages, counts_from_cuts(model, cuts)) == cuts
    with pytest.raises(cd.ProblemError, match=r"balance \[3, 2\] gives 5 blocks, but the model has 4"):
        split_points(blocks, 2, [3, 2])
    with pytest.raises(cd.ProblemError, match="number of blocks of each of the 2 stages"):
        split_points(blocks, 2, [4])
    with pytest.raises(cd.ProblemError, match="non-negative integers"):
        split_points(blocks, 2, [5, -1])
    with pytest.raises(cd.ProblemError, match=r"leaves stage\(s\) \[1\] without parameters"):
        split_points(blocks, 3, [2, 0, 2])
    with pytest.raises(cd.ProblemError, match="measured on the coordinator's model"):
        split_points(blocks, 2, "time")
