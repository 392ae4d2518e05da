"""Build live objects from a validated config: model, data, problem, optional training to a minimum."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError, CurvdistError
from ..problem import Problem
from ..problem.data import as_batches
from .config import Config, ModelSpec, TrainSpec


def import_callable(path: str, key: str) -> Callable[..., Any]:
    """Resolve ``"package.module:attr"``; errors name the config key."""
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


def _call(path: str, kwargs: dict[str, Any], key: str) -> Any:
    fn = import_callable(path, key)
    try:
        return fn(**kwargs)
    except CurvdistError:
        raise
    except Exception as e:  # user code: report which factory failed and why, not a traceback
        raise ConfigError(f"{key} '{path}' failed with {type(e).__name__}: {e}") from e


def build_model(spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    model = _call(spec.factory, spec.kwargs, "model.factory")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory '{spec.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    model = model.to(dtype)
    if spec.checkpoint:
        path = Path(spec.checkpoint)
        if not path.is_file():
            raise ConfigError(f"model.checkpoint: file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:
            raise ConfigError(f"model.checkpoint: cannot load {path}: {str(e).splitlines()[0]}") from None
        model = model.to(dtype)
    return model


def build_data(cfg: Config) -> Any:
    data = _call(cfg.data.factory, cfg.data.kwargs, "data.factory")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    if isinstance(data, Dataset):
        if cfg.data.batch_size is None:
            raise ConfigError("data.batch_size is required when data.factory returns a Dataset")
        return data
    raise ConfigError(
        f"data.factory '{cfg.data.factory}' returned {type(data).__name__}; expected a Dataset or an (X, y) tuple"
    )


def train(model: nn.Module, problem: Problem, spec: TrainSpec) -> tuple[dict[str, Any], torch.optim.Optimizer]:
    """A few optimizer steps on the problem's batches (cycled), to reach a minimum before measuring."""
    params = [dict(model.named_parameters())[n] for n in problem.param_names]
    opts = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    kwargs: dict[str, Any] = {"lr": spec.lr, "weight_decay": spec.weight_decay}
    if spec.optimizer == "sgd":
        kwargs["momentum"] = spec.momentum
    opt = opts[spec.optimizer](params, **kwargs)
    t0 = time.perf_counter()
    step = 0
    model.train()
    while step < spec.steps:
        for X, y in problem.batches():
            if step >= spec.steps:
                break
            opt.zero_grad()
            loss = problem.loss.per_sample(model(X), y).mean()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    return {"steps": spec.steps, "optimizer": spec.optimizer, "lr": spec.lr,
            "final_loss": problem.value(), "seconds": time.perf_counter() - t0}, opt


def build_problem(cfg: Config) -> tuple[Problem, dict[str, Any] | None, torch.optim.Optimizer | None]:
    """Model + data + loss → Problem (trained first when the config asks; the optimizer is returned too)."""
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    model = build_model(cfg.model, dtype)
    data = as_batches(build_data(cfg), cfg.data.batch_size)
    model.eval()
    problem = Problem(model, cfg.loss, data, params=cfg.params, reduction=cfg.reduction)
    info, opt = None, None
    if cfg.train is not None and cfg.train.steps > 0:
        info, opt = train(model, problem, cfg.train)
        problem = Problem(model, cfg.loss, data, params=cfg.params, reduction=cfg.reduction)
    return problem, info, opt
