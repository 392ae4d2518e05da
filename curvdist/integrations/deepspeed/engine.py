"""What the integration reads from a ``DeepSpeedEngine``: its type, ZeRO stage, data-parallel process group, raw
JSON configuration, and its parameters in full (gathered from their ZeRO-3 partitions for the duration of a
``with`` block)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from .dependency import require_deepspeed


def check_engine(engine: Any) -> None:
    """Refuse anything but a data-parallel ``deepspeed.DeepSpeedEngine`` with a :class:`ConfigError` naming it."""
    deepspeed = require_deepspeed()
    if not isinstance(engine, deepspeed.DeepSpeedEngine):
        raise ConfigError(
            f"expected a deepspeed.DeepSpeedEngine (the first value deepspeed.initialize returns), got "
            f"{type(engine).__module__}.{type(engine).__name__}"
        )
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        raise ConfigError("pipeline-parallel DeepSpeed engines are not supported: every rank must hold the whole "
                          "model (data parallelism, any ZeRO stage)")
    if getattr(engine, "mpu", None) is not None:
        raise ConfigError("DeepSpeed engines with a model-parallel unit (mpu) are not supported: every rank must "
                          "hold the whole model (data parallelism, any ZeRO stage)")


def zero_stage(engine: Any) -> int:
    """The engine's ZeRO stage (0-3)."""
    return int(engine.zero_optimization_stage())


def data_parallel_group(engine: Any) -> Any:
    """The process group over which the engine averages gradients (``None``: the default group)."""
    return getattr(engine, "data_parallel_group", None)


def raw_config(source: Any) -> dict[str, Any]:
    """The DeepSpeed configuration as a dict, from a dict, a JSON file path, or an engine (whose ``config`` is what
    was passed to ``deepspeed.initialize``)."""
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)):
        from ...queries.specs import read_mapping

        return read_mapping(source, "JSON", json.loads, json.JSONDecodeError, "DeepSpeed config file")
    config = getattr(source, "config", None)
    if isinstance(config, (dict, str, Path)):
        return raw_config(config)
    parsed = getattr(getattr(source, "_config", None), "_param_dict", None)  # e.g. a config passed via args
    if isinstance(parsed, dict):
        return parsed
    raise ConfigError(f"cannot read a DeepSpeed configuration from {type(source).__name__}; pass the engine, the "
                      f"config dict or the path of its JSON file")


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its data live in per-rank partitions)."""
    return hasattr(param, "ds_id")


@contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside the block every parameter of ``module`` holds its full value on every rank: ZeRO-3 partitions are
    gathered (read-only, ``modifier_rank=None``) and released on exit; other parameters are left alone."""
    params = [p for p in module.parameters() if is_partitioned(p)]
    if not params:
        yield
        return
    deepspeed = require_deepspeed()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextmanager
def torch_linear() -> Iterator[None]:
    """Inside the block ``torch.nn.functional.linear`` is torch's own kernel again.

    A ZeRO-3 engine replaces it process-wide by a memory-efficient custom ``autograd.Function`` (DeepSpeed's
    ``memory_efficient_linear``, on by default) that has no forward-mode derivative, so curvdist's
    forward-over-reverse products would fail. The replacement is put back on exit.
    """
    import torch.nn.functional as F

    current = F.linear
    original = torch._C._nn.linear
    if current is original:
        yield
        return
    F.linear = original
    try:
        yield
    finally:
        F.linear = current
