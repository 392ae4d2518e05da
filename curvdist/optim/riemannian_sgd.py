"""Preconditioned ("Riemannian") gradient descent: θ ← θ − α (M + δI)⁻¹ g, with M from the metric catalogue.

The step −α M⁻¹g is a tangent vector: for a metric that transforms as a tensor (Fisher/GGN, a pull-back; diagonal
and Kronecker metrics under diagonal/per-layer Jacobians) the update is the same in every parametrization to first
order in α, and the continuous flow exactly (Amari 1998, natural gradient; Martens 2020); for a linear
reparametrization and a metric that is a tensor under it, exactly. M is rebuilt every ``refresh`` steps from the
model's current parameters on the given data, as curvdist computes it anywhere else — locally, or on Ray workers
(``problem=`` a :class:`~curvdist.problem.sharded.ShardedProblem`, e.g. ``cd.ray_backend().data_parallel(spec)``:
shard statistics reduced by its reducer, Kronecker factors eigendecomposed on the workers).

``metric="adam"`` is the metric Adam preconditions with, M = diag(√v̂) (Kingma & Ba 2015), from the optimizer's own
moving average v of squared gradients (β₂), updated at every step.

State
-----
Everything a resumed run needs lives in ``self.state[STATE_KEY]``, one entry for the flattened parameter group
(flat vectors in the order of the selected parameters), independent of which tensors ``param_groups`` holds:

* ``"step"``: the number of steps taken t (int);
* ``"momentum_buffer"``: b_t = μ b_{t−1} + d_t (flat tensor, None before the first step with momentum);
* ``"exp_avg_sq"``: v_t = β₂ v_{t−1} + (1 − β₂) g_t² for ``metric="adam"`` (flat tensor, else None);
* ``"metric"``: what determines the current M (``DiagonalMetric.state_dict()``/``KFACMetric.state_dict()``: the
  diagonal, or the factors' eigendecompositions), None for matrix-free metrics and ``adam`` (rebuilt).

``state_dict()``/``load_state_dict()`` are torch's (the entry is stored under its string key, values of types
``torch.load(weights_only=True)`` accepts), so a resumed run takes exactly the steps of an uninterrupted one; a
matrix-free metric is rebuilt at the first resumed step (with a warning when that is not a refresh step).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MetricError, NonFiniteError, ProblemError, ShapeError
from ..finite import all_finite
from ..geometry.metrics import Metric, metric
from ..geometry.metrics.base import DiagonalMetric
from ..geometry.metrics.kfac import KFACMetric
from .step_statistics import StepStatistics
from ..problem.base import BaseProblem
from ..problem.problem import Problem

#: the error of a step whose direction is NaN or inf (raised before anything changes)
NONFINITE_DIRECTION = ("the preconditioned direction (M + δI)⁻¹g is NaN or inf; the parameters were not changed "
                       "(raise damping)")
#: the key of the optimizer's state entry in ``self.state`` (and in ``state_dict()["state"]``)
STATE_KEY = "riemannian_sgd"
#: metric classes whose state is saved (exact types: a subclass may hold more than its parent's state)
_STATEFUL: dict[str, type[DiagonalMetric] | type[KFACMetric]] = {"diagonal": DiagonalMetric, "kronecker": KFACMetric}


def metric_state(M: Metric | None) -> dict[str, Any] | None:
    """What determines ``M`` as plain values and tensors (its ``state_dict()``), or None for a metric that is
    rebuilt rather than restored (matrix-free metrics, subclasses, None)."""
    if M is None or type(M) not in _STATEFUL.values():
        return None
    return M.state_dict()  # type: ignore[attr-defined]


def metric_from_state(state: Mapping[str, Any]) -> Metric:
    """The metric of :func:`metric_state`'s ``state``, identical to the one it was taken from."""
    cls = _STATEFUL.get(str(state.get("type")))
    if cls is None:
        raise MetricError(f"unknown metric state type {state.get('type')!r}; expected one of {list(_STATEFUL)}")
    return cls.from_state_dict(state)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class RiemannianSGD(torch.optim.Optimizer):
    """θ ← θ − lr · d,  d = (M + δI)⁻¹ g  (with optional momentum on d).

    Args:
        model: the network whose parameters are optimized (``params`` selects a subset by name).
        loss: ``"cross_entropy"`` or ``"mse"`` (the metric's loss).
        data: the data the metric is computed on (any form :class:`~curvdist.Problem` accepts).
        metric: a kind (``euclidean``, ``fisher``, ``ggn``, ``diag_ggn``, ``diag_fisher_mc``,
            ``empirical_fisher_diag``, ``kfac``, ``kflr``, ``pullback`` for a model made by ``cd.reparametrize``,
            ``adam``...) or a callable ``problem -> Metric``.
        problem: instead of ``loss``/``data``, a problem over the same parameters (e.g. a ``ShardedProblem`` whose
            data live on Ray workers); its parameters are moved to the model's before every refresh.
        beta2: the moving-average factor of ``metric="adam"``.
        lr, damping, momentum: step size α, damping δ, heavy-ball momentum.
        refresh: rebuild the metric every ``refresh`` steps.
        statistics: ``"separate"`` (default): M from separate passes over ``data`` (or ``problem``) at the current
            parameters. ``"step"``: M from the training step's own forward passes — run each micro-batch's forward
            inside ``with optimizer.track(y):`` — with moving averages of decay ``decay`` (kinds ``kfac``,
            ``kflr``, ``diag_ggn``, ``diag_fisher_mc``, ``empirical_fisher_diag``; ``data`` is not needed;
            :mod:`curvdist.optim.step_statistics`). The preconditioner always sees the accumulated gradient of all
            tracked micro-batches.
        decay: β of the step statistics' moving averages (T ← βT + (1 − β)T_step).
        statistics_every: ``statistics="step"``: record statistics on every this-many-th step only (``track()`` is a
            no-op on the others, and the averages carry over), as kfac-pytorch's ``factor_update_steps``.
        basis_update: ``statistics="step"``, Kronecker kinds: at a refresh, ``"eigh"`` eigendecomposes every factor
            (float64); ``"subspace"`` updates the previous eigenbases by one step of subspace iteration in the
            factors' precision (:func:`~curvdist.optim.step_statistics.subspace_eigh`, SOAP's update; the first
            refresh eigendecomposes).
        kl_clip: step-size control (Ba, Grosse & Martens 2017; kfac-pytorch's ``kl_clip``): the direction d = M⁻¹g
            is scaled by ν = min(1, √(κ / (lr² |gᵀd|))), so that the step's squared length in the metric,
            lr² dᵀMd ≈ lr² gᵀd (the KL divergence it causes, to second order, for a Fisher metric), stays ≤ κ —
            a guard against the large steps of a small damping early in training. None (default): no clipping.
    A metric refresh or a direction that is not finite raises and leaves the parameters and the optimizer's state
    unchanged. The state (step count, momentum buffer, Adam's v, the metric's statistics) is ``self.state[STATE_KEY]``
    (see the module docstring); :meth:`precondition` is the step without the parameter update.
    """

    def __init__(self, model: nn.Module, loss: str | None = None, data: Any = None,
                 metric: str | Callable[[Problem], Metric] = "fisher", lr: float = 0.1, damping: float = 1e-3,
                 refresh: int = 10, momentum: float = 0.0, params: Sequence[str] | None = None,
                 batch_size: int | None = None, metric_options: dict[str, Any] | None = None,
                 problem: Problem | None = None, beta2: float = 0.999, statistics: str = "separate",
                 decay: float = 0.95, kl_clip: float | None = None, statistics_every: int = 1,
                 basis_update: str = "eigh") -> None:
        if not lr > 0:
            raise ProblemError(f"lr must be positive, got {lr!r}")
        if not isinstance(refresh, int) or refresh < 1:
            raise ProblemError(f"refresh must be a positive integer, got {refresh!r}")
        if not 0 <= momentum < 1:
            raise ProblemError(f"momentum must lie in [0, 1), got {momentum!r}")
        if not 0 <= beta2 < 1:
            raise ProblemError(f"beta2 must lie in [0, 1), got {beta2!r}")
        if kl_clip is not None and not kl_clip > 0:
            raise ProblemError(f"kl_clip must be positive (or None), got {kl_clip!r}")
        if not isinstance(statistics_every, int) or statistics_every < 1:
            raise ProblemError(f"statistics_every must be a positive integer, got {statistics_every!r}")
        if basis_update not in ("eigh", "subspace"):
            raise ProblemError(f"basis_update must be 'eigh' or 'subspace', got {basis_update!r}")
        if (statistics_every != 1 or basis_update != "eigh") and statistics != "step":
            raise ProblemError("statistics_every and basis_update belong to statistics='step'")
        self.statistics_every, self.basis_update = statistics_every, basis_update
        self.kl_clip = kl_clip
        if problem is not None and not isinstance(problem, BaseProblem):
            raise ProblemError(f"RiemannianSGD needs a problem whose parameters this process holds (local or "
                               f"data-parallel), not a {type(problem).__name__} (pipeline mode keeps them on its "
                               f"stages: train there with curvdist.distributed.pipeline_train.PipelineTrainer, or "
                               f"curvdist train with a pipeline backend)")
        named = dict(model.named_parameters())
        if problem is not None:
            if params is not None and list(params) != list(problem.param_names):
                raise ProblemError(f"params {list(params)} differ from the problem's {list(problem.param_names)}")
            params = list(problem.param_names)
        elif statistics == "step":
            if loss is None:
                raise ProblemError("RiemannianSGD with statistics='step' needs loss= (the training loss)")
        elif statistics != "separate":
            raise ProblemError(f"statistics must be 'separate' or 'step', got {statistics!r}")
        elif loss is None or data is None:
            raise ProblemError("RiemannianSGD needs loss= and data= (or problem=) to build its metric")
        names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ProblemError(f"unknown parameter names {unknown}")
        super().__init__([named[n] for n in names], {"lr": lr, "momentum": momentum})
        self.model, self.loss, self.data, self.names = model, loss, data, names
        self.metric_kind, self.damping, self.refresh = metric, damping, refresh
        self.batch_size, self.metric_options = batch_size, dict(metric_options or {})
        self.problem, self.beta2 = problem, beta2
        #: the length of the flat vectors: the number of selected parameters' entries
        self.dim = sum(named[n].numel() for n in names)
        #: the current metric (rebuilt from ``self.state[STATE_KEY]["metric"]`` by :meth:`load_state_dict`)
        self.metric: Metric | None = None
        self.state[STATE_KEY] = {"step": 0, "momentum_buffer": None, "exp_avg_sq": None, "metric": None}
        #: statistics='step': the moving averages of the tracked training forward passes
        self.step_statistics: StepStatistics | None = None
        if statistics == "step":
            if problem is not None:
                raise ProblemError("statistics='step' collects the metric from the training forward passes; "
                                   "problem= belongs to statistics='separate'")
            options = dict(self.metric_options)
            allowed = {"mc_samples", "seed", "kfac_approx", "reduction"}
            if set(options) - allowed:
                raise ProblemError(f"with statistics='step' the metric options are {sorted(allowed)}, not "
                                   f"{sorted(set(options) - allowed)}")
            if not isinstance(metric, str):
                raise ProblemError("statistics='step' needs a metric kind (a string), not a callable")
            self.step_statistics = self._make_step_statistics(model, names, loss, metric, decay, options)
            self.state[STATE_KEY]["step_statistics"] = self.step_statistics.state()

    def _make_step_statistics(self, model: nn.Module, names: list[str], loss: Any, kind: str, decay: float,
                              options: dict[str, Any]) -> StepStatistics:
        """The moving averages of statistics='step' (data-parallel forms reduce each step's sums over ranks)."""
        return StepStatistics(model, names, loss, kind, decay, **options)

    def track(self, y: Tensor, attention_mask: Tensor | None = None) -> Any:
        """``statistics='step'``: a context in which one forward pass of the model on a micro-batch with labels
        ``y`` runs; its metric statistics are recorded from that pass (:mod:`.step_statistics`). Every micro-batch
        of a step (gradient accumulation) is tracked; :meth:`step` folds them into the moving averages."""
        if self.step_statistics is None:
            raise ProblemError("track() belongs to statistics='step'; this optimizer builds its metric from "
                               "separate passes over its data")
        if self.steps % self.statistics_every:
            return contextlib.nullcontext()
        return self.step_statistics.track(y, attention_mask)

    @property
    def steps(self) -> int:
        """The number of steps taken (``self.state[STATE_KEY]["step"]``)."""
        return int(self.state[STATE_KEY]["step"])

    # ------------------------------------------------------------------ the metric
    def _current_problem(self) -> Problem:
        if self.problem is None:
            return Problem(self.model, self.loss, self.data, params=self.names, batch_size=self.batch_size)
        self.problem.set_params(tuple(p.detach() for p in self.param_groups[0]["params"]))
        return self.problem

    def _expected_kind(self) -> str | None:
        kind = self.metric_kind if isinstance(self.metric_kind, str) else getattr(self.metric_kind, "kind", None)
        return kind if isinstance(kind, str) else None

    def build_metric(self) -> Metric:
        """M at the current parameters (the model's train/eval mode is respected as it is), without installing it;
        for ``metric="adam"``, diag(√v̂) + δ from the current v (bias correction 1 − β₂^(t+1))."""
        if self.metric_kind == "adam":
            state = self.state[STATE_KEY]
            return self._adam_metric(state["exp_avg_sq"], state["step"])
        if self.step_statistics is not None:
            if self.step_statistics.average is None:
                raise ProblemError("no step statistics yet: take a step with its forward pass inside track()")
            return self.step_statistics.metric(self.step_statistics.average, self.damping)
        problem = self._current_problem()
        if callable(self.metric_kind):
            return self.metric_kind(problem)
        return metric(problem, self.metric_kind, self.damping, **self.metric_options)

    def _checked(self, M: Any) -> Metric:
        if not isinstance(M, Metric) or M.dim != self.dim:
            raise MetricError(f"the metric must be a curvdist Metric of dimension {self.dim}")
        return M

    def refresh_metric(self) -> Metric:
        """Rebuild M at the current parameters and install it (``self.metric`` and the state's ``"metric"``)."""
        with torch.enable_grad():  # metrics differentiate the model (torch.func, BackPACK)
            M = self._checked(self.build_metric())
        self.metric = M
        self.state[STATE_KEY]["metric"] = None if self.metric_kind == "adam" else metric_state(M)
        return M

    def _adam_metric(self, v: Tensor | None, step: int) -> Metric:
        """diag(√v̂) + δ, v̂ = v / (1 − β₂^(step+1))."""
        if v is None:
            raise ProblemError("the adam metric needs a gradient first")
        v_hat = v / (1 - self.beta2 ** (step + 1))
        return DiagonalMetric(v_hat.sqrt(), self.damping, kind="adam")

    # ------------------------------------------------------------------ the step
    def kl_scale(self, g_dot_d: float) -> float:
        """ν = min(1, √(κ / (lr² |gᵀd|))) for ``kl_clip`` κ and gᵀd = ``g_dot_d`` (1 without clipping)."""
        vg = self.param_groups[0]["lr"] ** 2 * abs(g_dot_d)
        return (self.kl_clip / vg) ** 0.5 if self.kl_clip is not None and vg > self.kl_clip else 1.0

    @torch.no_grad()
    def precondition(self, grad: Tensor) -> Tensor:
        """The direction the step moves along, d with θ ← θ − lr·d, for the flat gradient ``grad`` (length
        :attr:`dim`, the selected parameters in order), advancing the state by one step t → t + 1:

        * ``metric="adam"``: v_t = β₂ v_{t−1} + (1 − β₂) g² (v_0 = 0), M_t = diag(√(v_t / (1 − β₂^t))) + δ;
        * otherwise M is rebuilt at the current parameters when t mod ``refresh`` = 0 (or none is held);
        * d_t = (M + δI)⁻¹ g, scaled by ν = min(1, √(κ / (lr² |gᵀd_t|))) with ``kl_clip`` κ, and with momentum
          μ > 0, b_t = μ b_{t−1} + d_t (b_0 = d_0) is returned.

        Nothing changes (state, metric) when it raises: :class:`~curvdist.errors.NonFiniteError` for a direction
        that is NaN or inf, the metric's errors for a refresh that fails. The returned tensor may be the momentum
        buffer itself: do not modify it in place.
        """
        if grad.ndim != 1 or grad.numel() != self.dim:
            raise ShapeError(f"precondition() takes the flat gradient of length {self.dim}, got shape "
                             f"{tuple(grad.shape)}")
        g = grad.detach()
        state = self.state[STATE_KEY]
        step, v, M = int(state["step"]), state["exp_avg_sq"], self.metric
        refreshed = False
        stats = self.step_statistics
        average = stats.averaged(carry=self.statistics_every > 1) if stats is not None else None
        if stats is not None:
            if M is None or step % self.refresh == 0:
                previous = M if self.basis_update == "subspace" else None
                M = self._checked(stats.metric(average, self.damping, previous=previous))  # type: ignore[arg-type]
                refreshed = True
        elif self.metric_kind == "adam":  # v ← β₂ v + (1 − β₂) g², from v = 0
            v = self.beta2 * (torch.zeros_like(g) if v is None else v) + (1 - self.beta2) * g * g
            M = self._adam_metric(v, step)
        elif M is None or step % self.refresh == 0:
            with torch.enable_grad():  # metrics differentiate the model (torch.func, BackPACK)
                M = self._checked(self.build_metric())
            refreshed = True
        with torch.enable_grad():  # matrix-free solves too
            d = M.solve(g).detach()
        if not all_finite(d):
            raise NonFiniteError(NONFINITE_DIRECTION)
        if self.kl_clip is not None:
            nu = self.kl_scale(float(torch.dot(g.to(d.dtype), d)))
            if nu != 1.0:
                d = d * nu
        mu = self.param_groups[0]["momentum"]
        buffer = state["momentum_buffer"]
        if mu:
            buffer = d if buffer is None else mu * buffer + d
            d = buffer
        self.metric = M
        if refreshed:
            state["metric"] = metric_state(M)
        if stats is not None:
            stats.commit(average)  # type: ignore[arg-type]
            state["step_statistics"] = stats.state()
        state.update(step=step + 1, momentum_buffer=buffer, exp_avg_sq=v)
        return d

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """θ ← θ − lr·d with d = :meth:`precondition` (g), g the parameters' gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params = group["params"]
        missing = [n for n, p in zip(self.names, params) if p.grad is None]
        if missing:
            raise ProblemError(f"no gradient for {missing}: call loss.backward() before step()")
        d = self.precondition(torch.cat([p.grad.reshape(-1) for p in params]))
        i = 0
        for p in params:
            k = p.numel()
            p.add_(d[i:i + k].view_as(p), alpha=-group["lr"])
            i += k
        return loss

    # ------------------------------------------------------------------ state
    def _buffer_dim(self) -> int:
        """The length of the state's flat buffers (momentum, Adam's v): :attr:`dim` here."""
        return self.dim

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; ``["state"][STATE_KEY]`` is a snapshot of the entry (its values are replaced at every
        step, never modified in place)."""
        sd = super().state_dict()
        sd["state"][STATE_KEY] = dict(self.state[STATE_KEY])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then the metric rebuilt from the entry's statistics (tensors moved to the
        parameters' device). It is checked first; nothing changes when it raises:

        Raises:
            ProblemError: the state dict has no ``STATE_KEY`` entry, or it lacks a field or is malformed.
            ShapeError: a buffer does not have the length :attr:`dim`.
            MetricError: the saved metric is of another kind than this optimizer's, or cannot be rebuilt.
        """
        entry = state_dict.get("state", {}).get(STATE_KEY)
        if not isinstance(entry, Mapping):
            raise ProblemError(f"the state dict has no '{STATE_KEY}' entry (not saved by RiemannianSGD.state_dict())")
        missing = [k for k in ("step", "momentum_buffer", "exp_avg_sq", "metric") if k not in entry]
        if missing:
            raise ProblemError(f"the state dict's '{STATE_KEY}' entry lacks {missing}")
        device = self.param_groups[0]["params"][0].device
        entry = _to_device(dict(entry), device)
        step = int(entry["step"])
        for key in ("momentum_buffer", "exp_avg_sq"):
            t = entry[key]
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (self._buffer_dim(),)):
                raise ShapeError(f"the saved {key} must be a flat tensor of length {self._buffer_dim()}, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if self.metric_kind == "adam" and step > 0 and entry["exp_avg_sq"] is None:
            raise MetricError("the state holds no second moments (exp_avg_sq) for the adam metric")
        M = None
        if entry["metric"] is not None and not isinstance(entry["metric"], Mapping):
            raise ProblemError(f"the saved metric state must be a dict, got {type(entry['metric']).__name__}")
        if entry["metric"] is not None:
            expected, saved = self._expected_kind(), entry["metric"].get("kind")
            if expected is not None and saved != expected:
                raise MetricError(f"the state holds a {saved} metric, this optimizer uses {expected}")
            M = self._checked(metric_from_state(entry["metric"]))
        if self.step_statistics is not None:
            if not isinstance(entry.get("step_statistics"), Mapping):
                raise ProblemError("the state holds no step statistics (saved without statistics='step')")
            self.step_statistics.load_state(dict(entry["step_statistics"]))
        super().load_state_dict(state_dict)
        entry["step"] = step
        self.state[STATE_KEY] = entry
        self.metric = M
        if M is None and self.metric_kind != "adam" and step % self.refresh:
            warnings.warn(f"the state holds no statistics of the {self._expected_kind() or 'given'} metric; it is "
                          f"rebuilt at the next step ({step}), not at the next refresh, so the resumed run departs "
                          f"from an uninterrupted one", stacklevel=2)
