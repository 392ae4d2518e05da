"""RiemannianSGD as DeepSpeed's client optimizer (``deepspeed.initialize(optimizer=...)``), ZeRO stages 0-3,
fp32 or bf16.

DeepSpeed hands its client optimizer different tensors depending on the configuration:

* ZeRO 0, fp32: the module's own parameters, with full (averaged) gradients;
* ZeRO 0, bf16: fp32 master copies, one per parameter, with full fp32 gradients;
* ZeRO 1/2 (fp32 or bf16): one flat fp32 partition per rank, with the gradient of that partition only;
* ZeRO 3: one flat fp32 tensor per rank, this rank's partitions of every parameter, with their reduced gradient.

**Block-diagonal metrics** (``kfac``, ``kflr``, ``ekfac``, the diagonals; ZeRO 0-2): the direction of parameter p
needs only its own gradient, d_p = (M_p + δI)⁻¹ g_p, so the gradient is never assembled. Each parameter has owners
(:mod:`.owners`, ``grad_worker_fraction``): its gradient fragments are reduced to them, they compute d_p (Kronecker
blocks formed and eigendecomposed only there), and the primary owner broadcasts d_p to the other ranks, each adding
−lr·d_p to its fragment. Parameters go one at a time: no rank holds more than one parameter's gradient in full.
**Other metrics** (``fisher``, ``ggn``: CG solves that couple every parameter; ``adam``) assemble the full fp32
gradient from the fragments (one ``all_reduce``), and :meth:`curvdist.optim.RiemannianSGD.precondition` turns it
into d. Either way, −lr·d is added to whatever DeepSpeed holds — the parameter, the master copy, or this rank's
fragment of the partition — and DeepSpeed copies masters/partitions back into the module as usual. Every rank
ends with the same direction, so the parameters stay identical across ranks.

**ZeRO-3** (call :meth:`DeepSpeedRiemannianSGD.attach` with the engine): the metric is a
:class:`.partitioned_metric.PartitionedBlockMetric` — statistics from passes through the engine's partitioned
module, each layer's block formed at one owner, applied by gathering one parameter's pieces at a time at its owner
and scattering the result back — so no rank holds more parameters in full than a training step does, and the
momentum buffer lives on this rank's pieces.

The optimizer's state (step count, momentum buffer, Adam's v, the metric's statistics) is RiemannianSGD's one
entry ``state[STATE_KEY]``, not keyed by the tensors DeepSpeed passes, so under ZeRO 0-2 it is the same on every
rank and under every stage (with owners, the metric is kept as the reduced statistics, ``"metric_statistics"``,
from which each rank rebuilds its own blocks); :meth:`~DeepSpeedRiemannianSGD.curvdist_state_dict` is that entry.
Under ZeRO-3 the momentum buffer is this rank's pieces, and the metric is rebuilt after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...errors import ConfigError, MetricError, NonFiniteError
from ...finite import all_finite
from ...geometry.metrics import Metric
from ...optim import RiemannianSGD
from ...optim.riemannian_sgd import NONFINITE_DIRECTION, STATE_KEY, metric_state
from ...problem.problem import Problem
from .config import PreconditionerSpec, preconditioner_spec
from ...geometry.metrics.base import DiagonalMetric
from ...geometry.metrics.kfac import KFACMetric
from ...problem.data import as_batches
from .data_parallel import concatenate, group_rank_and_size, shard
from .engine import check_engine, is_partitioned, torch_linear
from .layout import HeldLayout
from .metric import DIAGONAL, KINDS, KRONECKER, DataParallelMetric
from .owners import Owners, owner_count
from .replica import Replica
from .step_statistics import ReducedStepStatistics

#: metrics stepped by per-parameter owners (block-diagonal: a parameter's direction needs its own gradient only)
BLOCK_KINDS = (*KRONECKER, "ekfac", *DIAGONAL)
#: metrics of the ZeRO-3 preconditioner (block metrics on the partitions)
ZERO3_KINDS = BLOCK_KINDS


class DeepSpeedRiemannianSGD(RiemannianSGD):
    """θ ← θ − lr·(M + δI)⁻¹g inside DeepSpeed, with M's statistics reduced over the data-parallel group.

    Args are those of :class:`~curvdist.optim.RiemannianSGD`; ``data`` is the metric batch, the same on every rank
    (each rank uses its shard). A metric kind becomes a :class:`DataParallelMetric` over ``group`` in ``dtype``
    (``"adam"`` stays RiemannianSGD's own, from the full gradients every rank assembles); a callable
    ``problem -> Metric`` is called on a clean replica of the model. ``group``: the data-parallel group (None: the
    default group, which is DeepSpeed's for pure data parallelism).

    ``grad_worker_fraction`` f ∈ (0, 1]: block-diagonal metrics are applied by k = max(1, round(f·world)) owners per
    parameter (:mod:`.owners`): 1 (default) every rank preconditions everything; 1/world one owner per parameter,
    which alone forms, eigendecomposes and applies its block. ``statistics="step"`` (kinds ``kfac``, ``kflr`` and
    the diagonals, ZeRO 0-2): the statistics come from the training forward passes — run each micro-batch's
    ``engine(x)`` inside ``with optimizer.track(y):`` — reduced over the ranks at every step, with moving averages
    of decay ``decay`` (:mod:`.step_statistics`); ``data`` is then not needed. Under ZeRO-3 call :meth:`attach`
    with the engine after ``deepspeed.initialize``. ``kl_clip``: as in RiemannianSGD.
    """

    def __init__(self, model: nn.Module, loss: str, data: Any = None,
                 metric: str | Callable[[Problem], Metric] = "kfac", lr: float = 0.1, damping: float = 1e-3,
                 refresh: int = 10, momentum: float = 0.0, params: Sequence[str] | None = None,
                 batch_size: int | None = None, metric_options: dict[str, Any] | None = None, group: Any = None,
                 dtype: torch.dtype | str = torch.float32, grad_worker_fraction: float = 1.0,
                 kl_clip: float | None = None, statistics: str = "separate", decay: float = 0.95) -> None:
        self.group = group  # read by _make_step_statistics during RiemannianSGD's construction
        if isinstance(metric, str) and metric != "adam" and statistics == "separate":
            # adam: RiemannianSGD's own v from the (full) gradients; step: ReducedStepStatistics
            metric = DataParallelMetric(metric, damping, group=group, dtype=dtype, batch_size=batch_size,
                                        **(metric_options or {}))
        super().__init__(model, loss, data, metric=metric, lr=lr, damping=damping, refresh=refresh,
                         momentum=momentum, params=params, batch_size=batch_size, kl_clip=kl_clip,
                         statistics=statistics, decay=decay,
                         metric_options=metric_options if statistics == "step" else None)
        owner_count(grad_worker_fraction, 1)  # validated here, applied at the first step
        self.grad_worker_fraction = float(grad_worker_fraction)
        self.engine: Any = None
        self._owners: Owners | None = None
        self._owned_ready = False
        self._parts: Any = None
        self._sizes = [p.numel() for p in self._module_params()]
        #: the most gradient entries held in full at once by a step with owners (one parameter's), and under ZeRO-3
        #: the most parameter entries gathered at once by the metric (its statistics pass and its solves)
        self.peak_gradient_entries = 0
        self.peak_gathered = 0
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self._replica: Replica | None = None

    def _make_step_statistics(self, model: nn.Module, names: list[str], loss: Any, kind: str, decay: float,
                              options: dict[str, Any]) -> ReducedStepStatistics:
        """statistics='step': each rank tracks its micro-batches; a step's sums are reduced over the group."""
        return ReducedStepStatistics(model, names, loss, kind, decay, group=self.group, **options)

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
                   metric_options=dict(m.options), group=group, dtype=spec.dtype,
                   grad_worker_fraction=spec.grad_worker_fraction, kl_clip=spec.kl_clip,
                   statistics=spec.statistics, decay=spec.decay)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """d from the reduced gradient, −lr·d added to the tensors DeepSpeed holds (see the module docstring):
        by per-parameter owners for block-diagonal metrics, from the assembled full gradient for the others, on
        this rank's partitions under ZeRO-3. DeepSpeed's optimizer-state initialization (one step on zero
        gradients) moves nothing and leaves the state alone."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        module_params = self._module_params()
        if any(is_partitioned(p) for p in module_params):
            return self._step_zero3(loss)
        layout = HeldLayout(self, module_params)
        if self.by_owners:
            self._step_by_owners(layout)
            return loss
        grads = [layout.gradient(i) for i in range(len(module_params))]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if not layout.replicated:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=layout.group)
        if not bool(flat.any()):
            return None  # DeepSpeed initializes optimizer states with one step on zero gradients: skip it
        d = self.precondition(flat)
        for i, piece in enumerate(torch.split(d, layout.sizes)):
            layout.add(i, piece, self.param_groups[0]["lr"])
        return loss

    # ------------------------------------------------------------------ owners (ZeRO 0-2)
    @property
    def by_owners(self) -> bool:
        """Whether steps go through per-parameter owners (:mod:`.owners`): block-diagonal metrics."""
        if self.step_statistics is not None:
            return True
        return isinstance(self.metric_kind, DataParallelMetric) and self.metric_kind.kind in BLOCK_KINDS

    def _owner_plan(self) -> Owners:
        if self._owners is None:
            shapes = [p.shape for p in self._module_params()]
            self._owners = Owners(self.names, shapes, self.group, self.grad_worker_fraction)
        return self._owners

    def _build_owned_metric(self, average: dict[str, Any] | None = None) -> Metric | None:
        """This rank's blocks (Kronecker kinds: only the owned ones are formed; others: the whole metric), from
        the step statistics' moving ``average`` (statistics='step') or the metric batch."""
        owners = self._owner_plan()
        stats = self.step_statistics
        if stats is not None:
            assert average is not None
            if stats.statistic != "kronecker":
                return stats.metric(average, self.damping)
            owned = owners.owned(self.names)
            return stats.metric(average, self.damping, names=owned) if owned else None
        kind = self.metric_kind
        assert isinstance(kind, DataParallelMetric)
        owned = owners.owned(self.names) if kind.kind in KRONECKER else None
        with torch.enable_grad():
            return kind.build(self.model, self.loss, self.data, self.names, owned=owned)

    def _block_solve(self, M: Metric, i: int, g: Tensor) -> Tensor:
        """(M_p + δI)⁻¹ g_p for parameter i alone (its block of a block-diagonal metric)."""
        name = self.names[i]
        if isinstance(M, KFACMetric):
            block = next(b for b in M.blocks if b.name == name)
            return block.power(g.to(M.dtype), -1.0, M.damping * block.damping_weight).to(torch.float32)
        if isinstance(M, DiagonalMetric):
            off = sum(self._sizes[:i])
            return (g.to(M.dtype) / M._d[off:off + self._sizes[i]]).to(torch.float32)
        raise MetricError(f"per-parameter owners need a block-diagonal metric, got {type(M).__name__}")

    def _step_by_owners(self, layout: HeldLayout) -> None:
        """One step with owners: g_p reduced to p's owners only, d_p = (M_p + δI)⁻¹ g_p there, broadcast by the
        primary owner to the other ranks, each adding −lr·d_p (with momentum and KL clipping as in
        :meth:`RiemannianSGD.precondition`) to its fragment. No rank holds more than one parameter's gradient in
        full."""
        owners = self._owner_plan()
        state = self.state[STATE_KEY]
        step = int(state["step"])
        nonzero = torch.tensor([float(layout.any_gradient())])
        if not layout.replicated:
            dist.all_reduce(nonzero, op=dist.ReduceOp.MAX, group=layout.group)
        if not nonzero.item():
            return  # DeepSpeed's optimizer-state initialization
        M, refreshed = self.metric, False
        stats = self.step_statistics
        average = stats.averaged() if stats is not None else None  # the step's sums reduced over the ranks
        if not self._owned_ready or step % self.refresh == 0:
            M, refreshed = self._build_owned_metric(average), True
        directions: dict[int, Tensor] = {}
        sums = torch.zeros(2, dtype=torch.float64)  # Σ gᵀd over the primaries' parameters, non-finite count
        for i, name in enumerate(self.names):
            g = layout.gradient(i).reshape(-1).clone()
            self.peak_gradient_entries = max(self.peak_gradient_entries, g.numel())
            owners.to_owners(name, g, layout.replicated)
            if owners.owns(name):
                assert M is not None
                d = self._block_solve(M, i, g)
                directions[i] = d
                if owners.is_primary(name):
                    sums[0] += float(torch.dot(g.double(), d.double()))
                    sums[1] += float(not all_finite(d))
        if owners.world > 1:
            dist.all_reduce(sums, group=layout.group)
        if sums[1] > 0 or not bool(torch.isfinite(sums[0])):
            raise NonFiniteError(NONFINITE_DIRECTION)
        lr, mu = self.param_groups[0]["lr"], self.param_groups[0]["momentum"]
        nu = self.kl_scale(float(sums[0]))
        old = state["momentum_buffer"]
        buffer = torch.empty(self.dim, dtype=torch.float32, device=layout.device) if mu else None
        offset = 0
        for i, name in enumerate(self.names):
            n = self._sizes[i]
            d = directions.pop(i, None)
            if d is None:
                d = torch.empty(n, dtype=torch.float32, device=layout.device)
            owners.from_owners(name, d)
            if nu != 1.0:
                d = d * nu
            if mu:
                assert buffer is not None
                d = d if old is None else mu * old[offset:offset + n] + d
                buffer[offset:offset + n] = d
            layout.add(i, d, lr)
            offset += n
        self.metric, self._owned_ready = M, True
        if stats is not None:
            assert average is not None
            stats.commit(average)
            state["step_statistics"] = stats.state()  # reduced: the same on every rank
            state["metric"] = None  # rebuilt from the averages on load
        elif refreshed:
            state["metric"] = None  # per-rank blocks: the checkpoint keeps the reduced statistics instead
            state["metric_statistics"] = self.metric_kind.state_dict()  # type: ignore[union-attr]
        state.update(step=step + 1, momentum_buffer=buffer if mu else None)

    # ------------------------------------------------------------------ ZeRO-3
    def attach(self, engine: Any) -> DeepSpeedRiemannianSGD:
        """Give the optimizer its engine (``deepspeed.initialize``'s first result); needed under ZeRO-3, where the
        metric's statistics come from passes through the engine's partitioned module. Returns ``self``."""
        check_engine(engine)
        self.engine = engine
        return self

    def _step_zero3(self, loss: Tensor | None) -> Tensor | None:
        """ZeRO-3: DeepSpeed hands one flat fp32 tensor, the concatenation of this rank's partitions of the
        parameters (``partition_numel`` entries each, the first ``owned`` of them real), with its reduced gradient.
        d = M⁻¹g on those pieces with M a :class:`.partitioned_metric.PartitionedBlockMetric` (statistics from the
        engine's own passes, one owner per layer, at most one parameter gathered at a time), momentum and KL
        clipping on the pieces; −lr·d added to the flat tensor, which DeepSpeed copies into the partitions."""
        held = list(self.param_groups[0]["params"])
        if self.engine is None:
            if len(held) == 1 and held[0].grad is not None and not bool(held[0].grad.any()):
                return None  # the optimizer-state initialization inside deepspeed.initialize
            raise ConfigError("under ZeRO-3 call optimizer.attach(engine) after deepspeed.initialize: the metric's "
                              "statistics come from passes through the engine's partitioned module")
        kind = self.metric_kind
        if self.step_statistics is not None:
            raise ConfigError("under ZeRO-3 the preconditioner takes its statistics from separate passes through the "
                              "engine (statistics='separate'); statistics='step' needs the layers' full weights")
        if not isinstance(kind, DataParallelMetric) or kind.kind not in ZERO3_KINDS:
            shown = kind.kind if isinstance(kind, DataParallelMetric) else kind
            raise ConfigError(f"under ZeRO-3 the preconditioner's metric must be one of {ZERO3_KINDS} (block metrics "
                              f"on the partitions), not {shown!r}")
        parts, offsets, flat = self._zero3_layout(held)
        g = torch.cat([flat.grad.narrow(0, o, k) for o, k in zip(offsets, parts.owned)]).to(parts.dtype)
        nonzero = torch.tensor([float(bool(g.any()))])
        dist.all_reduce(nonzero, op=dist.ReduceOp.MAX, group=parts.group)
        if not nonzero.item():
            return None
        state = self.state[STATE_KEY]
        step = int(state["step"])
        if self.metric is None or step % self.refresh == 0:
            self.metric = self._zero3_metric()
        d = self.metric.solve(g)
        self.peak_gathered = max(self.peak_gathered, int(self.metric.parts.meter.peak))
        sums = torch.tensor([float(torch.dot(g.double(), d.double())), float(not all_finite(d))],
                            dtype=torch.float64)
        dist.all_reduce(sums, group=parts.group)
        if sums[1] > 0 or not bool(torch.isfinite(sums[0])):
            raise NonFiniteError(NONFINITE_DIRECTION)
        lr, mu = self.param_groups[0]["lr"], self.param_groups[0]["momentum"]
        nu = self.kl_scale(float(sums[0]))
        if nu != 1.0:
            d = d * nu
        buffer = state["momentum_buffer"]
        if mu:
            buffer = d if buffer is None else mu * buffer + d
            d = buffer
        for o, piece in zip(offsets, parts.split(d)):
            flat.data.narrow(0, o, piece.numel()).add_(piece.to(flat.dtype), alpha=-lr)
        state.update(step=step + 1, momentum_buffer=buffer)
        return loss

    def _zero3_layout(self, held: list[Tensor]) -> tuple[Any, list[int], Tensor]:
        """(this rank's partitions of the selected parameters, their offsets in DeepSpeed's flat fp32 tensor, that
        tensor)."""
        from .partitions import ZeroPartitions

        zo = self.engine.optimizer
        flats = getattr(zo, "fp32_partitioned_groups_flat", None)
        if len(held) != 1 or flats is None or len(flats) != 1 or flats[0] is not held[0]:
            raise ConfigError("under ZeRO-3 the preconditioner needs all parameters in one ZeRO sub-group (set "
                              "zero_optimization.sub_group_size above the model's size) and no optimizer offload")
        if self._parts is None:
            self._parts = ZeroPartitions(self.engine, self.names, self.group)
        parts = self._parts
        position, offset = {}, 0
        for p in zo.fp16_groups[0]:
            position[id(p)] = offset
            offset += int(p.partition_numel())
        missing = [n for n, p in zip(parts.names, parts.params) if id(p) not in position]
        if missing:
            raise ConfigError(f"the parameters {missing[:5]} are not stepped by this optimizer")
        return parts, [position[id(p)] for p in parts.params], held[0]

    def _zero3_metric(self) -> Metric:
        """M on the partitions at the current parameters, from this rank's shard of the metric batch."""
        from .finite_difference import PartitionedProblem

        kind = self.metric_kind
        assert isinstance(kind, DataParallelMetric)
        X, y = concatenate(list(as_batches(self.data)))
        rank, size = group_rank_and_size(self.group)
        Xr, yr = shard(X, y, rank, size)
        problem = PartitionedProblem(self.engine, self.loss, Xr, yr, self.group, self.names,
                                     batch_size=self.batch_size)
        with torch.enable_grad():
            return problem.curvature_metric(kind.kind, kind.damping, **kind.options)

    def _buffer_dim(self) -> int:
        return self._parts.local_dim if self._parts is not None else self.dim

    # ------------------------------------------------------------------ checkpoints
    def curvdist_state_dict(self) -> dict[str, Any]:
        """The optimizer's own state entry, ``state_dict()["state"][STATE_KEY]``: step count, momentum buffer,
        Adam's v and the metric's statistics (plain values and tensors), the same whichever tensors DeepSpeed
        passes to the optimizer (so it survives a change of ZeRO stage).

        Raises:
            ConfigError: under ZeRO-3 with momentum: the buffer is this rank's pieces, different on every rank, and
                DeepSpeed's ``client_state`` keeps one rank's copy (a resumed run would go on from wrong momenta).
        """
        entry = self.state_dict()["state"][STATE_KEY]
        if self._parts is not None and entry.get("momentum_buffer") is not None:
            raise ConfigError("under ZeRO-3 the preconditioner's momentum buffer lives on each rank's partitions, "
                              "and DeepSpeed's client_state keeps one rank's copy: checkpointing it is not "
                              "supported (use momentum=0 under ZeRO-3, or ZeRO 0-2, to checkpoint the preconditioner)")
        return entry

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`RiemannianSGD.load_state_dict`; with owners, each rank's blocks rebuilt from the saved reduced
        statistics (``"metric_statistics"``)."""
        entry = state_dict.get("state", {}).get(STATE_KEY)
        stats = entry.get("metric_statistics") if isinstance(entry, dict) else None
        if self.step_statistics is not None:
            with warnings.catch_warnings():  # the metric is rebuilt from the moving averages below
                warnings.simplefilter("ignore")
                super().load_state_dict(state_dict)
            average = self.step_statistics.average
            self.metric = self._build_owned_metric(average) if average is not None else None
            self._owned_ready = average is not None
            return
        if stats is None or not self.by_owners:
            super().load_state_dict(state_dict)
            return
        assert isinstance(self.metric_kind, DataParallelMetric)
        owned = self._owner_plan().owned(self.names) if self.metric_kind.kind in KRONECKER else None
        M = self.metric_kind.rebuild(stats, owned=owned)
        sd = dict(state_dict, state={**state_dict["state"], STATE_KEY: {**entry, "metric": None}})
        with warnings.catch_warnings():  # the metric is restored below, not rebuilt at the next step
            warnings.simplefilter("ignore")
            super().load_state_dict(sd)
        self.metric, self._owned_ready = M, True
