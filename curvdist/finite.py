"""Finiteness checks of large tensors at the cost of a sum.

Every product a solver takes, every gradient and every preconditioned step is checked for NaN and ±inf, so that a
bad number is refused where it appears instead of spoiling a spectrum silently. ``torch.isfinite(t).all()``
materializes a boolean tensor of t's size and reads it again: 0.45 s for a 124M-entry float32 vector on 2 CPU
cores, against 0.016 s for ``t.sum()``. (Inside a GPT-2-small eigenvalue solve a profile charged it 1.4 s a step,
but much of that was the page faults of fresh allocations, which the next allocation then pays: the whole solve
got 2-6 % faster, see docs/guides/memory-and-threads.md.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite"]


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (neither NaN nor ±inf).

    A NaN or an infinite entry makes the sum NaN or infinite (inf + (−inf) is NaN, and NaN stays NaN), so a finite
    sum proves every entry finite. A non-finite sum is decided by the elementwise test, since finite entries can
    overflow the sum; that is the only case paying for it. Integer and boolean tensors are finite.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
