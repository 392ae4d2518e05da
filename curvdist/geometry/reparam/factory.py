"""Build a reparametrization from plain data (YAML configs): ``make_reparam(kind, **kwargs)``.

Kinds and their keyword arguments::

    scale        factors: number | {name: number | nested list}
    exp          params: name | [names]
    softplus     params: name | [names]
    ntk          sigma_w: number = 1, sigma_b: number = 1, params: [names] | None
    weight_norm  params: [names] | None
    linear       A: nested list (d×d) | None, seed: int = 0, condition: number = 10
    compose      outer: {kind, kwargs}, inner: {kind, kwargs}   (θ = outer(inner(ψ)))

Nested lists become float64 tensors. Unknown kinds and bad arguments raise :class:`~curvdist.errors.ReparamError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...catalogue import ReparamKind, parse
from ...errors import ReparamError
from .base import Reparametrization
from .compose import compose
from .elementwise import exp, scale, softplus
from .linear import linear
from .ntk import ntk
from .weight_norm import weight_norm

KINDS: dict[str, Callable[..., Reparametrization]] = {
    "scale": scale,
    "exp": exp,
    "softplus": softplus,
    "ntk": ntk,
    "weight_norm": weight_norm,
    "linear": linear,
    "compose": compose,
}


def _tensor(value: Any, what: str) -> Any:
    if isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ReparamError(f"{what} is not a numeric array: {e}") from None
    return value


def _part(spec: Any, which: str) -> Reparametrization:
    if isinstance(spec, Reparametrization):
        return spec
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ReparamError(f"compose: {which} must be a mapping {{kind: ..., kwargs: {{...}}}}, got {spec!r}")
    extra = set(spec) - {"kind", "kwargs"}
    if extra:
        raise ReparamError(f"compose: {which} has unknown keys {sorted(extra)}; expected 'kind' and 'kwargs'")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ReparamError(f"compose: {which}.kwargs must be a mapping, got {type(kwargs).__name__}")
    return make_reparam(spec["kind"], **dict(kwargs))


def make_reparam(kind: str, **kwargs: Any) -> Reparametrization:
    """The reparametrization ``kind`` built from plain data (see the module docstring for the arguments)."""
    kind = parse(ReparamKind, kind, "reparametrization kind").value
    build = KINDS[kind]
    try:
        inspect.signature(build).bind(**kwargs)
    except TypeError as e:
        params = list(inspect.signature(build).parameters)
        raise ReparamError(f"invalid arguments {sorted(kwargs)} for reparametrization {kind!r} "
                           f"(it takes {params}): {e}") from None
    if kind == "compose":
        return compose(_part(kwargs.get("outer"), "outer"), _part(kwargs.get("inner"), "inner"))
    if kind == "scale" and isinstance(kwargs.get("factors"), Mapping):
        kwargs["factors"] = {n: _tensor(c, f"scale: the factor for {n!r}") for n, c in kwargs["factors"].items()}
    if kind == "linear" and kwargs.get("A") is not None:
        kwargs["A"] = _tensor(kwargs["A"], "linear: A")
    return build(**kwargs)
