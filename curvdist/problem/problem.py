"""The problem: model + loss + data + which parameters, as a pure function of the selected parameters.

All curvature is taken of the empirical risk

    L(θ) = s · Σ_n ℓ(f(x_n; θ), y_n),   s = 1/N for reduction="mean" (the default), s = 1 for "sum",

where N is the number of samples in the whole data set (not per batch) and θ are the selected parameters; the
other parameters and the buffers are held fixed at their current values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import DataError, NonDeterministicError, NonFiniteError, ProblemError, ShapeError
from .autodiff import differentiable_kernels
from .data import Batch, as_batches, unpack
from .losses import Loss, make_loss

Params = tuple[Tensor, ...]


def _refuse_stateful_modules(model: nn.Module) -> None:
    """BatchNorm in train mode couples the samples of a batch and updates running statistics on every pass."""
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise NonDeterministicError(
                f"BatchNorm module '{name or type(m).__name__}' in train mode: the loss would depend on the batch "
                "composition and every pass would update its running statistics; call model.eval()"
            )


class Problem:
    """Model, loss, data and parameter selection, evaluated functionally with ``torch.func``.

    Args:
        model: the network; it is called as ``model(X)``. It is not modified; its parameters are read at their
            current values (the problem aliases them, it does not copy them).
        loss: ``"cross_entropy"``, ``"mse"`` or a :class:`~curvdist.problem.losses.Loss`.
        data: an ``(X, y)`` tuple of tensors, a ``Dataset`` with ``batch_size``, a ``DataLoader`` or a list of
            ``(X, y)`` batches. It is iterated once per curvature product, in a fixed order.
        params: names (as in ``model.named_parameters()``) of the parameters to differentiate; default all that
            require gradients.
        reduction: ``"mean"`` (divide by the number of samples N) or ``"sum"``.
        batch_size: batch size for ``(X, y)`` tuples and Datasets.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss,
        data: Any,
        params: Sequence[str] | None = None,
        reduction: str = "mean",
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ProblemError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if reduction not in ("mean", "sum"):
            raise ProblemError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        _refuse_stateful_modules(model)
        self.model = model
        self.loss = make_loss(loss)
        self.reduction = reduction
        self.data: Iterable[Batch] = as_batches(data, batch_size)

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
        self._frozen: dict[str, Tensor] = {n: p.detach() for n, p in named.items() if n not in self.param_names}
        self._frozen.update({n: b for n, b in model.named_buffers()})
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in self.params)
        self.dim: int = sum(p.numel() for p in self.params)
        self.num_samples, self.num_batches = self._scan()

    # ---------------------------------------------------------------- data
    def _scan(self) -> tuple[int, int]:
        """One pass over the data: validate every batch, count samples, check the loss is finite."""
        n, b = 0, 0
        with torch.no_grad():
            for b, (X, y) in enumerate(self.batches(validate=True)):
                out = self.forward(self.params, X)
                if b == 0:
                    self.loss.check(out, y)
                if not bool(torch.isfinite(out).all()):
                    raise NonFiniteError(f"the model output is NaN or inf on batch {b}")
                if not bool(torch.isfinite(self.loss.per_sample(out, y)).all()):
                    raise NonFiniteError(f"the loss is NaN or inf on batch {b}")
                n += X.shape[0]
        if n == 0:
            raise DataError("the data set is empty")
        return n, b + 1

    def batches(self, validate: bool = False) -> Iterator[Batch]:
        """The data batches moved to the parameters' device (floating data cast to their dtype).

        Every batch is validated (pairs of tensors, finite, non-empty) on the construction pass; later passes
        only check the structure, since the data must be a fixed sequence anyway.
        """
        for i, batch in enumerate(self.data):
            X, y = unpack(batch, i, check_values=validate)
            X = X.to(self.device, self.dtype) if X.is_floating_point() else X.to(self.device)
            y = y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device)
            yield X, y

    @property
    def scale(self) -> float:
        """s in L = s · Σ_n ℓ_n: 1/N for reduction="mean", 1 for "sum"."""
        return 1.0 / self.num_samples if self.reduction == "mean" else 1.0

    # ---------------------------------------------------------------- functional model
    def forward(self, params: Params, X: Tensor) -> Tensor:
        """f(X; θ) with θ = params (in the order of ``param_names``); the rest of the model held fixed."""
        state = dict(self._frozen)
        state.update(zip(self.param_names, params))
        with differentiable_kernels():
            return functional_call(self.model, state, (X,))

    def batch_loss(self, params: Params, X: Tensor, y: Tensor) -> Tensor:
        """Σ_{n in batch} ℓ(f(x_n; θ), y_n), unscaled."""
        return self.loss.per_sample(self.forward(params, X), y).sum()

    def value(self, params: Params | None = None) -> float:
        """L(θ) over the whole data set."""
        params = self.params if params is None else params
        with torch.no_grad():
            total = sum(float(self.batch_loss(params, X, y)) for X, y in self.batches())
        return self.scale * total

    def gradient(self, params: Params | None = None) -> Params:
        """∇L(θ) as parameter-shaped tensors."""
        params = self.params if params is None else params
        acc = [torch.zeros_like(p) for p in params]
        for X, y in self.batches():
            g = torch.func.grad(self.batch_loss)(params, X, y)
            for a, gi in zip(acc, g):
                a.add_(gi)
        out = tuple(a * self.scale for a in acc)
        if not all(bool(torch.isfinite(t).all()) for t in out):
            raise NonFiniteError("the gradient is NaN or inf")
        return out

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

    def __repr__(self) -> str:
        return (
            f"Problem(model={type(self.model).__name__}, loss={self.loss.name}, dim={self.dim}, "
            f"N={self.num_samples}, reduction={self.reduction!r}, dtype={self.dtype})"
        )
