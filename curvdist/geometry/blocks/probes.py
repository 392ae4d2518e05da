"""Instrumented forward passes: the layer inputs and the output gradients that per-layer curvature blocks need.

A *site* is one application of a map that is linear in its parameters. The module that applies it records the
input features a of the map and adds a zero *probe* tensor to its output z, so that ∂(Σ_n uₙ·fₙ)/∂probe is the
backpropagated output-side vector b = (∂f/∂z)ᵀu at that site for any output-space vector u. Every site is brought
into one layout, (B, T, features), T the positions that share the weights (tokens, output pixels):

==========================================  ===================================  =================================
module (``isinstance``: subclasses too)     input features a (B, T, ·)            parameters, block
==========================================  ===================================  =================================
``nn.Linear`` (any leading dims)            x                                     weight (out, in): G ⊗ A; bias
``transformers`` ``Conv1D`` (GPT-2)         x                                     weight (in, out): A ⊗ G; bias
``nn.Conv2d`` (groups = 1, any padding)     unfolded padded input patches         weight (out, in·kh·kw): G ⊗ A
``nn.Embedding`` (no ``max_norm``)          token indices (B, T)                  weight (V, d): A ⊗ G (A: tokens)
``nn.LayerNorm``, ``nn.RMSNorm``,           normalized input x̂                    weight, bias: exact blocks
``BatchNorm`` (eval)
``nn.MultiheadAttention`` (self-attention)  its fused q/k/v projection and ``out_proj``, two ``Linear`` sites
==========================================  ===================================  =================================

Attention modules other than ``nn.MultiheadAttention`` (timm's ``Attention``, Hugging Face attention) apply their
projections through ``Linear``/``Conv1D`` submodules, which are sites like any other. A module called several
times per forward pass, and a parameter shared by several modules (an embedding tied to the output head), gives
one site per use; :mod:`.kronecker` combines them. An ``Embedding`` applied to indices with a batch axis of size 1
(position ids of shape (1, T) broadcast over the batch, as GPT-2's) is expanded over the batch, so that every
sample has its own probe; indices without a batch axis are refused.

Every other selected parameter — a model's own tensors such as a class token or a positional embedding, the
parameters of modules without a site (grouped convolutions, Hugging Face ``RMSNorm`` classes, PReLU, …) — gets an
*exact* block from per-sample vector-Jacobian products (:mod:`.exact`). Refused are only parameters whose samples
are not separable: ``BatchNorm`` in train mode, and ``Embedding`` with ``max_norm`` (it renormalizes the weights
inside the forward pass).

The sites live on a private deep copy of the model (forward hooks, and for ``nn.MultiheadAttention``, whose
projections run inside one fused kernel, an explicit numerically equivalent forward); the user's model is never
modified.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import MetricError

#: module types with Kronecker (or exact norm) sites; a subclass of one of them is covered as it is
COVERED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.RMSNorm,
                                        nn.modules.batchnorm._BatchNorm, nn.MultiheadAttention)

MATRIX_FREE_HINT = "Deselect them (Problem(params=...)) or use a matrix-free metric ('ggn' or 'fisher')"

#: the orientation of a weight's Kronecker block in its storage layout: "oi" = (out, in) → G ⊗ A (Linear, Conv2d);
#: "io" = (in, out) → A ⊗ G (Conv1D, and Embedding, whose rows are indexed by the input token)
OUT_IN, IN_OUT = "oi", "io"


def conv1d_type() -> type[nn.Module] | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is imported (a model holding one has imported it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


@dataclass
class Site:
    """One use of a parametrized linear map: its kind, the names of its parameters and the recorded tensors.

    ``kind``: ``"linear"`` (inputs (B, T, in)), ``"embedding"`` (inputs: indices (B, T)) or ``"norm"`` (inputs:
    x̂ (B, T, m)). ``orientation``: :data:`OUT_IN` or :data:`IN_OUT`. ``mask``: (B, T) weights of the positions
    for the input-side statistics (the batch's ``attention_mask`` when it has the site's positions; None: all
    positions count)."""

    path: str
    kind: str
    params: dict[str, str]  # role ("weight", "bias") -> full parameter name
    inputs: Tensor
    probe: Tensor  # zeros of the output's shape in the (B, T, out) layout, requires grad
    orientation: str = OUT_IN
    mask: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return self.inputs.shape[1]


class Recorder:
    """Collects the sites of one forward pass (the hooks call :meth:`linear` etc.).

    ``batch``: the number of samples of the current batch, ``mask``: its ``attention_mask`` (or None), both set by
    :meth:`begin` before each forward pass."""

    def __init__(self, selected: set[str]) -> None:
        self.selected = selected
        self.sites: list[Site] = []
        self.calls: dict[str, int] = {}
        self.batch = 0
        self.mask: Tensor | None = None

    def begin(self, batch: int, mask: Tensor | None = None) -> None:
        self.sites.clear()
        self.calls.clear()
        self.batch, self.mask = batch, mask

    def _names(self, roles: dict[str, str]) -> dict[str, str]:
        return {role: name for role, name in roles.items() if name in self.selected}

    def _probe(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z, requires_grad=True)

    def _mask_for(self, B: int, T: int) -> Tensor | None:
        m = self.mask
        if m is None or tuple(m.shape) != (B, T):
            return None
        return m.detach()

    def _count(self, path: str) -> None:
        self.calls[path] = self.calls.get(path, 0) + 1

    def linear(self, path: str, x: Tensor, z: Tensor, roles: dict[str, str], orientation: str = OUT_IN) -> Tensor:
        """A site z = x Wᵀ + b (or x W + b for ``IN_OUT``) over any leading dimensions; records x as (B, T, in)."""
        self._count(path)
        names = self._names(roles)
        if not names:
            return z
        B = x.shape[0] if x.ndim > 1 else 1
        probe = self._probe(z.reshape(B, -1, z.shape[-1]))
        a = x.detach().reshape(B, -1, x.shape[-1])
        self.sites.append(Site(path, "linear", names, a, probe, orientation, self._mask_for(B, a.shape[1])))
        return z + probe.reshape(z.shape)

    def linear_apply(self, path: str, x: Tensor, weight: Tensor, bias: Tensor | None, roles: dict[str, str]
                     ) -> Tensor:
        """z = x Wᵀ + b computed here and recorded as a site (for explicit forwards such as attention's)."""
        return self.linear(path, x, F.linear(x, weight, bias), roles)

    def conv2d(self, path: str, m: nn.Conv2d, x: Tensor, z: Tensor, roles: dict[str, str]) -> Tensor:
        """A convolution site; records the unfolded padded input patches as (B, H_out·W_out, in·kh·kw)."""
        self._count(path)
        names = self._names(roles)
        if not names:
            return z
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        xp = F.pad(x.detach(), m._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(xp, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)
        B, C = z.shape[:2]
        probe = self._probe(z.reshape(B, C, -1).transpose(1, 2))  # (B, T, out)
        self.sites.append(Site(path, "linear", names, patches.transpose(1, 2), probe))
        return z + probe.transpose(1, 2).reshape(z.shape)

    def embedding(self, path: str, m: nn.Embedding, idx: Tensor, z: Tensor, roles: dict[str, str]) -> Tensor:
        """An embedding site z = W[idx]; indices with a broadcast batch axis of size 1 (position ids (1, T)) are
        expanded over the batch (the output then has the batch's leading size)."""
        self._count(path)
        names = self._names(roles)
        if not names:
            return z
        B = self.batch
        if idx.ndim > 1 and idx.shape[0] == 1 and B > 1:  # e.g. position ids (1, T) broadcast over the batch
            idx = idx.expand(B, *idx.shape[1:])
            z = z.expand(B, *z.shape[1:])
        Bi = idx.shape[0]
        probe = self._probe(z.reshape(Bi, -1, z.shape[-1]))
        ids = idx.reshape(Bi, -1)
        self.sites.append(Site(path, "embedding", names, ids, probe, IN_OUT, self._mask_for(Bi, ids.shape[1]),
                               {"vocab": m.num_embeddings, "padding_idx": m.padding_idx,
                                "scale_grad_by_freq": m.scale_grad_by_freq}))
        return z + probe.reshape(z.shape)

    def norm(self, path: str, xhat: Tensor, z: Tensor, channel_dim: int, width: int, roles: dict[str, str]
             ) -> Tensor:
        """An elementwise affine site z = x̂ ⊙ w + b with the parameters along ``channel_dim`` (1 for BatchNorm)
        or the trailing dims (``channel_dim = -1``, ``width`` entries: LayerNorm/RMSNorm)."""
        self._count(path)
        names = self._names(roles)
        if not names:
            return z
        B = xhat.shape[0]
        flat = xhat.movedim(1, -1) if channel_dim == 1 else xhat
        zf = z.movedim(1, -1) if channel_dim == 1 else z
        probe = self._probe(zf.reshape(B, -1, width))
        self.sites.append(Site(path, "norm", names, flat.detach().reshape(B, -1, width), probe))
        p = probe.reshape(zf.shape)
        return z + (p.movedim(-1, 1) if channel_dim == 1 else p)


# ---------------------------------------------------------------------- what covers which parameter
def _reason(m: nn.Module) -> str | None:
    """Why the parameters of a covered module cannot be given any block (None if they can)."""
    if isinstance(m, nn.Embedding) and m.max_norm is not None:
        return "max_norm renormalizes the weights inside the forward pass"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
        return "BatchNorm in train mode (or without running statistics) couples the samples of a batch"
    return None


def _site_kind(m: nn.Module) -> str | None:
    """The kind of site a module is instrumented as, or None (its parameters then get exact blocks)."""
    conv1d = conv1d_type()
    if isinstance(m, nn.MultiheadAttention):
        ok = m.bias_k is None and not m.add_zero_attn and m._qkv_same_embed_dim and not (m.training and m.dropout)
        return "attention" if ok else None
    if conv1d is not None and isinstance(m, conv1d):
        return "conv1d"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv2d" if m.groups == 1 else None
    if isinstance(m, nn.Embedding):
        return "embedding"
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return "norm"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    return None


@dataclass
class Plan:
    """Which selected parameters come from sites and which get exact blocks, for one model."""

    sites: dict[str, str]  # module path -> site kind, for every module to instrument
    site_params: list[str]  # selected parameters held by instrumented modules
    exact: list[str]  # selected parameters for per-sample exact blocks


def plan(model: nn.Module, names: Sequence[str]) -> Plan:
    """Decide how every selected parameter is covered (parameters are identified by tensor, so a parameter tied
    to several modules is held by all of them).

    Raises:
        MetricError: a selected parameter cannot be given a block (all of them are listed, with the reason).
    """
    selected = set(names)
    by_id = {id(p): n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    inside_attention: set[str] = set()
    sites: dict[str, str] = {}
    holders: dict[str, list[str | None]] = {}  # parameter -> the site kinds of the modules holding it
    refused: dict[str, list[str]] = {}
    for path, m in modules.items():
        if path in inside_attention:
            continue
        kind = _site_kind(m)
        owned = list(m.named_parameters(recurse=False))
        if kind == "attention":
            inside_attention.add(f"{path}.out_proj" if path else "out_proj")
            owned += list(m.out_proj.named_parameters(recurse=False))
        held = [by_id[id(p)] for _, p in owned if by_id.get(id(p)) in selected]
        if not held:
            continue
        why = _reason(m)
        if why is not None:
            key = f"'{path}' ({type(m).__name__}): {why}" if path else f"the model itself ({type(m).__name__}): {why}"
            refused.setdefault(key, []).extend(held)
            continue
        if kind is not None:
            sites[path] = kind
        for n in held:
            holders.setdefault(n, []).append(kind)
    if refused:
        what = "; ".join(f"{k} (parameters {v})" for k, v in refused.items())
        raise MetricError(f"the block kernels cannot cover all selected parameters: {what}. {MATRIX_FREE_HINT}")
    covered = {n for n, kinds in holders.items() if all(k is not None for k in kinds)}
    return Plan(sites, [n for n in names if n in covered], [n for n in names if n not in covered])


def uncovered(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """The selected parameters no site covers (they get exact blocks), grouped by a description of their owning
    module."""
    p = plan(model, names)
    modules = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for name in p.exact:
        path = name.rpartition(".")[0]
        owner = modules[path]
        key = f"'{path}' ({type(owner).__name__})" if path else f"the model itself ({type(owner).__name__})"
        out.setdefault(key, []).append(name)
    return out


# ---------------------------------------------------------------------- instrumentation
def _roles(m: nn.Module, by_id: dict[int, str], prefix: str = "") -> dict[str, str]:
    return {prefix + r: by_id[id(p)] for r, p in m.named_parameters(recurse=False) if id(p) in by_id}


def _hook(path: str, kind: str, m: nn.Module, rec: Recorder, by_id: dict[int, str]) -> Callable[[], None]:
    """Instrument module ``m`` as a site of ``kind``; returns what undoes it."""
    roles = _roles(m, by_id)
    if kind in ("linear", "conv1d"):
        orientation = IN_OUT if kind == "conv1d" else OUT_IN

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            return rec.linear(path, args[0], out, roles, orientation)
    elif kind == "conv2d":
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            return rec.conv2d(path, mod, args[0], out, roles)  # type: ignore[arg-type]
    elif kind == "embedding":
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            return rec.embedding(path, mod, args[0], out, roles)  # type: ignore[arg-type]
    elif kind == "norm":
        shape = tuple(m.normalized_shape)  # type: ignore[arg-type]
        width = int(torch.Size(shape).numel())
        rms = isinstance(m, nn.RMSNorm)

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            x = args[0]
            xhat = (F.rms_norm(x, shape, None, mod.eps) if rms
                    else F.layer_norm(x, shape, None, None, mod.eps))
            lead = xhat.shape[: xhat.ndim - len(shape)]
            z = rec.norm(path, xhat.reshape(*lead, width), out.reshape(*lead, width), -1, width, roles)
            return z.reshape(out.shape)
    elif kind == "batchnorm":
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            x = args[0]
            shape = (1, -1) + (1,) * (x.ndim - 2)
            xhat = (x - mod.running_mean.view(shape)) / torch.sqrt(mod.running_var.view(shape) + mod.eps)
            return rec.norm(path, xhat, out, 1, x.shape[1], roles)
    elif kind == "attention":
        from .attention import explicit_attention

        out_roles = _roles(m.out_proj, by_id)
        m.forward = (lambda *args, **kw: explicit_attention(m, path, rec, roles, out_roles,  # type: ignore
                                                            *args, **kw))
        return lambda: m.__dict__.pop("forward", None)
    else:  # pragma: no cover - plan() only returns the kinds above
        raise AssertionError(kind)
    return m.register_forward_hook(hook).remove


def instrumented_copy(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, Recorder, Plan]:
    """A deep copy of ``model`` whose modules holding selected parameters record their sites, the recorder, and
    the plan (which parameters have sites, which get exact blocks).

    Raises:
        MetricError: a selected parameter cannot be given a block (see :func:`plan`).
    """
    p = plan(model, names)
    twin = copy.deepcopy(model)
    for q in twin.parameters():
        q.requires_grad_(False)
    by_id = {id(q): n for n, q in twin.named_parameters()}
    rec = Recorder(set(p.site_params))
    modules = dict(twin.named_modules())
    for path, kind in sorted(p.sites.items()):
        _hook(path, kind, modules[path], rec, by_id)
    return twin, rec, p


@contextmanager
def instrumented(model: nn.Module, names: Sequence[str]) -> Iterator[tuple[Recorder, Plan]]:
    """``model`` itself instrumented for the duration of the block (for a model that cannot be copied, such as
    a ZeRO-3 engine's module): the recorder and the plan; every hook is removed on exit.

    Raises:
        MetricError: a selected parameter cannot be given a block (see :func:`plan`).
    """
    p = plan(model, names)
    by_id = {id(q): n for n, q in model.named_parameters()}
    rec = Recorder(set(p.site_params))
    modules = dict(model.named_modules())
    undo = [_hook(path, kind, modules[path], rec, by_id) for path, kind in sorted(p.sites.items())]
    try:
        yield rec, p
    finally:
        for u in reversed(undo):
            u()


def check_calls(rec: Recorder, names: Sequence[str], batch: int) -> None:
    """Every site has the batch axis first and every site parameter was used in the forward pass."""
    for s in rec.sites:
        if s.inputs.ndim < 2 or s.inputs.shape[0] != batch:
            raise MetricError(f"'{s.path}' is applied to a tensor of shape {tuple(s.inputs.shape)} whose first axis "
                              f"is not the batch (size {batch}); per-sample blocks need one application per "
                              f"sample (e.g. expand position indices over the batch)")
    seen = {n for s in rec.sites for n in s.params.values()}
    unused = [n for n in names if n not in seen]
    if unused:
        raise MetricError(f"the selected parameters {unused} are not used in the forward pass")
