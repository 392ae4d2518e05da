"""Pipeline stages that never hold the whole model: the model is built once by the coordinator, its tensors are
put into Ray's object store one by one, and every stage builds the model's structure on the ``meta`` device,
gives it uninitialized storage (``to_empty``: on the CPU, address space whose pages are never touched, so never
resident), fetches its buffers, traces and cuts it, and then fetches only the parameters it uses (DESIGN §7).

Peak resident memory of a stage's build is its own parameters plus the model's buffers, instead of the whole model
(on a GPU the uninitialized storage is allocated for the build). The refs are dropped once every stage has built, so
the object store lets the model go; a stage that Ray restarts later builds the whole model instead. Factories that
cannot run on the ``meta`` device (they compute with their tensors while building) fall back to the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def publish(ray: Any, model: nn.Module) -> dict[str, Any]:
    """Object refs of ``model``'s parameters (by their deduplicated names) and of all its buffers (every name a
    module uses, persistent or not), one object each, for :func:`materialize_buffers` and
    :func:`materialize_parameters`."""
    refs = {name: ray.put(p.detach()) for name, p in model.named_parameters()}
    for name, b in model.named_buffers(remove_duplicate=False):
        refs[name] = ray.put(b.detach())
    return refs


def _slots(model: nn.Module, kind: str) -> Iterable[tuple[nn.Module, str, str]]:
    """(module, attribute, full name) of every parameter or buffer slot, tied ones under each name."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        for leaf, t in getattr(module, kind).items():
            if t is not None:
                yield module, leaf, f"{prefix}.{leaf}" if prefix else leaf


def to_empty(model: nn.Module, device: torch.device) -> None:
    """``model.to_empty(device)`` keeping tied parameters tied (moving off ``meta`` makes new ``Parameter`` objects,
    which would untie a head from its embedding)."""
    before = [(module, leaf, id(module._parameters[leaf])) for module, leaf, _ in _slots(model, "_parameters")]
    model.to_empty(device=device)
    first: dict[int, nn.Parameter] = {}
    for module, leaf, key in before:
        p = module._parameters[leaf]
        if key in first:
            module._parameters[leaf] = first[key]
        else:
            first[key] = p


def materialize_buffers(ray: Any, model: nn.Module, refs: Mapping[str, Any], device: torch.device) -> None:
    """Replace every buffer of a skeleton by its value (buffers are small next to the parameters, and a
    stage's traced graph may read any of them)."""
    for module, leaf, name in list(_slots(model, "_buffers")):
        module._buffers[leaf] = ray.get(refs[name]).to(device)


def materialize_parameters(ray: Any, model: nn.Module, names: Iterable[str], refs: Mapping[str, Any],
                           device: torch.device) -> dict[str, Tensor]:
    """Fetch the parameters ``names`` (deduplicated names, as in ``model.named_parameters()``) and put them into every
    module slot that holds them (tied weights included); returns them by name. The other parameters stay
    uninitialized."""
    named = dict(model.named_parameters())
    real: dict[int, nn.Parameter] = {}
    values = {}
    for n in names:
        meta = named[n]
        t = ray.get(refs[n]).to(device)
        real[id(meta)] = nn.Parameter(t, requires_grad=meta.requires_grad)
        values[n] = t
    for module, leaf, _ in list(_slots(model, "_parameters")):
        p = module._parameters[leaf]
        if id(p) in real:
            module._parameters[leaf] = real[id(p)]
    return values
