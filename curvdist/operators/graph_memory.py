"""The memory an autograd graph holds, measured, and the micro-batch size that keeps a product's graph in a budget.

A reverse-mode pass keeps the tensors saved for backward (activations, masks, the tangents of forward-mode duals)
until the backward has used them; that is what grows with the batch and what decides a product's peak memory. It
is measured here exactly, without an allocator: every tensor an op saves goes through the pack hook of
:func:`torch.autograd.graph.saved_tensors_hooks`, and :func:`saved_bytes` sums the distinct storages behind them —
leaving out the storages that are resident anyway (the parameters and the batch) and counting the tangent of a
dual tensor as well as its primal. The count is device-agnostic (it reads storage sizes, not a device's
allocator) and deterministic for a model and a batch shape.

The graph of a product on n samples is modelled as affine in n, G(n) = F + g·n, from two measurements on one and
two samples (:func:`measure_graph`); :func:`fitting_micro_batch` is then the largest n with G(n) within a budget.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ..problem.data import batch_len, slice_inputs

#: graphs smaller than this are never split (micro-batching them costs time and saves little): the floor of the
#: ``"auto"`` memory budget
MIN_SPLIT_BYTES = 64 * 2**20


def _storage_key(t: Tensor) -> tuple[str, int] | None:
    try:
        storage = t.untyped_storage()
        return (str(storage.device), storage.data_ptr()) if storage.nbytes() else None
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, wrapped or storage-less tensors
        return None


def batch_tensors(X: Any, y: Tensor) -> list[Tensor]:
    """The tensors of a batch (inputs, or each input of a mapping, and labels): resident while a product runs."""
    return [y, *(X.values() if isinstance(X, dict) else [X])]


def saved_bytes(fn: Callable[[], Any], resident: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages saved for backward while ``fn()`` runs (primal and tangent of duals), not
    counting the storages of ``resident`` tensors.

    The graph built inside ``fn`` holds weak references to what it saves, and this function the strong ones until
    ``fn`` returns: a pack hook that returned the tensor itself would close a reference cycle (an op's output →
    its ``grad_fn`` → the packed output) that Python's collector cannot see, and leak every saved tensor. So the
    graph ``fn`` builds must be used (backwards run) inside ``fn``; its storages are freed when ``fn`` returns, and
    a freed storage whose address is reused meanwhile is never mistaken for one already counted."""
    skip = {k for k in map(_storage_key, resident) if k is not None}
    counted: dict[tuple[str, int], int] = {}
    alive: list[Tensor] = []

    def count(t: Tensor) -> None:
        key = _storage_key(t)
        if key is not None and key not in skip and key not in counted:
            counted[key] = t.untyped_storage().nbytes()

    def pack(t: Tensor) -> Any:
        count(t)
        tangent = fwAD.unpack_dual(t).tangent
        if tangent is not None:
            count(tangent)
        alive.append(t)
        return weakref.ref(t)

    def unpack(ref: Any) -> Tensor:
        t = ref()
        if t is None:  # the graph outlived fn: a misuse of this function, not a state to compute with
            raise RuntimeError("saved_bytes: a saved tensor was used after the measured function returned")
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            fn()
    finally:
        alive.clear()
    return sum(counted.values())


@dataclass(frozen=True)
class GraphSize:
    """G(n) = fixed + per_sample·n bytes saved for backward on n samples."""

    fixed: int
    per_sample: int

    def at(self, n: int) -> int:
        return self.fixed + self.per_sample * n


def measure_graph(build: Callable[[Any, Tensor], Any], X: Any, y: Tensor, resident: Iterable[Tensor]) -> GraphSize:
    """G(n) from ``build`` (one pass that constructs the graph, e.g. a forward and a first backward) on the first
    sample and the first two samples of the batch ``(X, y)``: per_sample = G(2) − G(1), fixed = G(1) − per_sample
    (at least 0). A one-sample batch gives per_sample = G(1), fixed 0 (an overestimate for more samples)."""
    resident = list(resident)
    sizes = []
    for n in range(1, min(2, batch_len(X)) + 1):
        Xn, yn = slice_inputs(X, 0, n), y[:n]
        sizes.append(saved_bytes(lambda: build(Xn, yn), resident + batch_tensors(Xn, yn)))
    if len(sizes) == 1:
        return GraphSize(0, sizes[0])
    per_sample = max(sizes[1] - sizes[0], 0)
    return GraphSize(max(sizes[0] - per_sample, 0), per_sample)


def fitting_micro_batch(size: GraphSize, budget: int | None, n: int) -> int | None:
    """The largest micro-batch (≥ 1 sample) whose graph fits ``budget`` bytes, or ``None`` when the whole batch of
    ``n`` samples fits (or there is no budget)."""
    if budget is None or size.at(n) <= budget:
        return None
    if size.per_sample <= 0:
        return None
    fits = max(1, math.floor((budget - size.fixed) / size.per_sample))
    return None if fits >= n else fits


__all__ = ["MIN_SPLIT_BYTES", "GraphSize", "batch_tensors", "fitting_micro_batch", "measure_graph", "saved_bytes"]
