"""What every problem has, wherever its samples live: the model, the loss, the reduction and the selected
parameters θ — with their flat vector layout — evaluated functionally with ``torch.func``.

:class:`~curvdist.problem.problem.Problem` (samples in this process) and
:class:`~curvdist.problem.sharded.ShardedProblem` (samples split over shards, statistics summed by a
:class:`~curvdist.problem.reducers.ShardReducer`) both derive from :class:`BaseProblem`; operators, metrics, queries
and optimizers take either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ProblemError, ShapeError
from ..resources import memory_record, reset_peak
from .autodiff import differentiable_kernels
from .data import Inputs
from .losses import Loss, make_loss
from .outputs import call

Params = tuple[Tensor, ...]


def _refuse_stateful_modules(model: nn.Module) -> None:
    """BatchNorm in train mode couples the samples of a batch and updates running statistics on every pass."""
    from ..errors import NonDeterministicError

    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise NonDeterministicError(
                f"BatchNorm module '{name or type(m).__name__}' in train mode: the loss would depend on the batch "
                "composition and every pass would update its running statistics; call model.eval()"
            )


class BaseProblem(ABC):
    """Model, loss, reduction and the selected parameters θ of the risk L(θ) = s · Σ_n ℓ(f(x_n; θ), y_n).

    Subclasses say where the samples live: they set ``num_samples``/``num_batches`` and implement :meth:`value`
    and :meth:`gradient`.
    """

    num_samples: int
    num_batches: int

    def __init__(self, model: nn.Module, loss: str | Loss, params: Sequence[str] | None = None,
                 reduction: str = "mean", accumulate_dtype: torch.dtype | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ProblemError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if reduction not in ("mean", "sum"):
            raise ProblemError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        _refuse_stateful_modules(model)
        self.model = model
        self.loss = make_loss(loss)
        self.reduction = reduction
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            if isinstance(params, str):
                params = [params]
            unknown = [n for n in params if n not in named]
            if unknown:
                raise ProblemError(f"unknown parameter names {unknown}; the model has {list(named)}")
            if len(set(params)) != len(params):
                raise ProblemError(f"parameter names are repeated in {list(params)}")
            names = list(params)
        if not names:
            raise ProblemError("no parameters selected: the model has no parameters that require gradients")
        self.param_names: tuple[str, ...] = tuple(names)
        self.params: Params = tuple(named[n].detach() for n in names)
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ProblemError(f"selected parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.dtype: torch.dtype = self.params[0].dtype
        self.device: torch.device = self.params[0].device
        if accumulate_dtype is None:
            accumulate_dtype = torch.float32 if self.dtype in (torch.bfloat16, torch.float16) else self.dtype
        if not isinstance(accumulate_dtype, torch.dtype) or not accumulate_dtype.is_floating_point:
            raise ProblemError(f"accumulate_dtype must be a floating torch.dtype, got {accumulate_dtype!r}")
        #: the dtype products, gradients and the vectors of solvers are summed/kept in (float32 at least for
        #: bfloat16/float16 models: reduced-precision sums over many samples lose the small terms)
        self.accumulate_dtype: torch.dtype = accumulate_dtype
        self._frozen: dict[str, Tensor] = {n: p.detach() for n, p in named.items() if n not in self.param_names}
        self._frozen.update({n: b for n, b in model.named_buffers()})
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in self.params)
        self.dim: int = sum(p.numel() for p in self.params)

    # ---------------------------------------------------------------- where the samples live
    @abstractmethod
    def value(self, params: Params | None = None) -> float:
        """L(θ) over the whole data set."""

    @abstractmethod
    def gradient(self, params: Params | None = None) -> Params:
        """∇L(θ) as parameter-shaped tensors."""

    @property
    def backend(self) -> str:
        """Where the products run (recorded in every result): ``local`` here."""
        return "local"

    def backend_stats(self) -> dict[str, Any] | None:
        """Statistics of the backend for the report (e.g. retried remote calls), or None."""
        return None

    def memory_reset(self) -> None:
        """Start a peak-memory window in every process that holds a part of the problem."""
        self._memory_windowed = reset_peak(self.device)

    def memory_records(self) -> list[dict[str, Any]]:
        """Per process: its role, the parameters it holds and its peak resident memory since
        :meth:`memory_reset` (:func:`curvdist.resources.memory_record`)."""
        return [memory_record(self.backend, sum(p.numel() for p in self.params),
                              getattr(self, "_memory_windowed", False), self.device)]

    @abstractmethod
    def restricted(self, params: Sequence[str]) -> BaseProblem:
        """The same problem (samples, reduction, backend) over a subset of the parameters, e.g. a layer block."""

    @property
    def scale(self) -> float:
        """s in L = s · Σ_n ℓ_n: 1/N for reduction="mean", 1 for "sum"."""
        return 1.0 / self.num_samples if self.reduction == "mean" else 1.0

    # ---------------------------------------------------------------- functional model
    def forward(self, params: Params, X: Inputs) -> Tensor:
        """f(X; θ) with θ = params (in the order of ``param_names``); the rest of the model held fixed. ``X`` is a
        tensor (``model(X)``) or a mapping of tensors (``model(**X)``); f is the output tensor or its ``logits``
        (:func:`~curvdist.problem.outputs.network_output`). Tied parameters (one tensor used by two modules, as
        an embedding and a language-model head) are one parameter here and move together."""
        state = dict(self._frozen)
        state.update(zip(self.param_names, params))

        def model(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, state, args, kwargs)

        with differentiable_kernels():
            return call(model, X)

    def set_params(self, params: Params) -> None:
        """Move the selected parameters to ``params`` in place (for a problem that aliases a model's parameters,
        as one built from a live model does, the model moves with it)."""
        flat = self.flatten(params).detach()
        with torch.no_grad():
            for p, new in zip(self.params, self.unflatten(flat.to(self.device, self.dtype))):
                if p.data_ptr() != new.data_ptr():
                    p.copy_(new)

    # ---------------------------------------------------------------- vectors
    def flatten(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors (a sequence in ``param_names`` order, or a name→tensor dict)."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.param_names if n not in tensors]
            if missing or len(tensors) != len(self.param_names):
                raise ShapeError(f"expected tensors for exactly {list(self.param_names)}, got {list(tensors)}")
            tensors = [tensors[n] for n in self.param_names]
        if len(tensors) != len(self.shapes):
            raise ShapeError(f"expected {len(self.shapes)} parameter-shaped tensors, got {len(tensors)}")
        for name, t, s in zip(self.param_names, tensors, self.shapes):
            if tuple(t.shape) != tuple(s):
                raise ShapeError(f"tensor for {name} has shape {tuple(t.shape)}, expected {tuple(s)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> Params:
        """Split a flat vector of length ``dim`` into parameter-shaped tensors."""
        if flat.ndim != 1 or flat.numel() != self.dim:
            raise ShapeError(f"expected a flat vector of length {self.dim}, got shape {tuple(flat.shape)}")
        out, i = [], 0
        for s in self.shapes:
            k = s.numel()
            out.append(flat[i : i + k].view(s))
            i += k
        return tuple(out)



class StagedProblem(ABC):
    """A problem whose *model* is split into consecutive stages held elsewhere (pipeline mode): no process holds all
    parameters, so vectors live as stage shards and operators and metrics are built by the problem itself.

    :func:`curvdist.operator` and :func:`curvdist.metric` hand such a problem's requests to
    :meth:`curvature_operator` and :meth:`curvature_metric`, which refuse what the stages cannot compute with an
    error naming what they can.
    """

    dim: int
    dtype: torch.dtype
    reduction: str
    num_samples: int

    @property
    @abstractmethod
    def backend(self) -> str:
        """Where the stages live, e.g. ``ray-pipeline[3]``."""

    @abstractmethod
    def curvature_operator(self, kind: str, **options: Any) -> Any:
        """The operator ``kind`` through the stages."""

    @abstractmethod
    def curvature_metric(self, kind: str, damping: float, **options: Any) -> Any:
        """The metric ``kind`` through the stages."""

    def backend_stats(self) -> dict[str, Any] | None:
        return None

    def memory_reset(self) -> None:
        """Start a peak-memory window on every stage and in this (the coordinating) process."""
        self._memory_windowed = reset_peak()

    def memory_records(self) -> list[dict[str, Any]]:
        """The coordinator's line (it holds no parameters) and each stage's."""
        return [memory_record("coordinator", 0, getattr(self, "_memory_windowed", False))]
