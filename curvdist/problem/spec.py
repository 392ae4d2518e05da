"""Picklable problem specifications: how workers (Ray actors, DeepSpeed ranks) rebuild a problem.

A spec names import paths and plain keyword arguments — never live modules — plus, optionally, a parameter state
(a ``state_dict`` of tensors, e.g. after training) that overrides the factory's initialization. ``build`` makes the
model and the data shard ``shard`` of ``shards`` (contiguous, disjoint, sizes differing by at most one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError, CurvdistError, ProblemError
from .problem import Problem


def import_callable(path: str, key: str = "factory") -> Callable[..., Any]:
    """Resolve ``"package.module:attr"``; errors name the config key."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ConfigError(f"{key}: expected an import path 'module:callable', got {path!r}")
    module_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module '{module_name}' ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: '{path}' is not callable")
    return obj


def call_factory(path: str, kwargs: Mapping[str, Any], key: str) -> Any:
    fn = import_callable(path, key)
    try:
        return fn(**kwargs)
    except CurvdistError:
        raise
    except Exception as e:  # user code: report which factory failed and why
        raise ConfigError(f"{key} '{path}' failed with {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class ProblemSpec:
    """Everything needed to rebuild a problem in another process."""

    model_factory: str
    data_factory: str
    loss: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    micro_batch_size: int | None = None
    checkpoint: str | None = None
    state: dict[str, torch.Tensor] | None = None
    params: tuple[str, ...] | None = None
    reduction: str = "mean"
    dtype: str = "float64"
    seed: int = 0

    def with_state(self, model: nn.Module) -> ProblemSpec:
        """The same spec with the model's current parameters and buffers (detached CPU copies) as its state."""
        return replace(self, state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    def build_model(self, device: torch.device | str = "cpu") -> nn.Module:
        torch.manual_seed(self.seed)
        dtype = getattr(torch, self.dtype)
        model = call_factory(self.model_factory, self.model_kwargs, "model.factory")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.factory '{self.model_factory}' returned {type(model).__name__}, "
                              "not a torch.nn.Module")
        model = model.to(dtype)
        if self.checkpoint:
            path = Path(self.checkpoint)
            if not path.is_file():
                raise ConfigError(f"model.checkpoint: file not found: {path}")
            try:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:
                raise ConfigError(f"model.checkpoint: cannot load {path}: {str(e).splitlines()[0]}") from None
        if self.state is not None:
            model.load_state_dict(self.state)
        return model.to(device=device, dtype=dtype).eval()

    def build_skeleton(self) -> nn.Module:
        """The model's structure on the ``meta`` device (no memory for its tensors), in the spec's dtype: what a
        pipeline stage traces and cuts before it materializes only its own parameters
        (:mod:`curvdist.distributed.materialize`). The values come from elsewhere: checkpoint and state are not
        loaded."""
        with torch.device("meta"):
            model = call_factory(self.model_factory, self.model_kwargs, "model.factory")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.factory '{self.model_factory}' returned {type(model).__name__}, "
                              "not a torch.nn.Module")
        return model.to(getattr(torch, self.dtype)).eval()

    def build_data(self) -> Any:
        """What ``data.factory`` returns: an ``(X, y)`` tuple, a mapping of equal-length tensors with ``labels``
        (tokenized batches), a ``Dataset`` (with ``batch_size``) or a list of ``(X, y)`` / mapping batches."""
        data = call_factory(self.data_factory, self.data_kwargs, "data.factory")
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            return tuple(data)
        if isinstance(data, Mapping):
            return dict(data)
        if isinstance(data, Dataset):
            if self.batch_size is None:
                raise ConfigError("data.batch_size is required when data.factory returns a Dataset")
            return data
        if isinstance(data, list) and data and all(isinstance(b, (Mapping, tuple, list)) for b in data):
            return data
        raise ConfigError(f"data.factory '{self.data_factory}' returned {type(data).__name__}; expected a "
                          "Dataset, an (X, y) tuple, a mapping of tensors with 'labels' or a list of batches")

    def build(self, shard: int = 0, shards: int = 1, reduction: str | None = None,
              device: torch.device | str = "cpu") -> Problem:
        """The problem on data shard ``shard`` of ``shards`` (reduction overridable, e.g. "sum" on workers)."""
        if not 0 <= shard < shards:
            raise ProblemError(f"shard {shard} out of range for {shards} shards")
        model = self.build_model(device)
        full = self.build_data()
        data = shard_data(full, shard, shards)
        return Problem(model, self.loss, data, params=list(self.params) if self.params else None,
                       reduction=reduction or self.reduction, batch_size=self.batch_size,
                       micro_batch_size=self.micro_batch_size, sample_offset=shard_offset(full, shard, shards))


def shard_bounds(n: int, shard: int, shards: int) -> tuple[int, int]:
    """[start, stop) of contiguous shard ``shard`` of n items split into ``shards`` near-equal parts."""
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return int(bounds[shard]), int(bounds[shard + 1])


def shard_offset(data: Any, shard: int, shards: int) -> int:
    """The global index of the first sample of :func:`shard_data`'s shard ``shard`` (the samples of the batches
    before it, for a list of batches)."""
    if shards == 1 or shard == 0:
        return 0
    if isinstance(data, list):
        from .data import batch_len, unpack

        a, _ = shard_bounds(len(data), shard, shards)
        return sum(batch_len(unpack(b, i)[0]) for i, b in enumerate(data[:a]))
    n = next(iter(data.values())).shape[0] if isinstance(data, Mapping) else (
        data[0].shape[0] if isinstance(data, tuple) else len(data))
    return shard_bounds(n, shard, shards)[0]


def shard_data(data: Any, shard: int, shards: int) -> Any:
    if shards == 1:
        return data
    if isinstance(data, Mapping):  # tensors along the first axis: contiguous samples
        n = next(iter(data.values())).shape[0]
        if n < shards:
            raise ProblemError(f"{n} samples cannot be split into {shards} non-empty shards")
        a, b = shard_bounds(n, shard, shards)
        return {k: v[a:b] for k, v in data.items()}
    if isinstance(data, list):  # a list of batches: contiguous batches
        if len(data) < shards:
            raise ProblemError(f"{len(data)} batches cannot be split into {shards} non-empty shards")
        a, b = shard_bounds(len(data), shard, shards)
        return data[a:b]
    if isinstance(data, tuple):
        n = data[0].shape[0]
        if n < shards:
            raise ProblemError(f"{n} samples cannot be split into {shards} non-empty shards")
        a, b = shard_bounds(n, shard, shards)
        return data[0][a:b], data[1][a:b]
    n = len(data)
    if n < shards:
        raise ProblemError(f"{n} samples cannot be split into {shards} non-empty shards")
    a, b = shard_bounds(n, shard, shards)
    return Subset(data, range(a, b))
