"""RiemannianSGD as DeepSpeed's client optimizer (``deepspeed.initialize(optimizer=...)``), ZeRO stages 0-2,
fp32 or bf16.

DeepSpeed hands its client optimizer different tensors depending on the configuration:

* ZeRO 0, fp32: the module's own parameters, with full (averaged) gradients;
* ZeRO 0, bf16: fp32 master copies, one per parameter, with full fp32 gradients;
* ZeRO 1/2 (fp32 or bf16): one flat fp32 partition per rank, with the gradient of that partition only.

A preconditioner couples all coordinates, (M + δI)⁻¹g needs the full gradient, so :class:`DeepSpeedRiemannianSGD`
assembles it: from the fragments each rank holds (DeepSpeed's parameter-to-partition map, ``_hp_mapping``),
summed over the data-parallel group. It then runs :class:`curvdist.optim.RiemannianSGD`'s own step on full fp32
stand-ins (zeros carrying the full gradient, so the step leaves exactly −lr·d in them) and adds that update to
whatever DeepSpeed holds: the parameter, the master copy, or this rank's fragment of the partition. DeepSpeed then
copies masters/partitions back into the module as usual. Every rank computes the same metric (reduced over the
group, :class:`.metric.DataParallelMetric`) and the same direction, so the parameters stay identical across ranks.
ZeRO-3 (partitioned parameters) is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...errors import ConfigError, MetricError
from ...geometry.metrics import Metric
from ...optim import RiemannianSGD
from ...problem.problem import Problem
from .config import PreconditionerSpec, preconditioner_spec
from .engine import is_partitioned, torch_linear
from .metric import KINDS, DataParallelMetric
from .replica import Replica


class DeepSpeedRiemannianSGD(RiemannianSGD):
    """θ ← θ − lr·(M + δI)⁻¹g inside DeepSpeed, with M's statistics reduced over the data-parallel group.

    Args are those of :class:`~curvdist.optim.RiemannianSGD`; ``data`` is the metric batch, the same on every rank
    (each rank uses its shard). A metric kind becomes a :class:`DataParallelMetric` over ``group`` in ``dtype``
    (``"adam"`` stays RiemannianSGD's own, from the full gradients every rank assembles); a callable
    ``problem -> Metric`` is called on a clean replica of the model. ``group``: the data-parallel group (None: the
    default group, which is DeepSpeed's for pure data parallelism).
    """

    def __init__(self, model: nn.Module, loss: str, data: Any, metric: str | Callable[[Problem], Metric] = "kfac",
                 lr: float = 0.1, damping: float = 1e-3, refresh: int = 10, momentum: float = 0.0,
                 params: Sequence[str] | None = None, batch_size: int | None = None,
                 metric_options: dict[str, Any] | None = None, group: Any = None,
                 dtype: torch.dtype | str = torch.float32) -> None:
        if isinstance(metric, str) and metric != "adam":  # adam: RiemannianSGD's own v from the (full) gradients
            metric = DataParallelMetric(metric, damping, group=group, dtype=dtype, batch_size=batch_size,
                                        **(metric_options or {}))
        super().__init__(model, loss, data, metric=metric, lr=lr, damping=damping, refresh=refresh,
                         momentum=momentum, params=params, batch_size=batch_size)
        self.group = group
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self._replica: Replica | None = None

    def refresh_metric(self) -> Metric:
        """Rebuild M at the current parameters, on a clean replica of the model (never through DeepSpeed's
        module: its forward hooks would fire, and the engine may still be under construction)."""
        if self.metric_kind == "adam":
            return super().refresh_metric()
        if isinstance(self.metric_kind, DataParallelMetric):
            M = self.metric_kind.build(self.model, self.loss, self.data, self.names)
        else:
            if self._replica is None:
                self._replica = Replica(self.model, self.dtype)
            with torch_linear(), self._replica.loaded(self.model) as replica:
                M = self.metric_kind(Problem(replica, self.loss, self.data, params=self.names,
                                             batch_size=self.batch_size))
        dim = sum(p.numel() for p in self._module_params())
        if not isinstance(M, Metric) or M.dim != dim:
            raise MetricError(f"the metric must be a curvdist Metric of dimension {dim}")
        self.metric = M
        return M

    def _module_params(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    def _holds_module_params(self) -> bool:
        held = self.param_groups[0]["params"]
        return len(held) == len(self.names) and all(h is p for h, p in zip(held, self._module_params()))

    @classmethod
    def from_config(cls, model: nn.Module, data: Any, config: Any, group: Any = None) -> DeepSpeedRiemannianSGD:
        """Built from the ``curvdist.preconditioner`` section of a DeepSpeed configuration (dict or JSON path)."""
        spec = config if isinstance(config, PreconditionerSpec) else preconditioner_spec(config)
        m = spec.metric
        if m.kind not in (*KINDS, "adam"):
            raise ConfigError(f"curvdist.preconditioner.metric: the {m.kind} metric cannot precondition a DeepSpeed "
                              f"run; choose one of {(*KINDS, 'adam')}")
        return cls(model, spec.loss, data, metric=m.kind, lr=spec.lr, damping=m.damping, refresh=spec.refresh,
                   momentum=spec.momentum, params=spec.params, batch_size=spec.batch_size,
                   metric_options=dict(m.options), group=group, dtype=spec.dtype)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        module_params = self._module_params()
        if any(is_partitioned(p) for p in module_params):
            raise ConfigError("DeepSpeedRiemannianSGD supports ZeRO stages 0-2; ZeRO-3 partitions the parameters "
                              "themselves")
        group = self.param_groups[0]
        held = list(group["params"])
        if self._holds_module_params():  # ZeRO 0, fp32: DeepSpeed steps the module's own parameters
            if all(p.grad is not None and not bool(p.grad.any()) for p in module_params):
                return None  # DeepSpeed's optimizer-state initialization: a zero gradient moves nothing
            return super().step(closure)
        if hasattr(module_params[0], "_hp_mapping"):
            grads = self._gather_partition_gradients(module_params, held)
            apply = lambda update: self._add_to_partitions(module_params, held, update)  # noqa: E731
        elif len(held) == len(module_params) and all(h.shape == p.shape for h, p in zip(held, module_params)):
            grads = [h.grad.float() if h.grad is not None else None for h in held]
            apply = lambda update: [h.add_(u.to(h.dtype)) for h, u in zip(held, update)]  # noqa: E731
        else:
            raise ConfigError(f"unrecognized DeepSpeed optimizer layout: {len(held)} tensors for "
                              f"{len(module_params)} parameters")
        if all(g is not None and not bool(g.any()) for g in grads):
            return None  # DeepSpeed initializes optimizer states with one step on zero gradients: skip it
        stand_ins = []
        for p, g in zip(module_params, grads):
            t = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            t.grad = g
            stand_ins.append(t)
        group["params"] = stand_ins
        try:
            loss = super().step(closure)
        finally:
            group["params"] = held
        apply([t.detach() for t in stand_ins])
        return loss

    def _partition_of(self, fragment: Tensor, held: list[Tensor]) -> Tensor:
        ptr = fragment.untyped_storage().data_ptr()
        for h in held:
            if h.untyped_storage().data_ptr() == ptr:
                return h
        raise ConfigError("a parameter's ZeRO fragment lies outside the partitions DeepSpeed passed to step()")

    def _gather_partition_gradients(self, module_params: list[nn.Parameter], held: list[Tensor]) -> list[Tensor]:
        """Full fp32 gradients: each rank writes the fragments of its partition's gradient, one all_reduce adds."""
        sizes = [p.numel() for p in module_params]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=module_params[0].device)
        offset = 0
        dp_group = self.group
        for p, n in zip(module_params, sizes):
            m = p._hp_mapping
            if m is not None:
                dp_group = getattr(p, "_dp_group", dp_group)
                part = self._partition_of(m.hp_fragment, held)
                if part.grad is None:
                    raise MetricError("DeepSpeed passed a partition without gradient to step()")
                src = part.grad.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel)
                flat.narrow(0, offset + m.lp_fragment_address.start, m.lp_fragment_address.numel).copy_(src)
            offset += n
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=dp_group)
        return [t.view(p.shape) for t, p in zip(torch.split(flat, sizes), module_params)]

    def _add_to_partitions(self, module_params: list[nn.Parameter], held: list[Tensor],
                           update: list[Tensor]) -> None:
        """Add each parameter's update to the fragment of it that this rank's partition holds."""
        for p, u in zip(module_params, update):
            m = p._hp_mapping
            if m is None:
                continue
            piece = u.reshape(-1).narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel)
            m.hp_fragment.add_(piece.to(m.hp_fragment.dtype))

    # ------------------------------------------------------------------ checkpoints
    def curvdist_state_dict(self) -> dict[str, Any]:
        """Step count, momentum buffer and the metric's reduced statistics (plain values and tensors)."""
        factory = self.metric_kind
        return {"steps": self.steps, "buffer": self._buffer, "adam_v": getattr(self, "_sq", None),
                "metric": factory.state_dict() if isinstance(factory, DataParallelMetric) and self.metric is not None
                else None}

    def load_curvdist_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`curvdist_state_dict`: the resumed run takes the same steps as an uninterrupted one."""
        self.steps = int(state["steps"])
        self._buffer = state["buffer"]
        if self.metric_kind == "adam":
            self._sq = state.get("adam_v")
            self.metric = None  # rebuilt from v at the next step, as in an uninterrupted run
            return
        factory = self.metric_kind
        if state.get("metric") is not None and isinstance(factory, DataParallelMetric):
            self.metric = factory.rebuild(state["metric"])
        else:
            self.metric = None
            if self.steps % self.refresh:
                warnings.warn(f"the checkpoint holds no statistics of the {factory!r} metric; it is rebuilt at the "
                              f"next step ({self.steps}), not at the next refresh, so the resumed run departs from "
                              f"an uninterrupted one", stacklevel=2)
