"""Preconditioned ("Riemannian") gradient descent: θ ← θ − α (M + δI)⁻¹ g, with M from the metric catalogue.

The step −α M⁻¹g is a tangent vector: for a metric that transforms as a tensor (Fisher/GGN, a pull-back; diagonal
and Kronecker metrics under diagonal/per-layer Jacobians) the update is the same in every parametrization to first
order in α, and the continuous flow exactly (Amari 1998, natural gradient; Martens 2020); for a linear
reparametrization and a metric that is a tensor under it, exactly. M is rebuilt every ``refresh`` steps from the
model's current parameters on the given data, as curvdist computes it anywhere else — locally, or on Ray workers
(``problem=`` a :class:`~curvdist.distributed.data_parallel.RemoteProblem`: shard statistics reduced by the
coordinator, Kronecker factors eigendecomposed on the workers).

``metric="adam"`` is the metric Adam preconditions with, M = diag(√v̂) (Kingma & Ba 2015), from the optimizer's own
moving average v of squared gradients (β₂), updated at every step.
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
            ``empirical_fisher_diag``, ``kfac``, ``kflr``, ``pullback`` for a model made by ``cd.reparametrize``,
            ``adam``...) or a callable ``problem -> Metric``.
        problem: instead of ``loss``/``data``, a problem over the same parameters (e.g. a ``RemoteProblem`` whose
            data live on Ray workers); its parameters are moved to the model's before every refresh.
        beta2: the moving-average factor of ``metric="adam"``.
        lr, damping, momentum: step size α, damping δ, heavy-ball momentum.
        refresh: rebuild the metric every ``refresh`` steps.
    A metric refresh or a direction that is not finite raises and leaves the parameters unchanged.
    """

    def __init__(self, model: nn.Module, loss: str | None = None, data: Any = None,
                 metric: str | Callable[[Problem], Metric] = "fisher", lr: float = 0.1, damping: float = 1e-3,
                 refresh: int = 10, momentum: float = 0.0, params: Sequence[str] | None = None,
                 batch_size: int | None = None, metric_options: dict[str, Any] | None = None,
                 problem: Problem | None = None, beta2: float = 0.999) -> None:
        if not lr > 0:
            raise ProblemError(f"lr must be positive, got {lr!r}")
        if not isinstance(refresh, int) or refresh < 1:
            raise ProblemError(f"refresh must be a positive integer, got {refresh!r}")
        if not 0 <= momentum < 1:
            raise ProblemError(f"momentum must lie in [0, 1), got {momentum!r}")
        if not 0 <= beta2 < 1:
            raise ProblemError(f"beta2 must lie in [0, 1), got {beta2!r}")
        named = dict(model.named_parameters())
        if problem is not None:
            if params is not None and list(params) != list(problem.param_names):
                raise ProblemError(f"params {list(params)} differ from the problem's {list(problem.param_names)}")
            params = list(problem.param_names)
        elif loss is None or data is None:
            raise ProblemError("RiemannianSGD needs loss= and data= (or problem=) to build its metric")
        names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ProblemError(f"unknown parameter names {unknown}")
        super().__init__([named[n] for n in names], {"lr": lr, "momentum": momentum})
        self.model, self.loss, self.data, self.names = model, loss, data, names
        self.metric_kind, self.damping, self.refresh = metric, damping, refresh
        self.batch_size, self.metric_options = batch_size, dict(metric_options or {})
        self.problem, self.beta2 = problem, beta2
        self.metric: Metric | None = None
        self.steps = 0
        self._buffer: Tensor | None = None
        self._sq: Tensor | None = None  # Adam's v for metric="adam"

    def _current_problem(self) -> Problem:
        if self.problem is None:
            return Problem(self.model, self.loss, self.data, params=self.names, batch_size=self.batch_size)
        if hasattr(self.problem, "set_params"):  # data on Ray workers: move them to the current point
            self.problem.set_params(tuple(p.detach() for p in self.param_groups[0]["params"]))
        return self.problem

    def refresh_metric(self) -> Metric:
        """Rebuild M at the current parameters (the model's train/eval mode is respected as it is)."""
        if self.metric_kind == "adam":
            return self._adam_metric()
        problem = self._current_problem()
        if callable(self.metric_kind):
            M = self.metric_kind(problem)
        else:
            M = metric(problem, self.metric_kind, self.damping, **self.metric_options)
        if not isinstance(M, Metric) or M.dim != problem.dim:
            raise MetricError(f"the metric must be a curvdist Metric of dimension {problem.dim}")
        self.metric = M
        return M

    def _adam_metric(self) -> Metric:
        from ..geometry.metrics.base import DiagonalMetric

        if self._sq is None:
            raise ProblemError("the adam metric needs a gradient first")
        v_hat = self._sq / (1 - self.beta2 ** (self.steps + 1))
        self.metric = DiagonalMetric(v_hat.sqrt(), self.damping, kind="adam")
        return self.metric

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
        if self.metric_kind == "adam":  # v ← β₂ v + (1 − β₂) g², from v = 0
            prev = torch.zeros_like(g) if self._sq is None else self._sq
            self._sq = self.beta2 * prev + (1 - self.beta2) * g * g
        with torch.enable_grad():  # metrics differentiate the model (torch.func, BackPACK)
            if self.metric is None or self.steps % self.refresh == 0 or self.metric_kind == "adam":
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
