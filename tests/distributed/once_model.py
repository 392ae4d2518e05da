"""Model factories for the stage tests (imported by the stage actors from the spec): MLPs whose last op a stage's
pass cannot take — a backward that cannot be differentiated again, a forward that raises, an autograd.Function
without forward mode."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _CubeOnce(torch.autograd.Function):
    """x³ with forward-mode AD (the stages' forward pass takes a JVP) and a reverse-mode backward marked
    once_differentiable."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.x = inputs[0]

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor) -> Tensor:
        return 3 * ctx.x**2 * x_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class CubeOnce(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _CubeOnce.apply(x)


def cube_once_mlp(seed: int = 0) -> nn.Sequential:
    """64 → 5 → tanh → 10 → x³ (once differentiable): the cube is the model's last op, so its incoming gradient in
    a first backward pass is the loss's, which does not depend on the parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10), CubeOnce())


class Refuses(nn.Module):
    """Raises in its forward pass (what a stage does with input it cannot take)."""

    def forward(self, x: Tensor) -> Tensor:
        raise ValueError("this layer refuses its input")


def refusing_mlp(seed: int = 0) -> nn.Sequential:
    """64 → 5 → 10 → a layer whose forward raises: the last stage's forward fails."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10), Refuses())


class _OldStyleCube(torch.autograd.Function):
    """x³ as an autograd.Function in the old style (``forward(ctx, x)``, no ``setup_context`` and no ``jvp``):
    reverse mode works, torch.func's forward mode refuses it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class OldStyleCube(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _OldStyleCube.apply(x)


def old_style_mlp(seed: int = 0) -> nn.Sequential:
    """64 → 5 → tanh → 10 → x³ by an old-style autograd.Function: the last stage's forward-mode pass fails."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10), OldStyleCube())
