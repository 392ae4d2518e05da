"""Calling a model on a batch's inputs and reading the network output f from what it returns.

``model(X)`` for tensor inputs, ``model(**inputs)`` for mapping inputs (Hugging Face style). The output may be a
tensor, a Hugging Face ``ModelOutput`` or a dict with ``logits``, or a tuple/list whose first element is the
tensor; anything else is refused with an error naming what was returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..errors import ProblemError
from .data import Inputs


class ModelOutputError(ProblemError):
    """The model returned something curvdist cannot read a network output (logits) from."""


def network_output(out: Any) -> Tensor:
    """f from a model's return value: the tensor itself, ``.logits`` / ``["logits"]``, or the first element."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out and isinstance(out["logits"], Tensor):
            return out["logits"]
        raise ModelOutputError(f"the model returned a {type(out).__name__} without 'logits' (keys {list(out)}); "
                               f"curvdist needs the network output: return a tensor, or an output with logits")
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ModelOutputError(f"the model returned a {type(out).__name__} without logits; curvdist needs the network "
                           f"output: a tensor, a ModelOutput or dict with 'logits', or a tuple whose first element "
                           f"is the output tensor")


def call(model: Callable[..., Any], inputs: Inputs) -> Tensor:
    """The network output f of ``model`` on a batch's inputs."""
    if isinstance(inputs, Mapping):
        return network_output(model(**inputs))
    return network_output(model(inputs))
