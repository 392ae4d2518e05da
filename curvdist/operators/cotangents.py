"""Parameter cotangents of a double backward pass without a shard's worth of them waiting.

A Hessian-vector product by reverse over reverse takes two backward passes through f(θ): the first, with its graph,
gives g = ∂⟨f, w⟩/∂θ; the second differentiates S = ⟨g, v⟩ (+ further terms) and its result ∂S/∂θ = H v. Done with
autograd as it is, that holds two shards' worth of parameter-sized tensors that plain training never holds:

* **The primal gradient.** ``autograd.grad(..., create_graph=True)`` returns g, one tensor per parameter, all alive
  until S is formed. Only ⟨g, v⟩'s graph is needed afterwards, and that graph keeps v, not g.
  :func:`gradient_edges` hands the second pass each parameter's g as its graph node (a
  :class:`~torch.autograd.graph.GradientEdge`) with v as the cotangent fed there, and frees g's values as the
  first pass produces them.
* **Cotangents waiting for their parameter.** A parameter of a linear map W x receives two contributions in the
  second pass: one from the first pass's graph (the product gᵀWᵀ in the input's gradient uses W) and one from the
  forward graph. The first-pass graph is run in forward order and the forward graph in backward order, so the first
  layer's two contributions come at the start and at the end of the pass. Autograd keeps a contribution in the
  parameter's input buffer until all have arrived, so every parameter's first contribution waits: a shard.
  :func:`accumulating_into` adds each contribution into its target as its node produces it and hands autograd
  nothing in its place, so nothing waits.

Used by the pipeline stages' Hessian pass (both) and by the local reverse-over-reverse kernels (the edges: a kept
graph of ∇ℓ without its values, :mod:`curvdist.operators.hvp_modes`). On 9 blocks of GPT-2 large's width, a stage
of it in 4 (177M parameters, 0.71 GB a shard; 2 × 64 tokens, the allocator set to return freed memory at once), the
two together took the double backward's peak from 1.2 GB above its start to 0.5 GB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from ..errors import AutodiffError

__all__ = ["gradient_edges", "accumulating_into", "check_twice_differentiable"]

#: the nodes torch puts where a backward marked ``once_differentiable`` was run with its graph: they raise when
#: reached, and where the backward's incoming gradient did not require grad torch leaves no node at all
ONCE_DIFFERENTIABLE_NODES = frozenset({"Error", "DelayedError"})


def _refuse_once_differentiable(node: Node, error: type[Exception] = AutodiffError) -> None:
    """Raise ``error`` where ``node`` marks a backward run with its graph that cannot be differentiated again (a
    second backward would lose its terms: torch prunes it silently where it can)."""
    if type(node).__name__ in ONCE_DIFFERENTIABLE_NODES:
        raise error("the gradient's graph passes through a backward marked once_differentiable (a custom "
                            "autograd.Function or an extension op): it cannot be differentiated again, so a "
                            "Hessian product by reverse over reverse would miss its terms; use the GGN or a "
                            "twice-differentiable backward")


def _nodes_below(roots: Iterable[Node | None], error: type[Exception] = AutodiffError) -> Iterator[Node]:
    """Every node of the graph below ``roots``, once each, a backward marked ``once_differentiable`` refused with
    ``error`` as it is met. (The walk's set of nodes goes with the generator.)"""
    seen: set[Node] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        _refuse_once_differentiable(node, error)
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None and n not in seen)


def check_twice_differentiable(roots: Iterable[Node], error: type[Exception] = AutodiffError) -> None:
    """Walk the graph below ``roots`` and refuse a backward marked ``once_differentiable`` in it with ``error``
    (the local kernels raise a plain RuntimeError: to the operator's mode choice, "this mode fails here")."""
    for _ in _nodes_below(roots, error):
        pass


@contextmanager
def gradient_edges(leaves: Mapping[Any, Tensor], directions: Mapping[Any, Any]
                   ) -> Iterator[list[tuple[GradientEdge, Any]]]:
    """Inside the block, every gradient a backward pass with ``create_graph=True`` computes for ``leaves[n]`` is
    recorded as (its graph edge, ``directions[n]``) in the list the block receives, and autograd is handed an
    expanded zero (no memory) in its place, so the gradient's values are freed at once. The second pass then takes
    the pairs as roots with their cotangents: ``backward([e for e, _ in pairs], [d for _, d in pairs])``
    differentiates Σ⟨g_n, d_n⟩. ``directions`` may hold anything that names the cotangent to come (the local
    kernels keep the graph for many products and pass the leaf's index). A gradient that does not depend on
    anything differentiable (it is constant) adds nothing to that derivative and is left out."""
    pairs: list[tuple[GradientEdge, Any]] = []

    def record(direction: Any) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            if grad.requires_grad:
                pairs.append((get_gradient_edge(grad), direction))
            return grad.new_zeros(()).expand_as(grad)
        return hook

    handles = [leaf.register_hook(record(directions[n])) for n, leaf in leaves.items()]
    try:
        yield pairs
    finally:
        for h in handles:
            h.remove()


#: autograd nodes of views and casts: linear maps of one input, through which a parameter may reach an operation
#: (``nn.Linear`` multiplies by ``weight.t()``). Both passes' contributions meet at such a node, so a contribution
#: is taken through the chain to its parameter where it is made (:func:`accumulating_into`).
VIEW_NODES = frozenset({
    "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0",
    "ReshapeAliasBackward0", "ExpandBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
    "UnsqueezeBackward0", "AliasBackward0", "ToCopyBackward0", "CloneBackward0"})


def _accumulator(leaf: Tensor) -> Node:
    """The node into which autograd accumulates ``leaf``'s gradient."""
    return get_gradient_edge(leaf).node


def _through(chain: list[tuple[Node, int]], grad: Tensor) -> Tensor:
    """``grad`` at the input of the first node of ``chain`` taken through its nodes (each applied to one gradient;
    of a node with several inputs, the gradient of input ``i`` kept) to the parameter below them."""
    for node, i in chain:
        out = node(grad)  # a node with one input returns its gradient as a tensor, not a 1-tuple
        grad = out[i] if isinstance(out, tuple) else out
    return grad


def _chain_to_leaf(node: Node, accumulators: Mapping[Node, Tensor],
                   below: dict[Node, tuple[list[tuple[Node, int]], Tensor] | None]
                   ) -> tuple[list[tuple[Node, int]], Tensor] | None:
    """(the view nodes from ``node`` down, each with the index of its one input; the target), when ``node`` is a
    target's accumulator or a chain of :data:`VIEW_NODES` that ends at one; else None. ``below`` memoizes. (A
    function of its own, not a closure calling itself: that would be a reference cycle holding the graph.)"""
    if node in accumulators:
        return [], accumulators[node]
    if node not in below:
        below[node] = None
        nexts = [(i, n) for i, (n, _) in enumerate(node.next_functions) if n is not None]
        if node.name() in VIEW_NODES and len(nexts) == 1:
            found = _chain_to_leaf(nexts[0][1], accumulators, below)
            if found is not None:
                below[node] = ([(node, nexts[0][0]), *found[0]], found[1])
    return below[node]


@contextmanager
def accumulating_into(roots: Sequence[Node | None], targets: Mapping[Tensor, Tensor]) -> Iterator[None]:
    """Inside the block, a backward pass from ``roots`` adds each contribution to a leaf's gradient into
    ``targets[leaf]`` as the node that produces it runs, and passes nothing on toward the leaf (its ``.grad`` is
    left as it is). Autograd would sum a leaf's contributions in a buffer until the last one arrives. The
    contributions are found by walking the graph below ``roots`` once: every node with an edge to a target leaf's
    accumulator, or to a chain of :data:`VIEW_NODES` that ends there, gets a hook that takes its output there
    (through the chain's maps). The sum is the same up to the order of the additions.

    Raises :class:`~curvdist.errors.AutodiffError` where the walk meets a backward marked ``once_differentiable``
    (its second derivative does not exist in the graph). Torch only marks it where the backward's incoming gradient
    required grad: give the first pass cotangents that require grad to have every such backward marked."""
    accumulators = {_accumulator(leaf): target for leaf, target in targets.items()}
    below: dict[Node, tuple[list[tuple[Node, int]], Tensor] | None] = {}

    def add(slots: list[tuple[int, list[tuple[Node, int]], Tensor]]) -> Callable[..., Any]:
        def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> tuple:
            out = list(grad_inputs)
            for i, chain, target in slots:
                if out[i] is not None:
                    target.add_(_through(chain, out[i]))
                    out[i] = None
            return tuple(out)
        return hook

    handles = []
    try:
        for node in _nodes_below(roots):
            slots = [(i, *found) for i, (n, _) in enumerate(node.next_functions)
                     if n is not None and (found := _chain_to_leaf(n, accumulators, below)) is not None]
            if slots:
                handles.append(node.register_hook(add(slots)))
        node = None  # the walk's nodes hold the graph (nodes not run keep their saved tensors): let them go
        below.clear()
        yield
    finally:
        for h in handles:
            h.remove()
