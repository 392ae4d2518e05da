"""The YAML job configuration and its schema (pydantic). Every error names the offending key in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, field_validator

from ..catalogue import LossKind, Reduction, ReparamKind
from ..errors import ConfigError
from ..queries.specs import (
    CurvatureSpec,
    MetricSpec,
    NamedSpecs,
    Query,
    Strict,
    choice,
    format_validation_error,
    read_mapping,
)


def _import_path(v: str) -> str:
    if not isinstance(v, str) or v.count(":") != 1 or not all(v.split(":")):
        raise ValueError(f"must be an import path 'module:callable', got {v!r}")
    return v


class ModelSpec(Strict):
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None

    _check_factory = field_validator("factory")(lambda cls, v: _import_path(v))


class DataSpec(Strict):
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: PositiveInt | None = None
    micro_batch_size: PositiveInt | None = None  # split batches so a product's activations are one micro-batch's

    _check_factory = field_validator("factory")(lambda cls, v: _import_path(v))


class TrainSpec(Strict):
    """Training: ``optimizer`` (``riemannian_sgd`` preconditions with ``metric``, rebuilt every ``refresh``
    steps); ``curvdist train`` evaluates the queries every ``log_every`` steps."""

    optimizer: Literal["sgd", "adam", "adamw", "riemannian_sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-2
    steps: Annotated[int, Field(ge=0)] = 100
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    metric: MetricSpec | None = None
    refresh: PositiveInt = 10
    log_every: PositiveInt = 10


class ReparamSpec(Strict):
    kind: choice(ReparamKind)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class BackendSpec(Strict):
    """``local``, or ``ray`` with ``mode: data`` (``workers`` replicas, disjoint data shards) or ``mode: pipeline``
    (``stages`` consecutive model stages, each batch split into ``micro_batches`` that flow through them
    GPipe-style; the stages snapshot their vector shards every ``snapshot_every`` products, from which a lost stage
    is recovered; ``balance``: cut the stages by held ``parameters``, by ``compute``, by the measured ``time`` of
    each block, or as a list of the blocks (modules) of each stage; ``stage_threads``: torch threads per stage,
    default one per CPU Ray gives it); ``address`` connects to an existing cluster instead of an embedded one."""

    kind: Literal["local", "ray"] = "local"
    mode: Literal["data", "pipeline"] = "data"
    workers: PositiveInt = 2
    stages: PositiveInt = 2
    micro_batches: PositiveInt | None = None
    snapshot_every: PositiveInt = 1
    balance: str | list[int] = "parameters"
    stage_threads: PositiveInt | None = None
    address: str | None = None
    max_restarts: Annotated[int, Field(ge=0)] = 2
    checkpoint_every: PositiveInt = 10

    @field_validator("balance", mode="before")
    @classmethod
    def _check_balance(cls, v: Any) -> Any:
        from ..distributed.stacks import BALANCE as named  # the backend's names
        if v in named if isinstance(v, str) else isinstance(v, list) and all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v):
            return v
        raise ValueError(f"must be one of {', '.join(named)} or a list of the blocks (modules) of each stage, "
                         "non-negative integers" + (f"; got {v!r}" if isinstance(v, (dict, list)) else ""))


class Config(NamedSpecs):
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float64"
    model: ModelSpec
    data: DataSpec
    loss: choice(LossKind)
    params: list[str] | None = None
    reduction: choice(Reduction) = "mean"
    train: TrainSpec | None = None
    curvature: CurvatureSpec = Field(default_factory=CurvatureSpec)
    metric: MetricSpec = Field(default_factory=MetricSpec)
    reparam: ReparamSpec | None = None
    queries: Annotated[list[Query], Field(min_length=1)]
    backend: BackendSpec = Field(default_factory=BackendSpec)
    output: str | None = None
    plot: bool = True
    threads: PositiveInt | Literal["auto"] = "auto"  # intra-op threads: auto = free cores, capped by problem size


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML; list items addressed by index)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else None
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: no list item {part!r} at '{'.'.join(parts[:i])}'")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:i])}' is not a mapping")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config; raises :class:`ConfigError` with a one-line message."""
    raw = read_mapping(path, "YAML", yaml.safe_load, yaml.YAMLError, "config file")
    return validate_config(apply_overrides(raw, overrides or []))


def validate_config(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
