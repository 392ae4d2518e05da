"""The problem: model + loss + data + which parameters, as a pure function of the selected parameters.

All curvature is taken of the empirical risk

    L(θ) = s · Σ_n ℓ(f(x_n; θ), y_n),   s = 1/N for reduction="mean" (the default), s = 1 for "sum",

where N is the number of loss terms in the whole data set (not per batch) — the samples, or for the
language-model losses the non-ignored tokens — and θ are the selected parameters; the other parameters and the
buffers are held fixed at their current values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DataError, NonFiniteError
from ..finite import all_finite
from .base import BaseProblem, Params
from .data import Batch, Inputs, as_batches, batch_len, inputs_to, micro_batches, unpack
from .losses import Loss


class Problem(BaseProblem):
    """Model, loss, data and parameter selection, evaluated functionally with ``torch.func``.

    Args:
        model: the network; it is called as ``model(X)``, or ``model(**inputs)`` for mapping batches, and may
            return a tensor, a Hugging Face ``ModelOutput`` (its ``logits``), a dict with ``logits`` or a tuple
            (its first element). It is not modified; its parameters are read at their current values (the problem
            aliases them, it does not copy them).
        loss: ``"cross_entropy"``, ``"mse"``, ``"causal_lm"``, ``"token_cross_entropy"`` or a
            :class:`~curvdist.problem.losses.Loss`.
        data: an ``(X, y)`` tuple of tensors, a mapping of equal-length tensors with ``labels`` (e.g.
            ``input_ids``, ``attention_mask``, ``labels``), a ``Dataset`` of pairs or mappings with
            ``batch_size``, a ``DataLoader`` or a list of ``(X, y)`` or mapping batches. It is iterated once per
            curvature product, in a fixed order.
        params: names (as in ``model.named_parameters()``) of the parameters to differentiate; default all that
            require gradients.
        reduction: ``"mean"`` (divide by the number of loss terms N: samples, or non-ignored tokens) or
            ``"sum"``.
        batch_size: batch size for ``(X, y)`` tuples, mappings and Datasets.
        micro_batch_size: split every batch into micro-batches of at most this many samples, so that the
            activation memory of a product is that of one micro-batch; every deterministic product equals the
            unsplit one to rounding (so does a sampled one: its labels are keyed by the sample, not the batch).
        accumulate_dtype: the dtype products and gradients are summed in; default float32 for bfloat16/float16
            parameters and the parameters' dtype otherwise (pass ``torch.float64`` for more).
        sample_offset: the index of this data's first sample in the whole data set (a data shard's start): Monte-
            Carlo labels are keyed by the global sample index (:mod:`curvdist.problem.sampling`), so that shards,
            ranks and micro-batches draw what one process on all the data draws.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss,
        data: Any,
        params: Sequence[str] | None = None,
        reduction: str = "mean",
        batch_size: int | None = None,
        micro_batch_size: int | None = None,
        accumulate_dtype: torch.dtype | None = None,
        sample_offset: int = 0,
    ) -> None:
        super().__init__(model, loss, params, reduction, accumulate_dtype)
        if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
            raise DataError(f"sample_offset must be a non-negative integer, got {sample_offset!r}")
        self.sample_offset = sample_offset
        if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int)
                                             or micro_batch_size <= 0):
            raise DataError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
        self.micro_batch_size = micro_batch_size
        self.data: Iterable[Batch] = as_batches(data, batch_size)
        self.num_samples, self.num_batches = self._scan()

    # ---------------------------------------------------------------- data
    def _scan(self) -> tuple[int, int]:
        """One pass over the data: validate every batch, count the loss terms, check the loss is finite, and note
        the global index of every (micro-)batch's first sample."""
        n, b, samples = 0, 0, 0
        self._firsts: list[int] = []
        with torch.no_grad():
            for b, (X, y) in enumerate(self.batches(validate=True)):
                out = self.forward(self.params, X)
                self.loss.check(out, y)
                if not all_finite(out):
                    raise NonFiniteError(f"the model output is NaN or inf on batch {b}")
                if not all_finite(self.loss.per_sample(out, y)):
                    raise NonFiniteError(f"the loss is NaN or inf on batch {b}")
                n += self.loss.count(y)
                self._firsts.append(self.sample_offset + samples)
                samples += batch_len(X)
        if samples == 0:
            raise DataError("the data set is empty")
        if n == 0:
            raise DataError(f"the {self.loss.name} loss has no terms: every label is ignored (-100) in all "
                            f"{samples} samples")
        return n, b + 1

    def first_sample(self, batch_index: int) -> int:
        """The global index of the first sample of (micro-)batch ``batch_index`` (the key of its Monte-Carlo
        labels)."""
        return self._firsts[batch_index]

    def restricted(self, params: Sequence[str]) -> Problem:
        return Problem(self.model, self.loss, self.data, params=list(params), reduction=self.reduction,
                       micro_batch_size=self.micro_batch_size, accumulate_dtype=self.accumulate_dtype,
                       sample_offset=self.sample_offset)

    def batches(self, validate: bool = False) -> Iterator[Batch]:
        """The data batches — split into micro-batches of ``micro_batch_size`` — moved to the parameters'
        device (floating data cast to their dtype).

        Every batch is validated (tensors or tensor mappings, equal lengths, finite, non-empty) on the
        construction pass; later passes only check the structure, since the data must be a fixed sequence anyway.
        """
        for i, batch in enumerate(self.data):
            X, y = unpack(batch, i, check_values=validate)
            X = inputs_to(X, self.device, self.dtype)
            y = y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device)
            yield from micro_batches((X, y), self.micro_batch_size)

    def batch_loss(self, params: Params, X: Inputs, y: Tensor) -> Tensor:
        """Σ_{n in batch} ℓ(f(x_n; θ), y_n), unscaled."""
        return self.loss.per_sample(self.forward(params, X), y).sum()

    def value(self, params: Params | None = None) -> float:
        """L(θ) over the whole data set."""
        params = self.params if params is None else params
        with torch.no_grad():
            total = sum(float(self.batch_loss(params, X, y)) for X, y in self.batches())
        return self.scale * total

    def _batch_gradient(self, params: Params, X: Inputs, y: Tensor) -> list[Tensor]:
        """∇ of one batch's summed loss: reverse mode by ``torch.autograd.grad`` on leaf views of the parameters
        (no copies; about half the peak memory of ``torch.func.grad`` on a GPT-2 decoder here), or
        ``torch.func.grad`` when the parameters are inside a functorch transform. Unused parameters get zeros."""
        if any(torch._C._functorch.is_functorch_wrapped_tensor(p) for p in params):
            return list(torch.func.grad(self.batch_loss)(params, X, y))
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_(True) for p in params)
            grads = torch.autograd.grad(self.batch_loss(leaves, X, y), leaves, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def gradient(self, params: Params | None = None) -> Params:
        """∇L(θ) as parameter-shaped tensors (summed in ``accumulate_dtype``, returned in the parameters' dtype)."""
        params = self.params if params is None else params
        acc: list[Tensor] | None = None
        for X, y in self.batches():
            g = self._batch_gradient(params, X, y)
            if acc is None:  # the first batch's gradient is the accumulator (converted in place of a zero start)
                acc = [gi.to(self.accumulate_dtype) for gi in g]
            else:
                for a, gi in zip(acc, g):
                    a.add_(gi)
            del g  # one gradient-sized buffer besides the accumulator, and only while a batch's gradient exists
        if acc is None:
            acc = [torch.zeros_like(p, dtype=self.accumulate_dtype) for p in params]
        out = tuple(a.mul_(self.scale).to(p.dtype) for a, p in zip(acc, params))
        if not all(all_finite(t) for t in out):
            raise NonFiniteError("the gradient is NaN or inf")
        return out

    def __repr__(self) -> str:
        return (
            f"Problem(model={type(self.model).__name__}, loss={self.loss.name}, dim={self.dim}, "
            f"N={self.num_samples}, micro_batch_size={self.micro_batch_size}, reduction={self.reduction!r}, dtype={self.dtype})"
        )
