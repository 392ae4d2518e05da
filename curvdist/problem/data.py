"""Turn the user's data argument into a re-iterable, fixed-order sequence of ``(inputs, labels)`` batches.

Inputs are a tensor X (the model is called as ``model(X)``) or a mapping of tensors (the model is called as
``model(**inputs)``, as Hugging Face models are). A mapping batch such as ``{"input_ids": (B, T),
"attention_mask": (B, T), "labels": (B, T)}`` is split into its ``labels`` and the other keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..errors import DataError
from ..finite import all_finite

#: what a model is called with: a tensor, or keyword tensors
Inputs = Tensor | Mapping[str, Tensor]
Batch = tuple[Inputs, Tensor]

#: the key of a mapping batch that holds the labels (never passed to the model)
LABELS = "labels"


def as_batches(data: Any, batch_size: int | None = None) -> Iterable[Any]:
    """Normalize ``data`` to a re-iterable of batches in a fixed order.

    Accepted: a ``(X, y)`` tuple of tensors or a mapping of equal-length tensors with a ``labels`` key (sliced
    into batches of ``batch_size``, one batch if None); a torch ``Dataset`` of pairs or of such mappings (with
    ``batch_size``, iterated without shuffling); a ``DataLoader`` or a list of ``(X, y)`` or mapping batches,
    used as given. One-shot iterators (generators) are refused: every curvature product needs a full pass over
    the data.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, y = data
        if X.shape[0] != y.shape[0]:
            raise DataError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
        b = batch_size or max(X.shape[0], 1)
        return [(X[i : i + b], y[i : i + b]) for i in range(0, X.shape[0], b)]
    if isinstance(data, Mapping):
        inputs, y = unpack(data, 0, check_values=False)
        n = y.shape[0]
        b = batch_size or max(n, 1)
        return [(slice_inputs(inputs, i, i + b), y[i : i + b]) for i in range(0, n, b)]
    if isinstance(data, Dataset) and not isinstance(data, Sequence):
        if batch_size is None:
            raise DataError("a torch Dataset needs a batch_size")
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, Iterator):
        raise DataError(
            "data is a one-shot iterator (e.g. a generator); pass a list of (X, y) batches, a DataLoader, "
            "a Dataset with batch_size, an (X, y) tuple or a mapping of tensors with 'labels'"
        )
    if not isinstance(data, Iterable):
        raise DataError(f"data must be an iterable of (X, y) batches, got {type(data).__name__}")
    return data


def shuffles(data: Iterable[Any]) -> bool:
    """True when ``data`` is a DataLoader that draws its order at random."""
    return isinstance(data, DataLoader) and isinstance(getattr(data, "sampler", None), RandomSampler)


def batch_len(inputs: Inputs) -> int:
    """The number of samples (sequences) in a batch's inputs: the leading axis."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def slice_inputs(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of a batch's inputs."""
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    return {k: v[start:stop] for k, v in inputs.items()}


def inputs_to(inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Move inputs to ``device``; floating tensors are cast to ``dtype`` (integer ids and masks keep theirs)."""

    def move(t: Tensor) -> Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    if isinstance(inputs, Tensor):
        return move(inputs)
    return {k: move(v) for k, v in inputs.items()}


def micro_batches(batch: Batch, size: int | None) -> Iterator[Batch]:
    """Split one batch into consecutive micro-batches of at most ``size`` samples (the batch itself if None)."""
    inputs, y = batch
    n = y.shape[0]
    if size is None or size >= n:
        yield batch
        return
    for i in range(0, n, size):
        yield slice_inputs(inputs, i, i + size), y[i : i + size]


def _unpack_mapping(batch: Mapping[Any, Any], index: int) -> Batch:
    if LABELS not in batch:
        raise DataError(f"batch {index} is a mapping without a '{LABELS}' key (keys {sorted(map(str, batch))}); "
                        f"the labels are what the loss compares the model's output with")
    for key, value in batch.items():
        if not isinstance(value, Tensor):
            what = "a ragged list (pad the sequences to one length)" if isinstance(value, (list, tuple)) else (
                type(value).__name__)
            raise DataError(f"batch {index}: '{key}' is {what}, not a tensor; every value of a batch mapping must be "
                            f"a tensor with the samples along the first axis")
        if getattr(value, "is_nested", False):
            raise DataError(f"batch {index}: '{key}' is a nested (ragged) tensor; pad the sequences to one length")
        if value.ndim == 0:
            raise DataError(f"batch {index}: '{key}' is a scalar, not a batch of samples")
    lengths = {k: v.shape[0] for k, v in batch.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"batch {index}: the tensors of a batch mapping must have one length along the first axis, "
                        f"got {lengths}")
    inputs = {str(k): v for k, v in batch.items() if k != LABELS}
    if not inputs:
        raise DataError(f"batch {index} holds only '{LABELS}'; the model needs inputs (e.g. 'input_ids')")
    return inputs, batch[LABELS]


def unpack(batch: Any, index: int, check_values: bool = True) -> Batch:
    """Check one element of the data — an ``(X, y)`` pair of tensors or a mapping of tensors with ``labels`` —
    and return ``(inputs, labels)`` (optionally checking that it is finite and non-empty)."""
    if isinstance(batch, Mapping):
        X, y = _unpack_mapping(batch, index)
    else:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(f"batch {index} is neither an (X, y) pair nor a mapping with '{LABELS}' "
                            f"(got {type(batch).__name__})")
        X, y = batch
        if isinstance(X, Mapping):
            X = dict(X)
            bad = [k for k, v in X.items() if not isinstance(v, Tensor)]
            if bad:
                raise DataError(f"batch {index}: inputs {bad} are not tensors")
        elif not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise DataError(f"batch {index} must hold tensors, got ({type(X).__name__}, {type(y).__name__})")
        if not isinstance(y, Tensor):
            raise DataError(f"batch {index}: the labels are {type(y).__name__}, not a tensor")
        if batch_len(X) != y.shape[0]:
            raise DataError(f"batch {index}: X has {batch_len(X)} samples but y has {y.shape[0]}")
    if not check_values:
        return X, y
    if y.shape[0] == 0:
        raise DataError(f"batch {index} is empty")
    named = {"X": X} if isinstance(X, Tensor) else dict(X)
    named["y" if isinstance(X, Tensor) else LABELS] = y
    for name, t in named.items():
        if t.is_floating_point() and not all_finite(t):
            raise DataError(f"batch {index}: {name} contains NaN or inf values")
    return X, y
