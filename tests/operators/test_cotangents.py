"""Double backward passes without waiting parameter cotangents (gradient_edges, accumulating_into)."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from curvdist import errors as cd_errors
from curvdist.operators.cotangents import accumulating_into, gradient_edges
from tests.dense import autograd_hessian


class Conv1D(torch.nn.Module):
    """GPT-2's linear layer: ``addmm(bias, x, weight)`` with the weight laid out (in, out), used directly."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_in, n_out) * 0.5)
        self.bias = torch.nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class Net(torch.nn.Module):
    """Parameters reached in each way the helpers must handle: through ``weight.t()`` (nn.Linear, a view chain),
    directly (``conv``), broadcast (``scale``, expanded), and used twice (``lin1``'s weight also multiplies the
    output again: a tied weight). Each layer's input depends on the parameters, so every weight gets a
    contribution from the first pass's graph as well as from the forward graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(5, 4)
        self.conv = Conv1D(4, 4)
        self.lin2 = torch.nn.Linear(4, 4)
        self.lin1 = torch.nn.Linear(4, 4, bias=False)
        self.norm = torch.nn.LayerNorm(4)
        self.scale = torch.nn.Parameter(torch.randn(1) + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(torch.tanh(self.lin0(x))))
        h = self.norm(self.lin1(torch.tanh(self.lin2(h))))
        return F.linear(torch.sin(h), self.lin1.weight) * self.scale.expand(4)


def _case() -> tuple[Net, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = Net().double()
    return net, torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)


def _loss(net: Net, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((functional_call(net, params, (x,)) - y) ** 2).sum()


def _dense_hvp(net: Net, x: torch.Tensor, y: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
    """H v from the dense float64 Hessian of the loss in the flat parameters (plain autograd, row by row: with
    torch 2.13, torch.func.hessian gets the LayerNorm weight's rows wrong here, see tests/dense.py)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def loss_flat(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, [s.numel() for s in shapes])
        return _loss(net, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, x, y)

    return autograd_hessian(loss_flat, flat) @ torch.cat([v[n].reshape(-1) for n in names])


def _first_pass(net: Net, x: torch.Tensor, y: torch.Tensor, v: dict[str, torch.Tensor],
                leaves: dict[str, torch.Tensor], helpers: bool) -> tuple[list, list[torch.Tensor]]:
    """g = ∇ℓ with its graph: (the second pass's roots, their cotangents v) — g's graph edges with the helpers."""
    with torch.enable_grad():
        loss = _loss(net, leaves, x, y)
        if helpers:
            with gradient_edges(leaves, v) as pairs:
                torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            return [e for e, _ in pairs], [d for _, d in pairs]
        return list(torch.autograd.grad(loss, list(leaves.values()), create_graph=True)), [v[n] for n in leaves]


def _second_pass(roots: list, cots: list[torch.Tensor], leaves: dict[str, torch.Tensor],
                 targets: dict[str, torch.Tensor], helpers: bool) -> None:
    """∇_θ Σ⟨root, cotangent⟩ into the targets: through accumulating_into, or as autograd runs it."""
    if helpers:
        with accumulating_into([e.node for e in roots], {leaves[n]: targets[n] for n in leaves}):
            torch.autograd.backward(roots, cots, inputs=list(leaves.values()))
    else:
        _plain_into(roots, cots, leaves, targets)


def _reverse_over_reverse(net: Net, x: torch.Tensor, y: torch.Tensor, v: dict[str, torch.Tensor],
                          helpers: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """H v as a second backward pass over g = ∇ℓ with cotangent v, into zero targets; (targets, leaves)."""
    leaves = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    targets = {n: torch.zeros_like(p) for n, p in leaves.items()}
    _second_pass(*_first_pass(net, x, y, v, leaves, helpers), leaves, targets, helpers)
    return targets, leaves


def _plain_into(roots: list, cots: list, leaves: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
    """The second pass as autograd runs it: into each leaf's ``.grad``, set to its target beforehand (in place where
    autograd accumulates in place, copied back where it does not)."""
    for n, leaf in leaves.items():
        leaf.grad = targets[n]
    torch.autograd.backward(roots, cots, inputs=list(leaves.values()))
    for n, leaf in leaves.items():
        if leaf.grad is not targets[n]:
            targets[n].copy_(leaf.grad)


def test_double_backward_with_the_helpers_equals_the_dense_hessian():
    net, x, y = _case()
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    want = _dense_hvp(net, x, y, v)
    got, leaves = _reverse_over_reverse(net, x, y, v, helpers=True)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in got.values()]), want, rtol=1e-12, atol=1e-12)
    assert all(leaf.grad is None for leaf in leaves.values())  # every contribution went to the targets
    plain, _ = _reverse_over_reverse(net, x, y, v, helpers=False)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in plain.values()]), want, rtol=1e-12, atol=1e-12)


def test_gradient_edges_free_the_primal_gradients_and_keep_their_graph():
    net, x, y = _case()
    leaves = {n: p.detach().requires_grad_() for n, p in net.named_parameters()}
    seen: list[weakref.ref] = []
    for leaf in leaves.values():  # registered first, so it sees the gradient gradient_edges replaces
        leaf.register_hook(lambda g: seen.append(weakref.ref(g)))
    v = {n: torch.randn_like(p) for n, p in leaves.items()}
    with torch.enable_grad():
        loss = _loss(net, leaves, x, y)
        with gradient_edges(leaves, v) as pairs:
            returned = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    assert len(seen) == len(leaves) and len(pairs) == len(leaves)
    assert all(r.stride() == (0,) * r.dim() and not r.any() for r in returned)  # expanded zeros, no memory
    del returned
    assert all(ref() is None for ref in seen)  # the gradients' values are gone ...
    roots = [e for e, _ in pairs]  # ... and their graph is still there: the second pass gives H v
    torch.autograd.backward(roots, [d for _, d in pairs], inputs=list(leaves.values()))
    got = torch.cat([leaves[n].grad.reshape(-1) for n in leaves])
    torch.testing.assert_close(got, _dense_hvp(net, x, y, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("helpers", [True, False])
def test_contributions_reach_the_target_as_they_are_made(helpers):
    """A weight gets contributions from the first pass's graph early in the second pass and from the forward graph
    late. When the forward graph's node that multiplies by it runs, the early ones are already in the target with
    the helpers, for a weight used directly (``conv``) and one used through ``weight.t()`` (``lin2``); autograd
    alone keeps them in a buffer until then (the memory the helpers save)."""
    net, x, y = _case()
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    leaves = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    targets = {n: torch.zeros_like(p) for n, p in leaves.items()}
    nodes = {}
    for name in ("conv", "lin2"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: nodes.__setitem__(name, o.grad_fn))
    roots, cots = _first_pass(net, x, y, v, leaves, helpers)
    at_forward_node: dict[str, list[float]] = {"conv": [], "lin2": []}  # registered after the first pass, which
    for name, node in nodes.items():  # runs the nodes too
        node.register_prehook(lambda g, name=name: at_forward_node[name].append(
            float(targets[f"{name}.weight"].abs().sum())))
    _second_pass(roots, cots, leaves, targets, helpers)
    assert all(len(seen) == 1 for seen in at_forward_node.values())
    assert all((seen[0] > 0) == helpers for seen in at_forward_node.values())
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in targets.values()]), _dense_hvp(net, x, y, v),
                               rtol=1e-12, atol=1e-12)


class _CubeOnce(torch.autograd.Function):
    """x³ with a backward that cannot be differentiated again."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)  # type: ignore[attr-defined]
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return 3 * x**2 * g


@pytest.mark.parametrize("cotangent_requires_grad", [True, False])
def test_a_once_differentiable_backward_is_refused_where_torch_marks_it(cotangent_requires_grad):
    """The cube's backward is the first op of the first pass. Torch marks it (a DelayedError node) only where its
    incoming gradient requires grad; accumulating_into refuses a marked one with AutodiffError. Unmarked, the
    cube's second derivative silently disappears: why the pipeline stages give their first pass cotangents that
    require grad."""
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    out = _CubeOnce.apply(x @ W.t())
    w = torch.randn(5, 3, dtype=torch.float64).requires_grad_(cotangent_requires_grad)
    target = torch.zeros_like(W)
    with gradient_edges({"W": W}, {"W": torch.randn_like(W)}) as pairs:
        torch.autograd.grad(out, [W], w, create_graph=True)
    if not cotangent_requires_grad:
        assert pairs == []  # nothing to differentiate: the silent case
        return
    with pytest.raises(cd_errors.AutodiffError, match="once_differentiable"):
        with accumulating_into([e.node for e, _ in pairs], {W: target}):
            pass
    assert not target.any()
