"""The ``curvdist`` section of a DeepSpeed JSON configuration.

DeepSpeed keeps keys it does not know in its parsed configuration, so the section can sit next to DeepSpeed's own
keys; curvdist validates it itself, with the CLI's schema for queries, curvatures and metrics::

    "curvdist": {
      "monitor": {"every": 20, "loss": "cross_entropy", "metric": {"kind": "fisher", "damping": 0.01},
                  "queries": [{"kind": "flatness", "name": "flatness", "matvecs": 30}]},
      "preconditioner": {"metric": {"kind": "kfac", "damping": 0.001}, "lr": 0.1, "refresh": 10}
    }

Every error is a one-line :class:`~curvdist.errors.ConfigError` naming the key, e.g.
``curvdist.monitor.queries.0.k``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, ValidationError, model_validator

from ...catalogue import LossKind, Reduction
from ...errors import ConfigError
from ...queries.specs import CurvatureSpec, MetricSpec, NamedSpecs, Query, Strict, choice, format_validation_error
from .engine import raw_config

SECTION = "curvdist"


class MonitorSpec(NamedSpecs):
    """The curvature monitor: which queries (CLI query objects, each with an optional ``name``) to run every
    ``every`` global steps on the held batch, with which default curvature and metric, in which dtype.

    ``zero3`` (ZeRO stage 3 only): ``partitioned`` (the default) measures on the engine's own partitions —
    finite-difference Hessian/GGN products, vectors as partitions, layers gathered only by ZeRO-3's own forward
    and backward — each product at a step of its own by Ridders' extrapolation, stopped at the error estimate
    ``fd_tol`` (or plain central differences at a fixed relative step ``fd_step``; :mod:`.finite_difference`);
    ``gather``
    gathers the whole model into a replica on every rank (every query and metric, exact products, small models).
    ``dtype`` is the replica's; partitioned products and vectors are in the parameters' dtype (inner products
    in float64)."""

    every: PositiveInt = 100
    zero3: Literal["partitioned", "gather"] = "partitioned"
    fd_step: Annotated[float, Field(gt=0, lt=1)] | None = None
    fd_tol: Annotated[float, Field(gt=0, lt=1)] = 1e-6
    loss: choice(LossKind) = "cross_entropy"
    reduction: choice(Reduction) = "mean"
    dtype: Literal["float32", "float64"] = "float32"
    params: list[str] | None = None
    batch_size: PositiveInt | None = None
    seed: int = 0
    curvature: CurvatureSpec = Field(default_factory=CurvatureSpec)
    metric: MetricSpec = Field(default_factory=MetricSpec)
    queries: Annotated[list[Query], Field(min_length=1)]
    names: list[str | None] = Field(default_factory=list)
    prefix: str = "curvdist"

    @model_validator(mode="before")
    @classmethod
    def _query_names(cls, data: Any) -> Any:
        """Move each query's optional ``name`` into ``names`` (the CLI's query objects have no name)."""
        if not isinstance(data, dict) or not isinstance(data.get("queries"), list):
            return data
        if "names" in data:
            raise ValueError("give query names as 'name' inside each query, not as 'names'")
        data = dict(data)
        queries, names = [], []
        for q in data["queries"]:
            if isinstance(q, dict):
                q = dict(q)
                names.append(q.pop("name", None))
            else:
                names.append(None)
            queries.append(q)
        data["queries"], data["names"] = queries, names
        return data


class PreconditionerSpec(NamedSpecs):
    """The Riemannian preconditioner (client optimizer): θ ← θ − lr·(M + δI)⁻¹g with the metric's statistics
    reduced over the data-parallel group and refreshed every ``refresh`` steps."""

    metric: MetricSpec = Field(default_factory=lambda: MetricSpec(kind="kfac", damping=1e-3))
    lr: Annotated[float, Field(gt=0)] = 0.1
    refresh: PositiveInt = 10
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    loss: choice(LossKind) = "cross_entropy"
    dtype: Literal["float32", "float64"] = "float32"
    params: list[str] | None = None
    batch_size: PositiveInt | None = None
    #: the fraction f of ranks that precondition each parameter (KAISA's grad_worker_fraction): 1 every rank
    #: everything, 1/world one owner per parameter (block-diagonal metrics; see curvdist.integrations.deepspeed.owners)
    grad_worker_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    #: step-size control: the step's squared length in the metric lr²·gᵀd stays ≤ kl_clip (None: no clipping)
    kl_clip: Annotated[float, Field(gt=0)] | None = None
    #: where the metric's statistics come from: a separate pass over the metric batch, or the training step's own
    #: forward passes (run each micro-batch's forward inside ``with optimizer.track(y):``), averaged with ``decay``
    statistics: Literal["separate", "step"] = "separate"
    decay: Annotated[float, Field(ge=0, lt=1)] = 0.95


class CurvdistSection(Strict):
    """The whole ``curvdist`` section: a monitor, a preconditioner, or both."""

    monitor: MonitorSpec | None = None
    preconditioner: PreconditionerSpec | None = None


class _Root(Strict):
    """Wraps the section so that validation errors name keys from ``curvdist.`` on."""

    curvdist: CurvdistSection


def read_section(source: Any) -> CurvdistSection:
    """Validate the ``curvdist`` section of a DeepSpeed configuration (an engine, a dict or a JSON file path).

    Raises:
        ConfigError: the section is missing or invalid (the message names the key).
    """
    config = raw_config(source)
    if SECTION not in config:
        raise ConfigError(f"the DeepSpeed configuration has no '{SECTION}' section (keys: {sorted(config)}); add "
                          f"\"{SECTION}\": {{\"monitor\": {{...}}, \"preconditioner\": {{...}}}} or configure the "
                          f"integration from Python")
    section = config[SECTION]
    if not isinstance(section, dict):
        raise ConfigError(f"'{SECTION}' must be a JSON object, got {type(section).__name__}")
    try:
        return _Root.model_validate({SECTION: section}).curvdist
    except ValidationError as e:
        raise ConfigError(f"DeepSpeed config: {format_validation_error(e)}") from None


def monitor_spec(source: Any) -> MonitorSpec:
    """The ``curvdist.monitor`` sub-section (a :class:`ConfigError` if it is absent)."""
    spec = read_section(source).monitor
    if spec is None:
        raise ConfigError(f"the DeepSpeed configuration's '{SECTION}' section has no 'monitor' entry")
    return spec


def preconditioner_spec(source: Any) -> PreconditionerSpec:
    """The ``curvdist.preconditioner`` sub-section (a :class:`ConfigError` if it is absent)."""
    spec = read_section(source).preconditioner
    if spec is None:
        raise ConfigError(f"the DeepSpeed configuration's '{SECTION}' section has no 'preconditioner' entry")
    return spec
