"""This rank's ZeRO-3 partitions of a model's parameters: the layout of partitioned vectors, shifting the engine's
parameters by ε·v, and gradients reduced straight into partitions.

ZeRO-3 stores parameter i (``ds_numel`` entries, flattened) as equal slices of ``ds_tensor.numel()`` = P_i entries,
rank r holding the flat entries [r·P_i, (r+1)·P_i) (the last slices padded past ``ds_numel``). A vector of the
problem is the concatenation of the parameters' flat entries in ``named_parameters`` order — the local problem's
layout — and this rank holds, per parameter, its owned piece: the ``segments`` (offset, length) of that layout.

Nothing here gathers a parameter: the engine's forward and backward hooks gather each module's parameters when it
runs and release them after, exactly as in training; :meth:`ZeroPartitions.shifted` changes only this rank's
``ds_tensor`` slices (and lets DeepSpeed re-gather its small persistent parameters from them), and
:meth:`ZeroPartitions.gradient` reduces each parameter's gradient over the data-parallel group as soon as
backward produces it, keeps this rank's piece and drops the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...errors import ConfigError
from .data_parallel import group_rank_and_size
from .engine import is_partitioned


class GatherMeter:
    """The largest number of parameter entries held in full (gathered, or persistent) on this rank at once, sampled
    before every module's forward and whenever backward hands over a parameter's gradient."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.peak = 0

    def sample(self) -> None:
        held = sum(int(p.ds_numel) for p in self.params if p.data.numel() > 0)
        self.peak = max(self.peak, held)

    @contextmanager
    def watching(self, module: nn.Module) -> Iterator[GatherMeter]:
        handles = [m.register_forward_pre_hook(lambda *_: self.sample()) for m in module.modules()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


class ZeroPartitions:
    """The selected parameters of a ZeRO-3 ``module`` as this rank's pieces of the problem's flat layout.

    Args:
        engine: the ``DeepSpeedEngine`` (its module's parameters are ZeRO-3 parameters).
        names: the parameters curvature is taken in (``None``: every trainable one), in the module's order.
        group: the data-parallel process group the parameters are partitioned over.
    """

    def __init__(self, engine: Any, names: Sequence[str] | None, group: Any) -> None:
        self.engine, self.module, self.group = engine, engine.module, group
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        unpartitioned = [n for n, p in named if not is_partitioned(p)]
        if unpartitioned:
            raise ConfigError(f"the parameters {unpartitioned[:5]} are not ZeRO-3 partitioned; partitioned curvature "
                              f"needs a ZeRO stage 3 engine")
        if names is not None:
            unknown = sorted(set(names) - {n for n, _ in named})
            if unknown:
                raise ConfigError(f"params: {unknown} are not trainable parameters of the model")
            named = [(n, p) for n, p in named if n in set(names)]
        if not named:
            raise ConfigError("no trainable parameters to take curvature in")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.rank, self.world = group_rank_and_size(group)
        self.numels = [int(p.ds_numel) for p in self.params]
        sizes = [int(p.ds_tensor.numel()) for p in self.params]
        self.owned = [max(0, min(P, n - self.rank * P)) for P, n in zip(sizes, self.numels)]
        self.starts = [min(self.rank * P, n) for P, n in zip(sizes, self.numels)]
        offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        #: (offset, length) in the problem's flat layout of each piece this rank holds
        self.segments = [(o + s, k) for o, s, k in zip(offsets, self.starts, self.owned)]
        self.dim = sum(self.numels)
        self.local_dim = sum(self.owned)
        self.dtype = self.params[0].ds_tensor.dtype
        self.all_params = list(self.module.parameters())
        self.meter = GatherMeter(self.all_params)

    # ------------------------------------------------------------ this rank's pieces
    def split(self, v: Tensor) -> tuple[Tensor, ...]:
        """The per-parameter pieces of a local vector (views)."""
        return torch.split(v, self.owned)

    def pieces(self) -> list[Tensor]:
        """This rank's pieces of θ, one view per parameter (no copy)."""
        return [p.ds_tensor.detach()[:k] for p, k in zip(self.params, self.owned)]

    # ------------------------------------------------------------ the engine's parameters
    def _coordinator(self) -> Any:
        return self.engine.optimizer.parameter_offload.get_param_coordinator()

    def release(self) -> None:
        """Back to the state after an engine step: every parameter partitioned again (DeepSpeed's own release of
        whatever a pass left gathered), then the small parameters ZeRO-3 keeps whole on every rank gathered again
        from their slices (as the engine does after ``step``)."""
        self._coordinator().release_and_reset_all(self.module)
        persistent = [p for p in self.all_params if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].all_gather(persistent)

    @contextmanager
    def shifted(self, v: Tensor, eps: float) -> Iterator[None]:
        """Inside the block the model's parameters are θ + ε·v: this rank adds ε·(its piece of v) to its slices,
        and everything gathered is released so that each module re-gathers the shifted values. On exit the
        slices are restored bit for bit from a copy (this rank's share only)."""
        saved = [p.ds_tensor.detach()[:k].clone() for p, k in zip(self.params, self.owned)]
        try:
            with torch.no_grad():
                for p, k, piece in zip(self.params, self.owned, self.split(v)):
                    p.ds_tensor.data[:k].add_(piece.to(p.ds_tensor.dtype), alpha=eps)
            self.release()
            yield
        finally:
            with torch.no_grad():
                for p, k, old in zip(self.params, self.owned, saved):
                    p.ds_tensor.data[:k].copy_(old)
            self.release()

    # ------------------------------------------------------------ gradients into partitions
    def _piece(self, g: Tensor, i: int) -> Tensor:
        """Σ_ranks g (the gradient of parameter i on each rank), this rank's piece only: an ``all_reduce`` of the
        parameter (gloo has no reduce-scatter; other backends reduce-scatter) and a slice."""
        flat = g.detach().reshape(-1)
        s, k = self.starts[i], self.owned[i]
        if self.world == 1:
            return flat[s:s + k].clone()
        if dist.get_backend(self.group) != "gloo":
            P = int(self.params[i].ds_tensor.numel())
            padded = torch.zeros(P * self.world, dtype=flat.dtype, device=flat.device)
            padded[:flat.numel()] = flat
            out = torch.empty(P, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_tensor(out, padded, group=self.group)
            return out[:k]
        flat = flat.clone()
        dist.all_reduce(flat, group=self.group)
        return flat[s:s + k].clone()

    def gradient(self, run: Callable[[], tuple[Tensor, Tensor | None]], accumulate: Tensor,
                 sign: float = 1.0) -> None:
        """``accumulate`` += ``sign`` · this rank's piece of Σ_ranks ∂⟨u, t⟩/∂θ, where ``run()`` runs the engine's
        module forward on this rank's data and returns (t, u): a loss with u None (its gradient), or outputs and
        output cotangents (a vector-Jacobian product). Each parameter's gradient is reduced in a hook the moment
        backward produces it and replaced by a zero-stride zero, so no full gradient outlives its layer."""
        pieces = self.split(accumulate)

        def hook(i: int) -> Callable[[Tensor], Tensor]:
            def reduce(g: Tensor) -> Tensor:
                self.meter.sample()
                pieces[i].add_(self._piece(g, i).to(pieces[i].dtype), alpha=sign)
                return g.new_zeros(()).expand(g.shape)
            return reduce

        handles = [p.register_hook(hook(i)) for i, p in enumerate(self.params)]
        try:
            with self.meter.watching(self.module):
                t, u = run()
            torch.autograd.grad(t, self.params, grad_outputs=u, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            self.release()
