"""Instrumented forward passes: the layer inputs and the output gradients that per-layer curvature blocks need.

A *site* is one application of a map that is linear in its parameters. For each selected parameter the site that
uses it records the layer's input features a and adds a zero *probe* tensor to the layer's output z, so that
∂(Σ_n uₙ·fₙ)/∂probe is the backpropagated output-side vector b = (∂f/∂z)ᵀu at that site for any output-space
vector u. Every site is brought into one layout, (B, T, features) with T the positions that share the weights:

==============================  ===================================  ========================================
layer                           input features a (B, T, ·)            parameters
==============================  ===================================  ========================================
``Linear`` (any leading dims)   x                                     weight (out, in), bias
``Conv2d`` (groups = 1)         unfolded padded input patches         weight (out, in·kh·kw), bias
``Embedding``                   token indices (B, T)                  weight (V, d)
``LayerNorm``, ``BatchNorm``    normalized input x̂                    weight, bias (elementwise)
``MultiheadAttention``          the fused q/k/v projection and out_proj as two ``Linear`` sites
==============================  ===================================  ========================================

The probes live on a private deep copy of the model whose supported modules get an explicit functional forward;
the user's model is never modified. ``nn.MultiheadAttention`` computes its projections inside one fused kernel
(module hooks on ``out_proj`` never fire), so its forward is replaced by an explicit, numerically equivalent one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import MetricError

#: module types whose own parameters the kernels cover (exact types: a subclass may change the forward)
COVERED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.BatchNorm1d,
                                        nn.BatchNorm2d, nn.MultiheadAttention)

MATRIX_FREE_HINT = "Deselect them (Problem(params=...)) or use a matrix-free metric ('ggn' or 'fisher')"


@dataclass
class Site:
    """One use of a parametrized linear map: its kind, the names of its parameters and the recorded tensors."""

    path: str
    kind: str  # "linear" | "embedding" | "norm"
    params: dict[str, str]  # role ("weight", "bias") -> full parameter name
    inputs: Tensor  # (B, T, in) features, or (B, T) token indices for embeddings
    probe: Tensor  # zeros of the output's shape in the (B, T, out) layout, requires grad
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return self.inputs.shape[1]


class Recorder:
    """Collects the sites of one forward pass (the instrumented forwards call :meth:`linear` etc.)."""

    def __init__(self, selected: set[str]) -> None:
        self.selected = selected
        self.sites: list[Site] = []
        self.calls: dict[str, int] = {}

    def _names(self, roles: dict[str, str]) -> dict[str, str]:
        return {role: name for role, name in roles.items() if name in self.selected}

    def _probe(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z, requires_grad=True)

    def linear(self, path: str, x: Tensor, weight: Tensor, bias: Tensor | None, roles: dict[str, str]) -> Tensor:
        """z = x Wᵀ + b over any leading dimensions; records x as (B, T, in)."""
        self.calls[path] = self.calls.get(path, 0) + 1
        z = F.linear(x, weight, bias)
        names = self._names(roles)
        if not names:
            return z
        B = x.shape[0]
        probe = self._probe(z.reshape(B, -1, z.shape[-1]))
        self.sites.append(Site(path, "linear", names, x.detach().reshape(B, -1, x.shape[-1]), probe))
        return z + probe.reshape(z.shape)

    def conv2d(self, path: str, m: nn.Conv2d, x: Tensor, roles: dict[str, str]) -> Tensor:
        """z = conv(x); records the unfolded (padded) input patches as (B, H_out·W_out, in·kh·kw)."""
        self.calls[path] = self.calls.get(path, 0) + 1
        z = m._conv_forward(x, m.weight, m.bias)
        names = self._names(roles)
        if not names:
            return z
        if m.padding_mode != "zeros":
            xp, padding = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
        else:
            xp, padding = x, m.padding
        if isinstance(padding, str):
            raise MetricError(f"convolution '{path}' uses padding={padding!r}; give the padding as numbers")
        patches = F.unfold(xp.detach(), m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        B, C = z.shape[:2]
        probe = self._probe(z.reshape(B, C, -1).transpose(1, 2))  # (B, T, out)
        self.sites.append(Site(path, "linear", names, patches.transpose(1, 2), probe))
        return z + probe.transpose(1, 2).reshape(z.shape)

    def embedding(self, path: str, m: nn.Embedding, idx: Tensor, roles: dict[str, str]) -> Tensor:
        self.calls[path] = self.calls.get(path, 0) + 1
        z = F.embedding(idx, m.weight, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, m.sparse)
        names = self._names(roles)
        if not names:
            return z
        B = idx.shape[0] if idx.ndim > 1 else -1
        probe = self._probe(z.reshape(max(B, 1), -1, z.shape[-1]))
        self.sites.append(Site(path, "embedding", names, idx.reshape(B, -1) if B > 0 else idx, probe,
                               {"vocab": m.num_embeddings, "padding_idx": m.padding_idx}))
        return z + probe.reshape(z.shape)

    def norm(self, path: str, xhat: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int,
             roles: dict[str, str]) -> Tensor:
        """z = x̂ ⊙ w + b with the affine parameters along ``channel_dim`` (1 for BatchNorm, trailing for
        LayerNorm: channel_dim = -1 means the trailing ``weight.ndim`` dims)."""
        self.calls[path] = self.calls.get(path, 0) + 1
        names = self._names(roles)
        if channel_dim == 1:  # BatchNorm: (B, C, *) -> broadcast over the rest
            shape = (1, -1) + (1,) * (xhat.ndim - 2)
            z = xhat * (weight.view(shape) if weight is not None else 1) + (bias.view(shape) if bias is not None else 0)
            flat = xhat.movedim(1, -1)
            B, m = xhat.shape[0], xhat.shape[1]
        else:
            z = xhat * (weight if weight is not None else 1) + (bias if bias is not None else 0)
            m = (weight if weight is not None else bias).numel()  # type: ignore[union-attr]
            flat, B = xhat, xhat.shape[0]
        if not names:
            return z
        zf = z.movedim(1, -1) if channel_dim == 1 else z
        probe = self._probe(zf.reshape(B, -1, m))
        self.sites.append(Site(path, "norm", names, flat.detach().reshape(B, -1, m), probe))
        p = probe.reshape(zf.shape)
        return z + (p.movedim(-1, 1) if channel_dim == 1 else p)


# ---------------------------------------------------------------------- instrumented forwards
def _roles(path: str, module: nn.Module) -> dict[str, str]:
    prefix = f"{path}." if path else ""
    return {n: prefix + n for n, _ in module.named_parameters(recurse=False)}


def _instrument(path: str, m: nn.Module, rec: Recorder) -> None:
    roles = _roles(path, m)
    t = type(m)
    if t is nn.Linear:
        m.forward = lambda x: rec.linear(path, x, m.weight, m.bias, roles)  # type: ignore[method-assign]
    elif t is nn.Conv2d:
        m.forward = lambda x: rec.conv2d(path, m, x, roles)  # type: ignore[method-assign]
    elif t is nn.Embedding:
        m.forward = lambda idx: rec.embedding(path, m, idx, roles)  # type: ignore[method-assign]
    elif t is nn.LayerNorm:
        def ln(x: Tensor) -> Tensor:
            xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            w, b = m.weight, m.bias
            if w is not None and w.ndim > 1 or b is not None and b.ndim > 1:
                xs = xhat.reshape(*xhat.shape[: xhat.ndim - len(m.normalized_shape)], -1)
                out = rec.norm(path, xs, None if w is None else w.reshape(-1), None if b is None else b.reshape(-1),
                               -1, roles)
                return out.reshape(xhat.shape)
            return rec.norm(path, xhat, w, b, -1, roles)
        m.forward = ln  # type: ignore[method-assign]
    elif t in (nn.BatchNorm1d, nn.BatchNorm2d):
        def bn(x: Tensor) -> Tensor:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            xhat = (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
            return rec.norm(path, xhat, m.weight, m.bias, 1, roles)
        m.forward = bn  # type: ignore[method-assign]
    elif t is nn.MultiheadAttention:
        from .attention import explicit_attention

        out_roles = _roles(f"{path}.out_proj", m.out_proj)
        m.forward = (lambda *args, **kw: explicit_attention(m, path, rec, roles, out_roles,  # type: ignore
                                                            *args, **kw))


def uncovered(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """The selected parameters no kernel covers, grouped by a description of their owning module."""
    modules = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for name in names:
        path = name.rpartition(".")[0]
        owner = modules[path]
        parent = modules.get(path.rpartition(".")[0]) if path else None
        if type(owner) in COVERED and _reason(owner) is None:
            continue
        if isinstance(parent, nn.MultiheadAttention) and owner is parent.out_proj and _reason(parent) is None:
            continue
        why = _reason(owner) or "no kernel for this module type"
        key = f"'{path}' ({type(owner).__name__}): {why}" if path else f"the model itself ({type(owner).__name__})"
        out.setdefault(key, []).append(name)
    return out


def _reason(m: nn.Module) -> str | None:
    """Why a module of a covered type is still refused (None if it is fine)."""
    if type(m) is nn.Conv2d and m.groups != 1:
        return f"grouped convolution (groups={m.groups})"
    if type(m) is nn.Embedding and m.max_norm is not None:
        return "max_norm renormalizes the weights inside the forward pass"
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) and (m.training or m.running_mean is None):
        return "BatchNorm in train mode (or without running statistics) couples the samples of a batch"
    if type(m) is nn.MultiheadAttention:
        if m.bias_k is not None or m.add_zero_attn:
            return "bias_k/bias_v/add_zero_attn are not supported"
        if not m._qkv_same_embed_dim:
            return "separate q/k/v projection weights (kdim/vdim != embed_dim) are not supported"
        if m.training and m.dropout > 0:
            return "attention dropout in train mode is random"
    return None


def instrumented_copy(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, Recorder]:
    """A deep copy of ``model`` whose modules owning the selected parameters record their sites.

    Raises:
        MetricError: a selected parameter is owned by a module no kernel covers (all of them are listed).
    """
    missing = uncovered(model, names)
    if missing:
        what = "; ".join(f"{k} (parameters {v})" for k, v in missing.items())
        raise MetricError(f"the block kernels cannot cover all selected parameters: {what}. {MATRIX_FREE_HINT}")
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    rec = Recorder(set(names))
    owners = {n.rpartition(".")[0] for n in names}
    modules = dict(twin.named_modules())
    for path in sorted(owners):
        m = modules[path]
        parent_path = path.rpartition(".")[0]
        parent = modules.get(parent_path)
        if isinstance(parent, nn.MultiheadAttention) and m is parent.out_proj:
            path, m = parent_path, parent
        _instrument(path, m, rec)
    return twin, rec


def check_calls(rec: Recorder, names: Sequence[str], batch: int) -> None:
    """Every selected parameter was used exactly once in the forward pass, on inputs with the batch axis first."""
    for s in rec.sites:
        if s.inputs.ndim < 2 or s.inputs.shape[0] != batch:
            raise MetricError(f"'{s.path}' is applied to a tensor of shape {tuple(s.inputs.shape)} whose first axis "
                              f"is not the batch (size {batch}); per-sample blocks need one application per "
                              f"sample (e.g. expand position indices over the batch)")
    shared = sorted(p for p, c in rec.calls.items() if c > 1)
    if shared:
        raise MetricError(f"modules {shared} are called more than once per forward pass (shared weights across "
                          f"calls); their blocks are not supported. {MATRIX_FREE_HINT}")
    seen = {n for s in rec.sites for n in s.params.values()}
    unused = [n for n in names if n not in seen]
    if unused:
        raise MetricError(f"the selected parameters {unused} are not used in the forward pass")
