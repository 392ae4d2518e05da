"""The metric an Adam/AdamW optimizer preconditions with (Kingma & Ba, "Adam: A method for stochastic
optimization", ICLR 2015; Loshchilov & Hutter, ICLR 2019, for AdamW).

Adam's update is θ ← θ − α m̂ / (√v̂ + ε), a preconditioned gradient step with the diagonal metric

    M = diag(√v̂) + ε I,     v̂ = v / (1 − β₂^t),

where v (``exp_avg_sq`` in torch's optimizer state) is the exponential moving average of squared gradients after
t steps (``max_exp_avg_sq``, the running maximum, for ``amsgrad=True``, which is what that variant divides by).
Damping adds δ: M_δ = diag(√v̂) + (ε + δ) I.

A diagonal metric transforms as a tensor only under reparametrizations with a diagonal Jacobian (elementwise maps,
per-layer scalings): v̂ was accumulated in the current coordinates, and the diagonal of a transformed matrix is
not the transformed diagonal otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import MetricError
from ...problem.problem import Problem
from .backpack_metrics import entry_names
from .base import DiagonalMetric

__all__ = ["adam"]


def adam(problem: Problem, optimizer: torch.optim.Optimizer, damping: float = 0.0,
         eps: float | None = None) -> DiagonalMetric:
    """M_δ = diag(√v̂) + ε + δ from the state of ``optimizer`` for the problem's selected parameters (kind "adam").

    Parameters are matched by identity: the optimizer must hold the very tensors
    ``dict(problem.model.named_parameters())[name]``. β₂ and ε are read from each parameter's group
    (``eps`` overrides ε). A diagonal metric is a tensor only under reparametrizations with a diagonal Jacobian.

    Raises:
        MetricError: ``optimizer`` is not a ``torch.optim.Adam``/``AdamW``; it does not hold a selected parameter;
            it has no state for one yet (take at least one optimizer step first); ``eps`` < 0.
        SingularMetricError: an entry of √v̂ + ε + δ is 0 (possible only with ε = δ = 0).
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise MetricError(f"the adam metric needs a torch.optim.Adam or AdamW optimizer, got "
                          f"{type(optimizer).__name__}")
    if eps is not None and not eps >= 0:
        raise MetricError(f"eps must be ≥ 0, got {eps!r}")
    named = dict(problem.model.named_parameters())
    group_of: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group

    pieces: list[Tensor] = []
    not_held, no_state = [], []
    for name in problem.param_names:
        p = named[name]
        group = group_of.get(id(p))
        if group is None:
            not_held.append(name)
            continue
        state = optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        if key not in state or "step" not in state:
            no_state.append(name)
            continue
        step = float(state["step"])
        if step < 1:
            no_state.append(name)
            continue
        beta2 = float(group["betas"][1])
        e = float(group["eps"]) if eps is None else float(eps)
        v_hat = state[key].detach().to(problem.device, problem.dtype) / (1.0 - beta2**step)
        pieces.append((v_hat.sqrt() + e).reshape(-1))
    if not_held:
        raise MetricError(f"the optimizer does not hold the selected parameters {not_held} (it must be built on "
                          f"problem.model's own parameter tensors)")
    if no_state:
        raise MetricError(f"the optimizer has no Adam state for {no_state}: take at least one optimizer step "
                          f"before building the adam metric")
    diag = torch.cat(pieces)
    return DiagonalMetric(diag, damping=damping, kind="adam", names=entry_names(problem, diag, damping))
