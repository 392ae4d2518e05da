"""RiemannianSGD as DeepSpeed's client optimizer (``deepspeed.initialize(optimizer=...)``), ZeRO stages 0-2,
fp32 or bf16.

DeepSpeed hands its client optimizer different tensors depending on the configuration:

* ZeRO 0, fp32: the module's own parameters, with full (averaged) gradients;
* ZeRO 0, bf16: fp32 master copies, one per parameter, with full fp32 gradients;
* ZeRO 1/2 (fp32 or bf16): one flat fp32 partition per rank, with the gradient of that partition only.

A preconditioner couples all coordinates, (M + δI)⁻¹g needs the full gradient, so :class:`DeepSpeedRiemannianSGD`
assembles it: from the fragments each rank holds (DeepSpeed's parameter-to-partition map, ``_hp_mapping``),
summed over the data-parallel group. :meth:`curvdist.optim.RiemannianSGD.precondition` turns that full fp32
gradient into the direction d, and −lr·d is added to whatever DeepSpeed holds: the parameter, the master copy, or
this rank's fragment of the partition. DeepSpeed then copies masters/partitions back into the module as usual.
Every rank computes the same metric (reduced over the group, :class:`.metric.DataParallelMetric`) and the same
direction, so the parameters stay identical across ranks. The optimizer's state (step count, momentum buffer,
Adam's v, the metric's statistics: flat vectors over the module's parameters) is RiemannianSGD's one entry
``state[STATE_KEY]``, not keyed by the tensors DeepSpeed passes (flat partitions under ZeRO 1/2), so it is the same
on every rank and under every stage; :meth:`~DeepSpeedRiemannianSGD.curvdist_state_dict` is that entry.
ZeRO-3 (partitioned parameters) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...errors import ConfigError, MetricError, ProblemError
from ...geometry.metrics import Metric
from ...optim import RiemannianSGD
from ...optim.riemannian_sgd import STATE_KEY, metric_state
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

    def build_metric(self) -> Metric:
        """M at the current parameters, on a clean replica of the model (never through DeepSpeed's module: its
        forward hooks would fire, and the engine may still be under construction)."""
        if self.metric_kind == "adam":
            return super().build_metric()
        if isinstance(self.metric_kind, DataParallelMetric):
            return self.metric_kind.build(self.model, self.loss, self.data, self.names)
        if self._replica is None:
            self._replica = Replica(self.model, self.dtype)
        with torch_linear(), self._replica.loaded(self.model) as replica:
            return self.metric_kind(Problem(replica, self.loss, self.data, params=self.names,
                                            batch_size=self.batch_size))

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
        """Assemble the full fp32 gradient g of the module's parameters, d = :meth:`precondition` (g), add −lr·d
        to the tensors DeepSpeed holds. DeepSpeed's optimizer-state initialization (one step on zero gradients)
        moves nothing and leaves the state alone."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        module_params = self._module_params()
        if any(is_partitioned(p) for p in module_params):
            raise ConfigError("DeepSpeedRiemannianSGD supports ZeRO stages 0-2; ZeRO-3 partitions the parameters "
                              "themselves")
        held = list(self.param_groups[0]["params"])
        lr = self.param_groups[0]["lr"]
        sizes = [p.numel() for p in module_params]
        if self._holds_module_params():  # ZeRO 0, fp32: DeepSpeed steps the module's own parameters
            grads = [p.grad for p in module_params]

            def apply(d: Tensor) -> None:
                for p, piece in zip(module_params, torch.split(d, sizes)):
                    p.add_(piece.view_as(p), alpha=-lr)
        elif hasattr(module_params[0], "_hp_mapping"):
            grads = self._gather_partition_gradients(module_params, held)

            def apply(d: Tensor) -> None:
                self._add_to_partitions(module_params, held, list(torch.split(d * -lr, sizes)))
        elif len(held) == len(module_params) and all(h.shape == p.shape for h, p in zip(held, module_params)):
            grads = [h.grad.float() if h.grad is not None else None for h in held]

            def apply(d: Tensor) -> None:
                for h, u in zip(held, torch.split(d * -lr, sizes)):
                    h.add_(u.view(h.shape).to(h.dtype))
        else:
            raise ConfigError(f"unrecognized DeepSpeed optimizer layout: {len(held)} tensors for "
                              f"{len(module_params)} parameters")
        missing = [n for n, g in zip(self.names, grads) if g is None]
        if missing:
            raise ProblemError(f"no gradient for {missing}: call engine.backward(loss) before engine.step()")
        if not any(bool(g.any()) for g in grads):
            return None  # DeepSpeed initializes optimizer states with one step on zero gradients: skip it
        apply(self.precondition(torch.cat([g.reshape(-1) for g in grads])))
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
        """The optimizer's own state entry, ``state_dict()["state"][STATE_KEY]``: step count, momentum buffer,
        Adam's v and the metric's statistics (plain values and tensors), the same whichever tensors DeepSpeed
        passes to the optimizer (so it survives a change of ZeRO stage)."""
        return self.state_dict()["state"][STATE_KEY]

    def load_curvdist_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`curvdist_state_dict` through :meth:`load_state_dict` (the resumed run takes the same steps
        as an uninterrupted one). Also reads the format of earlier curvdist versions (``steps``, ``buffer``,
        ``adam_v``, ``metric``: the data-parallel metric's reduced statistics)."""
        if "steps" in state and "step" not in state:  # earlier format
            saved = state.get("metric")
            M = self.metric_kind.rebuild(saved) if saved is not None and isinstance(
                self.metric_kind, DataParallelMetric) else None
            state = {"step": int(state["steps"]), "momentum_buffer": state.get("buffer"),
                     "exp_avg_sq": state.get("adam_v"), "metric": metric_state(M)}
        sd = self.state_dict()
        sd["state"][STATE_KEY] = state
        self.load_state_dict(sd)
