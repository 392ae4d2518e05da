"""Sites in an exported graph: the applications of linear maps in a ``torch.export`` program, for per-layer blocks
of models that exist only as a traced graph (pipeline stages of block stacks, :mod:`curvdist.distributed.stacks`).

A stage cut from an exported model keeps the module hierarchy as ``InterpreterModule`` s, but its leaves run ATen
operators rather than the original ``nn.Linear``/``Conv1D``/``Embedding`` forward methods, so the module hooks of
:mod:`.probes` cannot be used. Instead every use of a selected parameter is matched to an operator whose
derivative in that parameter is a known site (:class:`~.probes.Recorder` layout, (B, T, features)):

===============================================  =============================  ====================================
ATen operator (the parameter as)                  site, input features            block
===============================================  =============================  ====================================
``linear(x, W, b)``                               linear (W: (out, in)), x        G ⊗ A; bias exact
``addmm(b, x, W)`` (GPT-2 ``Conv1D``, x flat)    linear (W: (in, out)), x        A ⊗ G; bias exact
``embedding(W, idx)``                             embedding, token indices         A (token counts) ⊗ G
``layer_norm(x, shape, w, b, eps)``               norm, x̂ = layer_norm(x) unscaled  exact (weight, bias)
``rms_norm(x, shape, w, eps)``                    norm, x̂ = rms_norm(x) unscaled    exact (weight)
``mul(w, h)``, ``mul(h, w)`` (w over h's last     norm, x̂ = h                     exact (an elementwise scale: the
dims; Hugging Face ``RMSNorm`` classes)                                            weight of LLaMA's ``LlamaRMSNorm``)
``add(h, b)``, ``add(b, h)`` (b over h's last    norm (bias role)                 exact
dims)
===============================================  =============================  ====================================

For each one a node is inserted after the operator that records the site (its inputs, and a zero probe added to
the output, exactly as the module hooks do), so the statistics are those of the local module probes. A selected
parameter with any other use (read by an operator outside this table, or in a graph that is not an
``InterpreterModule``) is refused with :class:`~curvdist.errors.MetricError` naming the operator: a block that
silently missed that use would be wrong.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ...errors import MetricError
from .probes import IN_OUT, MATRIX_FREE_HINT, OUT_IN, Recorder

_ATEN = torch.ops.aten

#: operators that read a parameter without computing with it (metadata assertions inserted by export)
_NEUTRAL = {_ATEN._assert_tensor_metadata.default}


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class _Matcher:
    """Matches the operators of one graph against the site table, for the selected parameters of that graph."""

    def __init__(self, params: Mapping[fx.Node, str], rec: Recorder, path: str) -> None:
        self.params, self.rec, self.path = params, rec, path

    def name(self, a: Any) -> str | None:
        return self.params.get(a) if isinstance(a, fx.Node) else None

    def site(self, node: fx.Node) -> tuple[Callable[..., Tensor], tuple[Any, ...], list[str]] | None:
        """(recording function, its extra arguments, the parameters it accounts for) of a site operator that
        reads a selected parameter, or None."""
        rec, path, t = self.rec, f"{self.path}:{node.name}", node.target
        if t is _ATEN.linear.default or t is _ATEN.addmm.default:
            if t is _ATEN.linear.default:
                x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias")
            else:
                b, x, w = node.args[0], node.args[1], node.args[2]
                if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                    return None
            roles = {r: n for r, n in (("weight", self.name(w)), ("bias", self.name(b))) if n is not None}
            if not roles:
                return None
            orientation = OUT_IN if t is _ATEN.linear.default else IN_OUT

            def linear(z: Tensor, x: Tensor) -> Tensor:
                B = rec.batch if t is _ATEN.addmm.default else (x.shape[0] if x.ndim > 1 else 1)
                x3, z3 = x.reshape(B, -1, x.shape[-1]), z.reshape(B, -1, z.shape[-1])
                return rec.linear(path, x3, z3, roles, orientation).reshape(z.shape)

            return linear, (x,), list(roles.values())
        if t is _ATEN.embedding.default:
            name = self.name(node.args[0])
            if name is None or any(self.name(a) for a in node.args[1:]):
                return None
            padding = _arg(node, 2, "padding_idx", -1)
            by_freq = bool(_arg(node, 3, "scale_grad_by_freq", False))

            def embedding(z: Tensor, w: Tensor, idx: Tensor) -> Tensor:
                m = SimpleNamespace(num_embeddings=w.shape[0], padding_idx=None if padding < 0 else padding,
                                    scale_grad_by_freq=by_freq)
                return rec.embedding(path, m, idx, z, {"weight": name})  # type: ignore[arg-type]

            return embedding, (node.args[0], node.args[1]), [name]
        if t is _ATEN.layer_norm.default or t is _ATEN.rms_norm.default:
            ln = t is _ATEN.layer_norm.default
            shape = list(node.args[1])
            w = _arg(node, 2, "weight")
            b = _arg(node, 3, "bias") if ln else None
            eps = _arg(node, 4 if ln else 3, "eps", 1e-5 if ln else None)
            roles = {r: n for r, n in (("weight", self.name(w)), ("bias", self.name(b))) if n is not None}
            if not roles or self.name(node.args[0]) is not None:
                return None

            def norm(z: Tensor, x: Tensor) -> Tensor:
                xhat = F.layer_norm(x, shape, None, None, eps) if ln else F.rms_norm(x, shape, None, eps)
                return _elementwise(rec, path, xhat, z, len(shape), roles)

            return norm, (node.args[0],), list(roles.values())
        if t is _ATEN.mul.Tensor or t is _ATEN.add.Tensor:
            if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
                return None
            names = [self.name(a) for a in node.args]
            if sum(n is not None for n in names) != 1:
                return None
            i = 0 if names[0] is not None else 1
            name, other = names[i], node.args[1 - i]
            if not isinstance(other, fx.Node):
                return None
            roles = {"weight" if t is _ATEN.mul.Tensor else "bias": name}

            def scale(z: Tensor, w: Tensor, h: Tensor) -> Tensor:
                if w.ndim == 0 or tuple(h.shape[h.ndim - w.ndim:]) != tuple(w.shape) or z.shape != h.shape:
                    raise MetricError(f"{name} is applied by {t} to a tensor of shape {tuple(h.shape)}, not as an "
                                      f"elementwise scale or shift over its last dimensions; {MATRIX_FREE_HINT}")
                return _elementwise(rec, path, h, z, w.ndim, roles)

            return scale, (node.args[i], other), [name]
        return None


def _elementwise(rec: Recorder, path: str, xhat: Tensor, z: Tensor, ndim: int, roles: dict[str, str]) -> Tensor:
    """A norm-type site whose parameters span the last ``ndim`` dimensions (LayerNorm, RMSNorm, an elementwise
    scale or shift), in the (B, T, width) layout."""
    lead = z.shape[:z.ndim - ndim]
    width = int(torch.Size(z.shape[z.ndim - ndim:]).numel())
    out = rec.norm(path, xhat.reshape(*lead, width), z.reshape(*lead, width), -1, width, roles)
    return out.reshape(z.shape)


def instrument_graphs(root: nn.Module, names: Mapping[str, str], rec: Recorder) -> None:
    """Insert the recording nodes into every graph of ``root`` (modified in place; pass a copy) for the selected
    parameters ``names`` (parameter path in ``root`` → problem name).

    Raises:
        MetricError: a selected parameter has a use that is not a site (the operator is named).
    """
    seen: set[str] = set()
    for path, module in root.named_modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        params = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                full = f"{path}.{node.target}" if path else str(node.target)
                if full in names:
                    params[node] = names[full]
        if not params:
            continue
        if type(module).__name__ != "InterpreterModule":
            raise MetricError(f"the selected parameters {sorted(set(params.values()))} are read in a compiled graph "
                              f"('{path}'), where no sites can be recorded; {MATRIX_FREE_HINT}")
        match = _Matcher(params, rec, path)
        covered: set[tuple[fx.Node, fx.Node]] = set()
        inserted: set[fx.Node] = set()
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            found = match.site(node)
            if found is None:
                continue
            fn, extra, _ = found
            with graph.inserting_after(node):
                recorded = graph.call_function(fn, (node, *extra))
            node.replace_all_uses_with(recorded, delete_user_cb=lambda user, r=recorded: user is not r)
            inserted.add(recorded)
            covered.update((p, node) for p in node.all_input_nodes if p in params)
        for p, name in params.items():
            for user in p.users:
                if user in inserted or (user.op == "call_function" and user.target in _NEUTRAL):
                    continue
                if (p, user) not in covered:
                    what = user.target if user.op == "call_function" else f"{user.op} {user.target}"
                    raise MetricError(f"{name} is used by {what} in '{path}', which is not a linear, embedding or "
                                      f"normalization site, so its Kronecker or diagonal block would miss that use; "
                                      f"{MATRIX_FREE_HINT}")
            seen.add(name)
    missing = sorted(set(names.values()) - seen)
    if missing:
        raise MetricError(f"the selected parameters {missing} are not read by the traced graph")


def instrumented_graph_copy(module: nn.Module, names: Mapping[str, str], rec: Recorder) -> nn.Module:
    """A copy of a traced module (its parameters are passed at call time) whose graphs record the sites of the
    selected parameters ``names`` (path → problem name) into ``rec``."""
    twin = copy.deepcopy(module)
    instrument_graphs(twin, names, rec)
    return twin

