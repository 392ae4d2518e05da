"""Measured pipeline cuts (``balance: time``): the seconds each unit of a stack takes in a forward and a backward
pass on one micro-batch, timed on the coordinator's model, and the cuts that equalize them.

A stack's units (:func:`.stacks.stack_units`) meet at *boundaries*: the tensor entering each module after the
first of a sequential stack; the hidden state entering each block of a block stack and leaving the last one. One
pass stamps the time at which the forward pass reaches each boundary (module hooks) and at which the backward pass
computes the gradient with respect to it (tensor hooks). Unit k's time is the forward interval between its
boundaries plus the backward one. Parameter counts miss what is not a parameter's multiply — attention's
products, normalizations, the loss over a large vocabulary — and weigh a large GEMM like many small ones; the
measurement sees them as the stages will (the idea of torchgpipe's ``balance_by_time``: Kim et al. 2020,
"torchgpipe: On-the-fly Pipeline Parallelism for Training Giant Models").

The cuts are computed once, on the coordinator, and reach every stage (and a stage Ray restarts) as an explicit
list of units per stage, so all stages cut alike whatever the timings' noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ProblemError
from ..problem.data import Inputs
from ..problem.outputs import call
from .stacks import balanced_cuts, counts_from_cuts, stack_units, unit_kind, unit_parameters

__all__ = ["unit_seconds", "timed_balance"]


def _boundaries(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, before?) of each boundary between consecutive units, in forward order: before the module's
    forward (its first input) or after it (its first output)."""
    units = stack_units(model)
    if isinstance(units, list):
        return [(m, True) for m in units[1:]]
    blocks = units[1]
    return [(b, True) for b in blocks] + [(blocks[-1], False)]


def _first_floating(value: Any) -> Tensor | None:
    """The first floating-point tensor of a module's input or output (a tensor, a tuple of them, a mapping)."""
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for v in items:
        if isinstance(v, Tensor) and v.is_floating_point():
            return v
    return None


def _now(t: Tensor | None) -> float:
    if t is not None and t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


def _one_pass(model: nn.Module, inputs: Inputs, loss: Callable[[Tensor], Tensor],
              bounds: list[tuple[nn.Module, bool]]) -> np.ndarray:
    """Forward + backward seconds of each unit in one pass (see the module docstring)."""
    n = len(bounds)
    fwd: list[list[float]] = [[] for _ in range(n)]
    bwd: list[float | None] = [None] * n

    def stamp(k: int) -> Callable[..., None]:
        def hook(*hook_args: Any) -> None:
            # a pre-hook gets (module, args, kwargs), the hidden state maybe by keyword; a hook (module, args, output)
            t = _first_floating(hook_args[1]) if bounds[k][1] else None
            if t is None:
                t = _first_floating(hook_args[2])
            fwd[k].append(_now(t))
            if t is not None and t.requires_grad:
                t.register_hook(lambda g: bwd.__setitem__(k, _now(g)))
        return hook

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ProblemError("balance 'time' cannot time a model without parameters that require grad")
    kept = [p.grad for p in params]
    handles = []
    for k, (module, before) in enumerate(bounds):
        handles.append(module.register_forward_pre_hook(stamp(k), with_kwargs=True) if before else
                       module.register_forward_hook(stamp(k)))
    for p in params:  # each gradient is dropped once made: at most one parameter's worth is held at a time
        p.grad = None
        handles.append(p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None)))
    try:
        t0 = _now(None)
        out = call(model, inputs)
        value = loss(out)
        t1 = _now(value)
        torch.autograd.backward(value, inputs=params)
        t3 = _now(value)
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(params, kept):  # the model's gradients as they were
            p.grad = g
    if any(len(f) != 1 for f in fwd):
        raise ProblemError(f"balance 'time' cannot time the stack's units: the boundaries between them were passed "
                           f"{[len(f) for f in fwd]} times in one forward pass (once each expected); give the "
                           "units per stage as a list, or balance by 'parameters' or 'compute'")
    f = [t0, *(x[0] for x in fwd), t1]
    # no gradient reaches a boundary with nothing to differentiate before it: the backward pass ends there
    b = [t3, *(t3 if x is None else x for x in bwd), t1]
    return np.array([f[k + 1] - f[k] + b[k] - b[k + 1] for k in range(n + 1)])


def unit_seconds(model: nn.Module, inputs: Inputs, loss: Callable[[Tensor], Tensor],
                 repeats: int = 3) -> list[float]:
    """Median seconds of each unit's forward and backward pass over ``repeats`` passes after a warm-up one, the
    loss (``loss(output) → scalar``) counted with the last unit."""
    bounds = _boundaries(model)
    _one_pass(model, inputs, loss, bounds)
    return [float(x) for x in np.median([_one_pass(model, inputs, loss, bounds) for _ in range(repeats)], axis=0)]


def timed_balance(model: nn.Module, stages: int, inputs: Inputs, loss: Callable[[Tensor], Tensor],
                  repeats: int = 3) -> list[int]:
    """Units per stage (an explicit ``balance``) whose measured seconds (:func:`unit_seconds`) are near-equal."""
    what = unit_kind(model)
    params = unit_parameters(model)
    balanced_cuts(params, stages, what)  # a clear error before any timing
    seconds = unit_seconds(model, inputs, loss, repeats)
    return counts_from_cuts(model, balanced_cuts(seconds, stages, what, parameters=params))


def resolve_balance(balance: str | Sequence[int], stages: int, model: nn.Module,
                    example: Callable[[], tuple[Inputs, Callable[[Tensor], Tensor]]]) -> str | list[int]:
    """``balance`` as the stages take it: ``time`` measured now on ``model`` with ``example()``'s micro-batch and
    loss, anything else as given."""
    if isinstance(balance, str) and balance == "time":
        inputs, loss = example()
        return timed_balance(model, stages, inputs, loss)
    return balance if isinstance(balance, str) else list(balance)
