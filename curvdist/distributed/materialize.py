"""Pipeline stages that never hold the whole model: the model is built once by the coordinator and published
tensor by tensor, and every stage builds the model's structure on the ``meta`` device, gives it uninitialized
storage (``to_empty``: on the CPU, address space whose pages are never touched, so never resident), fetches its
buffers, traces and cuts it, and then fetches only the parameters it uses (DESIGN §7).

Where the tensors wait: on one node, in files under a temporary directory (:class:`FileWeights`), deleted once
every stage has built; across nodes, in Ray's object store (:class:`StoredWeights`). On one node the object store
would cost the model's size for the rest of the session: its shared memory stays allocated after the objects are
freed (measured: the coordinator's resident shared memory stays at the model's size, 3.1 GB for GPT-2 large).

Peak resident memory of a stage's build is its own parameters plus the model's buffers, instead of the whole model
(on a GPU the uninitialized storage is allocated for the build). A stage that Ray restarts later builds the whole
model instead. Factories that cannot run on the ``meta`` device (they compute with their tensors while building)
fall back to the whole model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import ConfigError


class Weights(Protocol):
    """The published tensors of a model, by name (deduplicated parameter names, every buffer name)."""

    def fetch(self, name: str) -> Tensor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StoredWeights:
    """One object in Ray's object store per tensor."""

    refs: dict[str, Any]

    def fetch(self, name: str) -> Tensor:
        import ray

        return ray.get(self.refs[name])

    def close(self) -> None:
        """Nothing to do: the object store frees the tensors once the refs are dropped."""


@dataclass(frozen=True)
class FileWeights:
    """One ``torch.save`` file per tensor under ``directory`` (on the node of the coordinator and the stages)."""

    directory: str
    files: dict[str, str]

    def fetch(self, name: str) -> Tensor:
        return torch.load(os.path.join(self.directory, self.files[name]), weights_only=True)

    def close(self) -> None:
        """Delete the files (their pages go with them, whatever file system holds them)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _tensors(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    yield from ((name, p.detach()) for name, p in model.named_parameters())
    yield from ((name, b.detach()) for name, b in model.named_buffers(remove_duplicate=False))


def publish(ray: Any, model: nn.Module, via: str = "auto") -> StoredWeights | FileWeights:
    """``model``'s parameters (by their deduplicated names) and all its buffers (every name a module uses,
    persistent or not), for :func:`materialize_buffers` and :func:`materialize_parameters`: ``via="files"``
    (the default on a one-node cluster) or ``"object_store"`` (the default across nodes)."""
    if via == "auto":
        via = "files" if sum(1 for n in ray.nodes() if n.get("Alive")) == 1 else "object_store"
    if via == "object_store":
        return StoredWeights({name: ray.put(t) for name, t in _tensors(model)})
    if via != "files":
        raise ConfigError(f"publish via 'auto', 'files' or 'object_store', got {via!r}")
    directory = tempfile.mkdtemp(prefix="curvdist-weights-")
    files = {}
    try:
        for i, (name, t) in enumerate(_tensors(model)):
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view: torch.save would write its whole storage
            files[name] = f"{i}.pt"
            torch.save(t.cpu(), os.path.join(directory, files[name]))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return FileWeights(directory, files)


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


def materialize_buffers(model: nn.Module, weights: Weights, device: torch.device) -> None:
    """Replace every buffer of a skeleton by its value (buffers are small next to the parameters, and a
    stage's traced graph may read any of them)."""
    for module, leaf, name in list(_slots(model, "_buffers")):
        module._buffers[leaf] = weights.fetch(name).to(device)


def materialize_parameters(model: nn.Module, names: Iterable[str], weights: Weights,
                           device: torch.device) -> dict[str, Tensor]:
    """Fetch the parameters ``names`` (deduplicated names, as in ``model.named_parameters()``) and put them into every
    module slot that holds them (tied weights included); returns them by name. The other parameters stay
    uninitialized."""
    named = dict(model.named_parameters())
    real: dict[int, nn.Parameter] = {}
    values = {}
    for n in names:
        meta = named[n]
        t = weights.fetch(n).to(device)
        real[id(meta)] = nn.Parameter(t, requires_grad=meta.requires_grad)
        values[n] = t
    for module, leaf, _ in list(_slots(model, "_parameters")):
        p = module._parameters[leaf]
        if id(p) in real:
            module._parameters[leaf] = real[id(p)]
    return values
