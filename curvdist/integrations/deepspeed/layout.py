"""What DeepSpeed hands its client optimizer under ZeRO 0-2, seen per module parameter (:class:`HeldLayout`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError, MetricError, ProblemError


class HeldLayout:
    """What DeepSpeed handed the optimizer under ZeRO 0-2, per module parameter i: its gradient (the reduced
    gradient, or this rank's fragment of it, zero elsewhere) and where an update goes.

    * ZeRO 0, fp32: the module's own parameters (``replicated``: every rank holds the whole reduced gradient);
    * ZeRO 0, bf16: fp32 master copies, one per parameter (``replicated``);
    * ZeRO 1/2: flat fp32 partitions; parameter i's fragment is located by DeepSpeed's ``_hp_mapping``.
    """

    def __init__(self, opt: Any, module_params: list[nn.Parameter]) -> None:
        self.params = module_params
        self.held = list(opt.param_groups[0]["params"])
        self.sizes = [p.numel() for p in module_params]
        self.group = opt.group
        self.device = module_params[0].device
        if opt._holds_module_params():
            self.mode, self.replicated = "module", True
        elif hasattr(module_params[0], "_hp_mapping"):
            self.mode, self.replicated = "fragments", False
            for p in module_params:
                if p._hp_mapping is not None:
                    self.group = getattr(p, "_dp_group", self.group)
        elif len(self.held) == len(module_params) and all(h.shape == p.shape
                                                          for h, p in zip(self.held, module_params)):
            self.mode, self.replicated = "masters", True
        else:
            raise ConfigError(f"unrecognized DeepSpeed optimizer layout: {len(self.held)} tensors for "
                              f"{len(module_params)} parameters")
        names = opt.names
        grads = {"module": [p.grad for p in module_params], "masters": [h.grad for h in self.held]}.get(self.mode)
        if grads is not None:
            missing = [n for n, g in zip(names, grads) if g is None]
            if missing:
                raise ProblemError(f"no gradient for {missing}: call engine.backward(loss) before engine.step()")

    def _partition_of(self, fragment: Tensor) -> Tensor:
        ptr = fragment.untyped_storage().data_ptr()
        for h in self.held:
            if h.untyped_storage().data_ptr() == ptr:
                return h
        raise ConfigError("a parameter's ZeRO fragment lies outside the partitions DeepSpeed passed to step()")

    def any_gradient(self) -> bool:
        """Whether any gradient entry this rank holds is nonzero (read in place, nothing assembled)."""
        if self.mode == "module":
            return any(bool(p.grad.any()) for p in self.params)
        return any(h.grad is not None and bool(h.grad.any()) for h in self.held)

    def gradient(self, i: int) -> Tensor:
        """Parameter i's fp32 gradient as this rank holds it (flat; zero outside this rank's fragment)."""
        p = self.params[i]
        if self.mode == "module":
            return p.grad.reshape(-1).float()
        if self.mode == "masters":
            return self.held[i].grad.reshape(-1).float()
        out = torch.zeros(self.sizes[i], dtype=torch.float32, device=self.device)
        m = p._hp_mapping
        if m is not None:
            part = self._partition_of(m.hp_fragment)
            if part.grad is None:
                raise MetricError("DeepSpeed passed a partition without gradient to step()")
            src = part.grad.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel)
            out.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel).copy_(src)
        return out

    def add(self, i: int, d: Tensor, lr: float) -> None:
        """Add −lr·d (d: parameter i's direction, flat, full length) to what this rank holds of it."""
        p = self.params[i]
        if self.mode == "module":
            p.add_(d.view_as(p).to(p.dtype), alpha=-lr)
            return
        update = d * -lr
        if self.mode == "masters":
            h = self.held[i]
            h.add_(update.view(h.shape).to(h.dtype))
        else:
            m = p._hp_mapping
            if m is None:
                return
            piece = update.reshape(-1).narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel)
            m.hp_fragment.add_(piece.to(m.hp_fragment.dtype))
