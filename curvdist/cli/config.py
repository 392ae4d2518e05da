"""The YAML job configuration and its schema (pydantic). Every error names the offending key in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from ..errors import ConfigError
from ..operators import OPERATORS

CURVATURES = tuple(OPERATORS)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class NamedSpecs(Strict):
    """Lets ``curvature: hessian`` / ``metric: fisher`` stand for ``{kind: hessian}`` / ``{kind: fisher}``."""

    @field_validator("curvature", "metric", mode="before", check_fields=False)
    @classmethod
    def _kind_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v


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

    _check_factory = field_validator("factory")(lambda cls, v: _import_path(v))


class CurvatureSpec(Strict):
    kind: Literal["hessian", "ggn", "fisher", "fisher_mc", "empirical_fisher"] = "hessian"
    mc_samples: PositiveInt = 1
    check_determinism: bool = True

    def options(self, seed: int) -> dict[str, Any]:
        opts: dict[str, Any] = {"check_determinism": self.check_determinism}
        if self.kind == "fisher_mc":
            opts.update(mc_samples=self.mc_samples, seed=seed)
        return opts


class MetricSpec(Strict):
    """A metric: ``kind`` from the catalogue, damping δ ≥ 0, ``of`` (the θ metric a pullback pulls back),
    ``options`` passed to the metric (e.g. ``method: cg``, ``mc_samples``)."""

    kind: Literal["euclidean", "fisher", "ggn", "fisher_mc", "empirical_fisher", "diag_ggn", "diag_fisher_mc",
                  "empirical_fisher_diag", "kfac", "kflr", "adam", "pullback"] = "euclidean"
    damping: Annotated[float, Field(ge=0)] = 0.0
    of: Literal["euclidean", "fisher", "ggn", "diag_ggn", "kfac", "kflr"] = "euclidean"
    damping_reference: Literal["pullback", "identity"] = "pullback"
    options: dict[str, Any] = Field(default_factory=dict)

    def label(self) -> str:
        name = f"pullback({self.of})" if self.kind == "pullback" else self.kind
        return name if not self.damping else f"{name}+{self.damping:g}"


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
    kind: Literal["scale", "exp", "softplus", "ntk", "weight_norm", "linear", "compose"]
    kwargs: dict[str, Any] = Field(default_factory=dict)


class QueryBase(NamedSpecs):
    curvature: CurvatureSpec | None = None
    metric: MetricSpec | None = None
    seed: int | None = None


class EigsQuery(QueryBase):
    kind: Literal["eigs"]
    k: PositiveInt = 1
    which: Literal["largest", "smallest", "magnitude"] = "largest"
    tol: Annotated[float, Field(gt=0)] | None = None
    maxiter: PositiveInt | None = None


class TraceQuery(QueryBase):
    kind: Literal["trace"]
    method: Literal["hutchinson", "hutchpp", "xtrace", "exact"] = "hutchpp"
    matvecs: PositiveInt = 100


class DiagQuery(QueryBase):
    kind: Literal["diag"]
    method: Literal["hutchinson", "xdiag"] = "xdiag"
    matvecs: PositiveInt = 100


class LogdetQuery(QueryBase):
    kind: Literal["logdet"]
    damping: Annotated[float, Field(ge=0)] = 0.0
    probes: PositiveInt = 20
    steps: PositiveInt = 50


class DensityQuery(QueryBase):
    kind: Literal["density"]
    probes: PositiveInt = 5
    steps: PositiveInt = 80
    grid: PositiveInt = 1000
    sigma: Annotated[float, Field(gt=0)] | None = None


class GradNormQuery(QueryBase):
    kind: Literal["grad_norm"]


class FlatnessQuery(QueryBase):
    kind: Literal["flatness"]
    trace_method: Literal["hutchinson", "hutchpp", "xtrace"] = "hutchpp"
    matvecs: PositiveInt = 100
    logdet_damping: Annotated[float, Field(ge=0)] = 0.0
    probes: PositiveInt = 10
    steps: PositiveInt = 40


Query = Annotated[
    EigsQuery | TraceQuery | DiagQuery | LogdetQuery | DensityQuery | GradNormQuery | FlatnessQuery,
    Field(discriminator="kind"),
]


class BackendSpec(Strict):
    """``local``, or ``ray`` with ``mode: data`` (``workers`` replicas, disjoint data shards) or ``mode: pipeline``
    (``stages`` consecutive model stages); ``address`` connects to an existing cluster instead of an embedded one."""

    kind: Literal["local", "ray"] = "local"
    mode: Literal["data", "pipeline"] = "data"
    workers: PositiveInt = 2
    stages: PositiveInt = 2
    address: str | None = None
    max_restarts: Annotated[int, Field(ge=0)] = 2
    checkpoint_every: PositiveInt = 10


class Config(NamedSpecs):
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float64"
    model: ModelSpec
    data: DataSpec
    loss: Literal["cross_entropy", "mse"]
    params: list[str] | None = None
    reduction: Literal["mean", "sum"] = "mean"
    train: TrainSpec | None = None
    curvature: CurvatureSpec = Field(default_factory=CurvatureSpec)
    metric: MetricSpec = Field(default_factory=MetricSpec)
    reparam: ReparamSpec | None = None
    queries: Annotated[list[Query], Field(min_length=1)]
    backend: BackendSpec = Field(default_factory=BackendSpec)
    output: str | None = None
    plot: bool = True


def _where(loc: tuple[Any, ...]) -> str:
    # drop the union-member tags pydantic inserts for discriminated unions ("eigs", "EigsQuery", ...)
    parts = [str(p) for p in loc]
    out: list[str] = []
    for i, p in enumerate(parts):
        if i > 0 and parts[i - 1].isdigit() and out and out[-2:-1] == ["queries"] and not p.isdigit() and \
                p in ("eigs", "trace", "diag", "logdet", "density", "grad_norm", "flatness"):
            continue
        if p in ("str", "CurvatureSpec", "MetricSpec") or p.startswith("function-"):
            continue
        out.append(p)
    return ".".join(out) or "<top level>"


def _describe(err: dict[str, Any]) -> str:
    key = _where(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    msg = f"invalid value for '{key}': {err['msg']}"
    if "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def format_validation_error(e: ValidationError) -> str:
    """One line naming the offending keys: unknown keys first (a typo also makes its key 'missing')."""
    errs = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
    msg = "; ".join(_describe(err) for err in errs[:2])
    if len(errs) > 2:
        msg += f" (and {len(errs) - 2} more)"
    return msg


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


def read_mapping(path: str | Path, fmt: str, parse: Any, error: type[Exception], what: str) -> dict[str, Any]:
    """A file holding one mapping (YAML or JSON), read with ``parse``; a missing file, a parse ``error`` or a
    non-mapping is a one-line :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = parse(path.read_text())
    except error as e:
        raise ConfigError(f"{path} is not valid {fmt}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def validate_config(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
