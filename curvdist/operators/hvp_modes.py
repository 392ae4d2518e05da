"""Hessian-vector product kernels: the ways to compute H_b v = ∇²_θ ℓ_b(θ) v for one (micro-)batch b.

Every kernel takes the problem's ``batch_loss(params, X, y)`` (the unscaled sum of the per-sample losses of one
batch), the parameters θ and a direction v (tuples of parameter-shaped tensors), and returns H_b v in the same
form. The inputs X are handed to ``batch_loss`` untouched (a tensor or a mapping of tensors).

``forward_over_reverse``
    H v = d/dt ∇ℓ(θ + t v) at t = 0: a forward-mode derivative (a dual-number pass) of the reverse-mode gradient
    (Pearlmutter 1994, "Fast exact multiplication by the Hessian", Neural Computation 6(1):147–160). Single
    vector: core ``torch.autograd.forward_ad`` dual parameters through one ``torch.autograd.grad``, or
    ``torch.func.jvp(torch.func.grad(ℓ))`` where core forward AD lacks a rule (``silu_backward``, which torch.func
    decomposes). Block: ``vmap`` of the torch.func product. Needs forward-mode derivatives of the backward ops.
``reverse_over_reverse``
    H v = ∇_θ ⟨∇ℓ(θ), v⟩: a second reverse pass through the graph of the first ("double backward", also
    Pearlmutter 1994). Single vector: plain ``torch.autograd.grad`` with ``create_graph=True``, then a second
    ``torch.autograd.grad`` with v as the output gradient — the same computation as a hand-written double-backward
    HVP. Block: one ``torch.func.vjp`` of ``torch.func.grad(ℓ)`` with its pullback ``vmap``-ed over the vectors,
    or the kept autograd graph of ∇ℓ with one backward per vector. Needs only twice-differentiable backward
    formulas: the mode for models with ops that lack forward-mode AD. A backward marked ``once_differentiable``
    is detected (torch would silently drop its terms) and makes the mode fail.
``finite_difference``
    H v ≈ (∇ℓ(θ + εv) − ∇ℓ(θ − εv)) / 2ε, a central difference of two gradients (Nocedal & Wright, "Numerical
    Optimization", 2nd ed. 2006, §8.1: central differences, Hessian-vector products from gradients); for engines
    with a first-order backward only. Its error is the truncation (ε²/6)‖D³(∇ℓ)(ξ)[v, v, v]‖ (the third
    derivative of the gradient map, i.e. O(ε²‖v‖³‖∇⁴ℓ‖)) plus the rounding O(u‖∇ℓ‖/ε) of the two gradients in unit
    roundoff u; balancing the two gives ε ∝ u^{1/3}. The step is ε = h · max(1, ‖θ‖) / ‖v‖ with h = ``fd_step``
    (default u^{1/3} of the working dtype: 4.8e-6 in float64, 3.9e-3 in float32), so θ moves by h relative to its
    size; the relative error is then O(h²) + O(u/h) ≈ u^{2/3} (2.3e-11 in float64, 1.5e-5 in float32) times
    constants of the problem. That bound needs ∇ℓ smooth along θ ± εv: on piecewise-linear networks (ReLU,
    max-pool) a step that crosses a kink adds the jump of the gradient divided by 2ε, and the difference can be
    orders of magnitude away from the almost-everywhere Hessian the exact modes return (seen on a narrow
    ResNet-18: relative errors from 1e-9 to 1e2 in float64 depending on v, about 10 in float32).

Products written with the ``torch.func`` transforms (:func:`func_kernel`) are the ones :func:`compile_kernel`
hands to ``torch.compile``: dynamo traces the transforms into one graph, whereas it breaks the graph at
``torch.autograd.grad``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.func import grad, jvp, vjp, vmap

from ..catalogue import HVPMode
from ..errors import ProblemError, first_line
from .cotangents import check_twice_differentiable, gradient_edges

Params = tuple[Tensor, ...]
#: the graph of ∇ℓ without its values: per parameter, the edge where its gradient was made (None where the
#: gradient does not depend on the parameters)
Edges = tuple[GradientEdge | None, ...]
BatchLoss = Callable[[Params, Any, Tensor], Tensor]
#: a per-batch product: (params, v, X, y) -> H_b v (or H_b V for a block of vectors stacked on a leading axis)
Kernel = Callable[[Params, Params, Any, Tensor], Params]

EXACT_MODES: tuple[HVPMode, ...] = (HVPMode.FORWARD_OVER_REVERSE, HVPMode.REVERSE_OVER_REVERSE)


# ---------------------------------------------------------------- steps
def unit_roundoff(dtype: torch.dtype) -> float:
    """u = ε_machine / 2 of a floating dtype (1.1e-16 for float64, 6.0e-8 for float32)."""
    return float(torch.finfo(dtype).eps) / 2.0


def default_fd_step(dtype: torch.dtype) -> float:
    """h = u^{1/3}: the relative step that balances truncation O(h²) and rounding O(u/h) of a central difference."""
    return unit_roundoff(dtype) ** (1.0 / 3.0)


def fd_epsilon(params: Params, v: Params, step: float) -> Tensor:
    """ε = step · max(1, ‖θ‖) / ‖v‖ as a 0-d tensor of the working dtype (0 where v = 0)."""
    theta = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in params]))
    vnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in v]))
    eps = step * torch.clamp(theta, min=1.0) / vnorm
    return torch.where(vnorm > 0, eps, torch.zeros_like(eps))


# ---------------------------------------------------------------- eager kernels (plain autograd)
def leaves_of(params: Params) -> Params:
    """Leaf views of the parameters that require gradients (no copies)."""
    return tuple(p.detach().requires_grad_(True) for p in params)


def _gradient(loss: Tensor, leaves: Params, create_graph: bool = False) -> Params:
    return torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True, materialize_grads=True)


def forward_over_reverse(batch_loss: BatchLoss, params: Params, v: Params, X: Any, y: Tensor) -> Params:
    """H_b v as the tangent of ∇ℓ_b at dual parameters θ + v·δ (core forward-mode AD over one backward)."""
    with torch.enable_grad(), fwAD.dual_level():
        leaves = leaves_of(params)
        duals = tuple(fwAD.make_dual(p, t) for p, t in zip(leaves, v))
        g = _gradient(batch_loss(duals, X, y), leaves)
        out = []
        for gi in g:
            tangent = fwAD.unpack_dual(gi).tangent
            out.append(torch.zeros_like(gi) if tangent is None else tangent)
    return tuple(t.detach() for t in out)


def _gradient_edges(loss: Tensor, leaves: Params) -> Edges:
    """∇ℓ's graph, built by a backward pass with ``create_graph``, without ∇ℓ's values: each entry is let go as it
    is made (:func:`~curvdist.operators.cotangents.gradient_edges`), a gradient's worth of memory less while the
    graph lives. A second backward from the edges with cotangents v is the one from ∇ℓ itself, operation for
    operation."""
    with gradient_edges(dict(enumerate(leaves)), {i: i for i in range(len(leaves))}) as made:
        torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    edges: list[GradientEdge | None] = [None] * len(leaves)
    for edge, i in made:
        edges[i] = edge
    return tuple(edges)


def _double_backward(edges: Edges, leaves: Params, vs: Params, retain_graph: bool) -> Params:
    """∇_θ ⟨∇ℓ, v⟩ from the graph of ∇ℓ (entries of ∇ℓ that do not depend on θ contribute nothing)."""
    live = [(e, vi) for e, vi in zip(edges, vs) if e is not None]
    if not live:
        return tuple(torch.zeros_like(p) for p in leaves)
    hv = torch.autograd.grad([e for e, _ in live], leaves, grad_outputs=[vi for _, vi in live],
                             retain_graph=retain_graph, allow_unused=True, materialize_grads=True)
    return tuple(t.detach() for t in hv)


def _check_twice_differentiable(edges: Edges) -> None:
    """Raise a RuntimeError (the mode fails on this model) where the graph of ∇ℓ passes through a backward marked
    ``once_differentiable``: torch prunes that node from a second ``torch.autograd.grad`` with ``allow_unused=True``
    and silently drops its contribution to H v."""
    check_twice_differentiable((e.node for e in edges if e is not None), RuntimeError)


def reverse_over_reverse(batch_loss: BatchLoss, params: Params, v: Params, X: Any, y: Tensor,
                         check: bool = False) -> Params:
    """H_b v = ∇_θ ⟨∇ℓ_b(θ), v⟩ by double backward (plain ``torch.autograd``); ``check``: first verify that the
    graph of ∇ℓ_b can be differentiated again (a walk over its nodes)."""
    with torch.enable_grad():
        leaves = leaves_of(params)
        edges = _gradient_edges(batch_loss(leaves, X, y), leaves)
        if check:
            _check_twice_differentiable(edges)
        return _double_backward(edges, leaves, v, retain_graph=False)


def gradient_graph(batch_loss: BatchLoss, params: Params, X: Any, y: Tensor) -> tuple[Params, Edges]:
    """(leaves, the graph of ∇ℓ_b without its values: :func:`_gradient_edges`), kept for products through it
    (:func:`through_graph`)."""
    with torch.enable_grad():
        leaves = leaves_of(params)
        edges = _gradient_edges(batch_loss(leaves, X, y), leaves)
    _check_twice_differentiable(edges)
    return leaves, edges


def through_graph(graph: tuple[Params, Edges], v: Params) -> Params:
    """H_b v = ∇_θ ⟨∇ℓ_b, v⟩ through a kept graph of ∇ℓ_b (the second backward only; the graph stays)."""
    leaves, edges = graph
    return _double_backward(edges, leaves, v, retain_graph=True)


def reverse_over_reverse_block(batch_loss: BatchLoss, params: Params, V: Params, X: Any, y: Tensor) -> Params:
    """H_b V for k vectors stacked along a leading axis: one forward and first backward, then k backwards through
    the kept graph of ∇ℓ_b."""
    k = V[0].shape[0]
    with torch.enable_grad():
        leaves = leaves_of(params)
        edges = _gradient_edges(batch_loss(leaves, X, y), leaves)
        _check_twice_differentiable(edges)
        cols = [_double_backward(edges, leaves, tuple(t[i] for t in V), retain_graph=i < k - 1) for i in range(k)]
    return tuple(torch.stack([c[j] for c in cols]) for j in range(len(params)))


def _gradient_at(batch_loss: BatchLoss, params: Params, X: Any, y: Tensor) -> Params:
    with torch.enable_grad():
        leaves = leaves_of(params)
        return tuple(t.detach() for t in _gradient(batch_loss(leaves, X, y), leaves))


def finite_difference(batch_loss: BatchLoss, params: Params, v: Params, X: Any, y: Tensor,
                      step: float | None = None) -> Params:
    """H_b v ≈ (∇ℓ_b(θ + εv) − ∇ℓ_b(θ − εv)) / 2ε with ε = step · max(1, ‖θ‖)/‖v‖ (see the module docstring);
    ``step`` defaults to u^{1/3} of the parameters' dtype."""
    eps = fd_epsilon(params, v, default_fd_step(params[0].dtype) if step is None else step)
    if float(eps) == 0.0:
        return tuple(torch.zeros_like(p) for p in params)
    plus = _gradient_at(batch_loss, tuple(p + eps * t for p, t in zip(params, v)), X, y)
    minus = _gradient_at(batch_loss, tuple(p - eps * t for p, t in zip(params, v)), X, y)
    return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))


# ---------------------------------------------------------------- torch.func kernels (for vmap and torch.compile)
def func_kernel(mode: HVPMode, batch_loss: BatchLoss, step: float | None = None) -> Kernel:
    """The per-batch product of ``mode`` written with ``torch.func`` transforms (traceable by dynamo, batchable
    by ``vmap``)."""

    def grad_at(p: Params, X: Any, y: Tensor) -> Params:
        return grad(batch_loss)(p, X, y)

    if mode == HVPMode.FORWARD_OVER_REVERSE:
        def kernel(params: Params, v: Params, X: Any, y: Tensor) -> Params:
            return jvp(lambda p: grad_at(p, X, y), (params,), (v,))[1]
    elif mode == HVPMode.REVERSE_OVER_REVERSE:
        def kernel(params: Params, v: Params, X: Any, y: Tensor) -> Params:
            return vjp(lambda p: grad_at(p, X, y), params)[1](v)[0]
    elif mode == HVPMode.FINITE_DIFFERENCE:
        def kernel(params: Params, v: Params, X: Any, y: Tensor) -> Params:
            eps = fd_epsilon(params, v, default_fd_step(params[0].dtype) if step is None else step)
            safe = torch.where(eps > 0, eps, torch.ones_like(eps))
            plus = grad_at(tuple(p + eps * t for p, t in zip(params, v)), X, y)
            minus = grad_at(tuple(p - eps * t for p, t in zip(params, v)), X, y)
            return tuple(torch.where(eps > 0, (a - b) / (2 * safe), torch.zeros_like(a)) for a, b in zip(plus, minus))
    else:
        raise ProblemError(f"no product kernel for mode {mode!r}")
    return kernel


class _FirstThatWorks:
    """Calls ``fast``; the first time it raises a RuntimeError/NotImplementedError (an op without the derivative
    that implementation needs, a missing vmap batching rule), switches to ``robust`` for good."""

    def __init__(self, fast: Kernel, robust: Kernel) -> None:
        self.fast, self.robust = fast, robust
        self.fell_back = False

    def __call__(self, params: Params, v: Params, X: Any, y: Tensor) -> Params:
        if not self.fell_back:
            try:
                return self.fast(params, v, X, y)
            except (RuntimeError, NotImplementedError):
                self.fell_back = True
        return self.robust(params, v, X, y)


def eager_kernel(mode: HVPMode, batch_loss: BatchLoss, step: float | None = None) -> Kernel:
    """The single-vector per-batch product of ``mode`` with the lowest overhead: plain ``torch.autograd``.

    forward-over-reverse uses core forward-mode AD over ``torch.autograd.grad``, and ``torch.func.jvp`` of
    ``torch.func.grad`` where core forward AD lacks a formula (e.g. ``silu_backward``, which torch.func
    decomposes).
    """
    if mode == HVPMode.FORWARD_OVER_REVERSE:
        return _FirstThatWorks(lambda p, v, X, y: forward_over_reverse(batch_loss, p, v, X, y),
                               func_kernel(mode, batch_loss))
    if mode == HVPMode.REVERSE_OVER_REVERSE:
        return _ReverseOverReverse(batch_loss)
    if mode == HVPMode.FINITE_DIFFERENCE:
        return lambda p, v, X, y: finite_difference(batch_loss, p, v, X, y, step)
    raise ProblemError(f"no product kernel for mode {mode!r}")


class _ReverseOverReverse:
    """Double backward; the first call also checks that the gradient's graph is twice differentiable."""

    def __init__(self, batch_loss: BatchLoss) -> None:
        self.batch_loss = batch_loss
        self.checked = False

    def __call__(self, params: Params, v: Params, X: Any, y: Tensor) -> Params:
        out = reverse_over_reverse(self.batch_loss, params, v, X, y, check=not self.checked)
        self.checked = True
        return out


def _loop(kernel: Kernel) -> Kernel:
    def block(params: Params, V: Params, X: Any, y: Tensor) -> Params:
        cols = [kernel(params, tuple(t[i] for t in V), X, y) for i in range(V[0].shape[0])]
        return tuple(torch.stack([c[j] for c in cols]) for j in range(len(params)))

    return block


def _vmapped_vjp(batch_loss: BatchLoss) -> Kernel:
    def block(params: Params, V: Params, X: Any, y: Tensor) -> Params:
        pullback = vjp(lambda p: grad(batch_loss)(p, X, y), params)[1]
        return vmap(pullback)(V)[0]

    return block


def block_kernel(mode: HVPMode, batch_loss: BatchLoss, step: float | None = None) -> Kernel:
    """H_b V for k vectors stacked along a leading axis.

    forward-over-reverse: ``vmap`` of ``torch.func.jvp(torch.func.grad(ℓ))``; reverse-over-reverse: one
    ``torch.func.vjp`` of ``torch.func.grad(ℓ)``, its pullback ``vmap``-ed over the cotangents V; where vmap or the
    transforms fail (a missing batching rule, an ``autograd.Function`` without ``setup_context``), a loop over
    the eager product (for reverse-over-reverse: one graph of ∇ℓ_b and k backwards through it). Finite
    differences: ``vmap`` of the ``torch.func`` difference of gradients (each vector its own ε), or a loop.
    """
    if mode == HVPMode.FINITE_DIFFERENCE:
        difference = func_kernel(mode, batch_loss, step)
        return _FirstThatWorks(lambda p, V, X, y: vmap(lambda u: difference(p, u, X, y))(V),
                               _loop(eager_kernel(mode, batch_loss, step)))
    if mode == HVPMode.REVERSE_OVER_REVERSE:
        return _FirstThatWorks(_vmapped_vjp(batch_loss),
                               lambda p, V, X, y: reverse_over_reverse_block(batch_loss, p, V, X, y))
    if mode == HVPMode.FORWARD_OVER_REVERSE:
        product = func_kernel(mode, batch_loss)
        return _FirstThatWorks(lambda p, V, X, y: vmap(lambda u: product(p, u, X, y))(V),
                               _loop(eager_kernel(mode, batch_loss)))
    raise ProblemError(f"no product kernel for mode {mode!r}")


# ---------------------------------------------------------------- torch.compile
def compile_kernel(mode: HVPMode, batch_loss: BatchLoss, step: float | None = None,
                   backend: str = "inductor") -> Kernel:
    """``torch.compile`` of the ``torch.func`` product of ``mode``, made and compiled on its first call (so an
    unknown backend or a compiler failure surfaces there, where the caller can fall back to the eager product).

    Dynamo is told to trace into functions it skips by default (``torch._dynamo.dont_skip_tracing``): the
    problem's forward switches PyTorch's attention fast path off, which would otherwise break the graph and leave
    the transforms to run eagerly. Shapes are static (``dynamic=False``): a batch of another size compiles its own
    graph rather than a symbolic one (symbolic shapes through the transforms failed on a GPT-2 with torch 2.13).
    """
    fn = func_kernel(mode, batch_loss, step)
    compiled: list[Kernel] = []

    def kernel(params: Params, v: Params, X: Any, y: Tensor) -> Params:
        if not compiled:
            dont_skip = getattr(getattr(torch, "_dynamo", None), "dont_skip_tracing", None)
            compiled.append(torch.compile(dont_skip(fn) if dont_skip is not None else fn, backend=backend,
                                          dynamic=False))
        return compiled[0](params, v, X, y)

    return kernel


def warn_compile_failed(mode: HVPMode, error: BaseException) -> None:
    warnings.warn(f"torch.compile of the {mode.value} Hessian-vector product failed ({type(error).__name__}: "
                  f"{first_line(error)}); using the eager product", RuntimeWarning, stacklevel=4)


__all__ = ["EXACT_MODES", "BatchLoss", "Edges", "Kernel", "block_kernel", "compile_kernel", "default_fd_step",
           "eager_kernel", "fd_epsilon", "finite_difference", "forward_over_reverse", "func_kernel", "gradient_graph",
           "leaves_of", "reverse_over_reverse", "reverse_over_reverse_block", "through_graph", "unit_roundoff"]
