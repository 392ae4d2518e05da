"""Turn the user's data argument into a re-iterable, fixed-order sequence of (X, y) batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..errors import DataError

Batch = tuple[Tensor, Tensor]


def as_batches(data: Any, batch_size: int | None = None) -> Iterable[Batch]:
    """Normalize ``data`` to a re-iterable of (X, y) batches in a fixed order.

    Accepted: a ``(X, y)`` tuple of tensors (sliced into batches of ``batch_size``, one batch if None); a torch
    ``Dataset`` (with ``batch_size``, iterated without shuffling); a ``DataLoader`` or a list of ``(X, y)``
    batches, used as given. One-shot iterators (generators) are refused: every curvature product needs a full
    pass over the data.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, y = data
        if X.shape[0] != y.shape[0]:
            raise DataError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
        b = batch_size or max(X.shape[0], 1)
        return [(X[i : i + b], y[i : i + b]) for i in range(0, X.shape[0], b)]
    if isinstance(data, Dataset) and not isinstance(data, Sequence):
        if batch_size is None:
            raise DataError("a torch Dataset needs a batch_size")
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, Iterator):
        raise DataError(
            "data is a one-shot iterator (e.g. a generator); pass a list of (X, y) batches, a DataLoader, "
            "a Dataset with batch_size, or an (X, y) tuple"
        )
    if not isinstance(data, Iterable):
        raise DataError(f"data must be an iterable of (X, y) batches, got {type(data).__name__}")
    return data


def shuffles(data: Iterable[Batch]) -> bool:
    """True when ``data`` is a DataLoader that draws its order at random."""
    return isinstance(data, DataLoader) and isinstance(getattr(data, "sampler", None), RandomSampler)


def unpack(batch: Any, index: int, check_values: bool = True) -> Batch:
    """Check that one element of the data is an (X, y) pair of tensors (and, optionally, finite and non-empty)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DataError(f"batch {index} is not an (X, y) pair (got {type(batch).__name__})")
    X, y = batch
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise DataError(f"batch {index} must hold tensors, got ({type(X).__name__}, {type(y).__name__})")
    if X.shape[0] != y.shape[0]:
        raise DataError(f"batch {index}: X has {X.shape[0]} samples but y has {y.shape[0]}")
    if not check_values:
        return X, y
    if X.shape[0] == 0:
        raise DataError(f"batch {index} is empty")
    for name, t in (("X", X), ("y", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(f"batch {index}: {name} contains NaN or inf values")
    return X, y
