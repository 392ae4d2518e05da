"""Build live objects from a validated config: model, data, problem, optional training to a minimum."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..problem import Problem
from ..problem.data import Inputs, as_batches
from ..problem.outputs import call
from ..problem.spec import ProblemSpec
from .config import Config, MetricSpec, TrainSpec


def spec_of(cfg: Config) -> ProblemSpec:
    """The picklable problem spec a config describes (what distributed workers rebuild)."""
    return ProblemSpec(model_factory=cfg.model.factory, model_kwargs=dict(cfg.model.kwargs),
                       data_factory=cfg.data.factory, data_kwargs=dict(cfg.data.kwargs),
                       batch_size=cfg.data.batch_size, micro_batch_size=cfg.data.micro_batch_size,
                       checkpoint=cfg.model.checkpoint, loss=cfg.loss,
                       params=tuple(cfg.params) if cfg.params else None, reduction=cfg.reduction, dtype=cfg.dtype,
                       seed=cfg.seed)


def make_optimizer(model: nn.Module, problem: Problem, spec: TrainSpec, metric_problem: Problem | None = None
                   ) -> torch.optim.Optimizer:
    """The optimizer of a ``train`` section over the problem's parameters. ``riemannian_sgd`` builds its metric
    (``train.metric``, default KFAC with damping 1e-3) on the problem's data, or on ``metric_problem`` (a
    data-parallel ``ShardedProblem`` on Ray workers) when given."""
    params = [dict(model.named_parameters())[n] for n in problem.param_names]
    if spec.optimizer == "riemannian_sgd":
        from ..optim import RiemannianSGD

        m = spec.metric if spec.metric is not None else MetricSpec(kind="kfac", damping=1e-3)
        if spec.weight_decay:
            raise ConfigError("train.weight_decay is not supported by riemannian_sgd")
        common = dict(metric=m.kind, lr=spec.lr, damping=m.damping, refresh=spec.refresh, momentum=spec.momentum,
                      params=list(problem.param_names), metric_options=dict(m.options))
        if metric_problem is not None:
            return RiemannianSGD(model, problem=metric_problem, **common)  # type: ignore[arg-type]
        return RiemannianSGD(model, problem.loss.name, problem.data, **common)  # type: ignore[arg-type]
    if spec.metric is not None:
        raise ConfigError(f"train.metric is used by riemannian_sgd only, not by {spec.optimizer}")
    opts = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    kwargs: dict[str, Any] = {"lr": spec.lr, "weight_decay": spec.weight_decay}
    if spec.optimizer == "sgd":
        kwargs["momentum"] = spec.momentum
    return opts[spec.optimizer](params, **kwargs)


def train_step(model: nn.Module, problem: Problem, opt: torch.optim.Optimizer, X: Inputs, y: Tensor) -> float:
    """One optimizer step on the mini-batch (X, y) with the batch-mean loss (mean over the batch's loss terms:
    samples, or non-ignored tokens); returns the loss before the step."""
    opt.zero_grad()
    per_sample = problem.loss.per_sample(call(model, X), y)
    loss = per_sample.mean() if problem.loss.event_ndim == 1 else per_sample.sum() / max(problem.loss.count(y), 1)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train(model: nn.Module, problem: Problem, spec: TrainSpec) -> tuple[dict[str, Any], torch.optim.Optimizer]:
    """A few optimizer steps on the problem's batches (cycled), to reach a minimum before measuring."""
    opt = make_optimizer(model, problem, spec)
    t0 = time.perf_counter()
    step = 0
    model.train()
    while step < spec.steps:
        for X, y in problem.batches():
            if step >= spec.steps:
                break
            train_step(model, problem, opt, X, y)
            step += 1
    model.eval()
    return {"steps": spec.steps, "optimizer": spec.optimizer, "lr": spec.lr,
            "final_loss": problem.value(), "seconds": time.perf_counter() - t0}, opt


def build_problem(cfg: Config) -> tuple[Problem, dict[str, Any] | None, torch.optim.Optimizer | None]:
    """Model + data + loss → Problem (trained first when the config asks; the optimizer is returned too)."""
    spec = spec_of(cfg)
    model = spec.build_model()
    data = as_batches(spec.build_data(), cfg.data.batch_size)
    problem = Problem(model, cfg.loss, data, params=cfg.params, reduction=cfg.reduction,
                      micro_batch_size=cfg.data.micro_batch_size)
    info, opt = None, None
    if cfg.train is not None and cfg.train.steps > 0:
        info, opt = train(model, problem, cfg.train)
        problem = Problem(model, cfg.loss, data, params=cfg.params, reduction=cfg.reduction,
                          micro_batch_size=cfg.data.micro_batch_size)
    return problem, info, opt
