"""Preconditioned ("Riemannian") gradient descent: θ ← θ − α (M + δI)⁻¹ g, with M from the metric catalogue.

The step −α M⁻¹g is a tangent vector: for a metric that transforms as a tensor (Fisher/GGN, a pull-back; diagonal
and Kronecker metrics under diagonal/per-layer Jacobians) the update is the same in every parametrization to first
order in α, and the continuous flow exactly (Amari 1998, natural gradient; Martens 2020). M is rebuilt every
``refresh`` steps from the model's current parameters on the given data, as curvdist computes it anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MetricError, NonFiniteError, ProblemError
from ..geometry.metrics import Metric, metric
from ..problem.problem import Problem


class RiemannianSGD(torch.optim.Optimizer):
    """θ ← θ − lr · d,  d = (M + δI)⁻¹ g  (with optional momentum on d).

    Args:
        model: the network whose parameters are optimized (``params`` selects a subset by name).
        loss: ``"cross_entropy"`` or ``"mse"`` (the metric's loss).
        data: the data the metric is computed on (any form :class:`~curvdist.Problem` accepts).
        metric: a kind (``euclidean``, ``fisher``, ``ggn``, ``diag_ggn``, ``diag_fisher_mc``,
            ``empirical_fisher_diag``, ``kfac``, ``kflr``...) or a callable ``problem -> Metric``.
        lr, damping, momentum: step size α, damping δ, heavy-ball momentum.
        refresh: rebuild the metric every ``refresh`` steps.
    A metric refresh or a direction that is not finite raises and leaves the parameters unchanged.
    """

    def __init__(self, model: nn.Module, loss: str, data: Any, metric: str | Callable[[Problem], Metric] = "fisher",
                 lr: float = 0.1, damping: float = 1e-3, refresh: int = 10, momentum: float = 0.0,
                 params: Sequence[str] | None = None, batch_size: int | None = None,
                 metric_options: dict[str, Any] | None = None) -> None:
        if not lr > 0:
            raise ProblemError(f"lr must be positive, got {lr!r}")
        if not isinstance(refresh, int) or refresh < 1:
            raise ProblemError(f"refresh must be a positive integer, got {refresh!r}")
        if not 0 <= momentum < 1:
            raise ProblemError(f"momentum must lie in [0, 1), got {momentum!r}")
        if metric == "adam":
            raise MetricError("RiemannianSGD cannot use the adam metric (it reads an Adam optimizer's state)")
        named = dict(model.named_parameters())
        names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ProblemError(f"unknown parameter names {unknown}")
        super().__init__([named[n] for n in names], {"lr": lr, "momentum": momentum})
        self.model, self.loss, self.data, self.names = model, loss, data, names
        self.metric_kind, self.damping, self.refresh = metric, damping, refresh
        self.batch_size, self.metric_options = batch_size, dict(metric_options or {})
        self.metric: Metric | None = None
        self.steps = 0
        self._buffer: Tensor | None = None

    def refresh_metric(self) -> Metric:
        """Rebuild M at the current parameters (the model's train/eval mode is respected as it is)."""
        problem = Problem(self.model, self.loss, self.data, params=self.names, batch_size=self.batch_size)
        if callable(self.metric_kind):
            M = self.metric_kind(problem)
        else:
            M = metric(problem, self.metric_kind, self.damping, **self.metric_options)
        if not isinstance(M, Metric) or M.dim != problem.dim:
            raise MetricError(f"the metric must be a curvdist Metric of dimension {problem.dim}")
        self.metric = M
        return M

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.param_groups[0]["params"]
        missing = [n for n, p in zip(self.names, params) if p.grad is None]
        if missing:
            raise ProblemError(f"no gradient for {missing}: call loss.backward() before step()")
        g = torch.cat([p.grad.reshape(-1) for p in params]).detach()
        with torch.enable_grad():  # metrics differentiate the model (torch.func, BackPACK)
            if self.metric is None or self.steps % self.refresh == 0:
                self.refresh_metric()
            assert self.metric is not None
            d = self.metric.solve(g).detach()
        if not bool(torch.isfinite(d).all()):
            raise NonFiniteError("the preconditioned direction (M + δI)⁻¹g is NaN or inf; the parameters were not "
                                 "changed (raise damping)")
        group = self.param_groups[0]
        if group["momentum"]:
            self._buffer = d if self._buffer is None else group["momentum"] * self._buffer + d
            d = self._buffer
        i = 0
        for p in params:
            k = p.numel()
            p.add_(d[i:i + k].view_as(p), alpha=-group["lr"])
            i += k
        self.steps += 1
        return loss
