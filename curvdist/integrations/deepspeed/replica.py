"""A clean replica of a training module: the network curvdist evaluates inside a DeepSpeed run.

DeepSpeed decorates the module it trains: forward hooks, ZeRO-3 partitioned parameters with bound methods,
bf16 weights. curvdist's products (``torch.func.functional_call``) and BackPACK's extended copies must see a plain
network instead, in the precision chosen for the curvature. :class:`Replica` is a structural copy — same classes,
same configuration attributes, no hooks, no DeepSpeed attributes, tied parameters still tied — whose parameters and
buffers are loaded from the training module (gathered under ZeRO-3) for one measurement and released afterwards,
so it holds no memory between measurements. It is always in eval mode; the training module is never touched.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .engine import full_parameters

#: attributes DeepSpeed adds to modules besides the ``ds_*`` ones
_DEEPSPEED_ATTRIBUTES = frozenset({"_external_params", "_original_parameters"})


def _foreign(key: str, value: Any) -> bool:
    """Training-framework state that has no place in a plain network."""
    if key.startswith("ds_") or key in _DEEPSPEED_ATTRIBUTES or isinstance(value, types.MethodType):
        return True
    owner = value if isinstance(value, type) else type(value)
    return getattr(owner, "__module__", "").split(".")[0] == "deepspeed"


def _is_hook_table(key: str, value: Any) -> bool:
    return "hooks" in key and isinstance(value, dict)


def _skeleton(module: nn.Module, dtype: torch.dtype, memo: dict[int, Any]) -> nn.Module:
    """A hook-free copy of ``module`` whose parameters are empty placeholders (shared objects stay shared)."""
    if id(module) in memo:
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers", "_modules"):
            continue
        if _is_hook_table(key, value):
            state[key] = type(value)()
        elif not _foreign(key, value):
            state[key] = set(value) if isinstance(value, set) else value
    new.__dict__.update(state)
    params: dict[str, nn.Parameter | None] = {}
    for name, p in module._parameters.items():
        if p is not None and id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty(0, dtype=dtype, device=p.device), requires_grad=p.requires_grad)
        params[name] = None if p is None else memo[id(p)]
    new.__dict__["_parameters"] = params
    new.__dict__["_buffers"] = {name: None if b is None else torch.empty(0, dtype=b.dtype, device=b.device)
                                for name, b in module._buffers.items()}
    new.__dict__["_modules"] = {name: None if c is None else _skeleton(c, dtype, memo)
                                for name, c in module._modules.items()}
    return new


class Replica:
    """A plain, eval-mode copy of ``module`` in ``dtype`` (floating parameters and buffers are cast to it).

    Use ``with replica.loaded(source): ...`` to fill it with the current values of ``source`` (the module it was
    made from, or one with the same structure) for the duration of the block.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        if not dtype.is_floating_point:
            raise TypeError(f"a replica needs a floating dtype, got {dtype}")
        self.dtype = dtype
        self.module = _skeleton(module, dtype, {}).eval()

    def _targets(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return dict(self.module.named_parameters()), dict(self.module.named_buffers())

    def load(self, source: nn.Module) -> None:
        """Copy the current parameters and buffers of ``source`` (gathered from ZeRO-3 partitions if need be)."""
        params, buffers = self._targets()
        with torch.no_grad(), full_parameters(source):
            src_params = dict(source.named_parameters())
            if set(src_params) != set(params):
                raise ValueError(f"the replica's parameters {sorted(params)} do not match the source's "
                                 f"{sorted(src_params)}")
            for name, p in params.items():
                p.data = self._cast(src_params[name])
            for name, b in source.named_buffers():
                if name in buffers:
                    self._set_buffer(name, self._cast(b))

    def _cast(self, t: Tensor) -> Tensor:
        t = t.detach()
        return t.to(dtype=self.dtype, copy=True) if t.is_floating_point() else t.clone()

    def _set_buffer(self, name: str, value: Tensor) -> None:
        owner, _, leaf = name.rpartition(".")
        module = self.module.get_submodule(owner) if owner else self.module
        module._buffers[leaf] = value

    def release(self) -> None:
        """Drop the loaded values (the replica keeps only its structure)."""
        params, buffers = self._targets()
        for p in params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        for name, b in buffers.items():
            self._set_buffer(name, torch.empty(0, dtype=b.dtype, device=b.device))

    @contextmanager
    def loaded(self, source: nn.Module) -> Iterator[nn.Module]:
        """The replica filled with ``source``'s current values inside the block, released afterwards."""
        self.load(source)
        try:
            yield self.module
        finally:
            self.release()
