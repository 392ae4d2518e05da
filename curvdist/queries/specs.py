"""The query layer's specifications (pydantic): curvature, metric and query specs, shared by the YAML config, the
DeepSpeed config section and the Python helpers of :mod:`curvdist.queries.session`. Every choice derives from
:mod:`curvdist.catalogue`; every validation error is one line naming the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from ..catalogue import (
    PULLBACK_OF,
    Curvature,
    DampingReference,
    DiagMethod,
    Grouping,
    HVPMode,
    MetricKind,
    QueryKind,
    TraceMethod,
    Which,
    names,
)
from ..errors import ConfigError


def choice(*members: Any) -> Any:
    """A ``Literal`` of catalogue names (pydantic validates and reports it like any Literal)."""
    return Literal[tuple(names(members[0]) if len(members) == 1 and isinstance(members[0], type) else names(members))]


CurvatureName = choice(Curvature)
MetricName = choice(MetricKind)
PullbackOfName = choice(*PULLBACK_OF)
TraceMethodName = choice(TraceMethod)
DiagMethodName = choice(DiagMethod)
WhichName = choice(Which)
DampingReferenceName = choice(DampingReference)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class NamedSpecs(Strict):
    """Lets ``curvature: hessian`` / ``metric: fisher`` stand for ``{kind: hessian}`` / ``{kind: fisher}``."""

    @field_validator("curvature", "metric", mode="before", check_fields=False)
    @classmethod
    def _kind_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v


class CurvatureSpec(Strict):
    """A curvature operator: ``kind``; ``mc_samples`` for fisher_mc; for the Hessian the product ``mode`` (auto:
    the fastest exact mode, measured once) and ``compile`` (torch.compile of the per-batch product)."""

    kind: CurvatureName = "hessian"
    mc_samples: PositiveInt = 1
    check_determinism: bool = True
    mode: choice(HVPMode) = "auto"
    compile: bool = False

    def options(self, seed: int) -> dict[str, Any]:
        opts: dict[str, Any] = {"check_determinism": self.check_determinism}
        if self.kind == "fisher_mc":
            opts.update(mc_samples=self.mc_samples, seed=seed)
        if self.kind == "hessian" and (self.mode != "auto" or self.compile):
            opts.update(mode=self.mode, compile=self.compile)
        elif self.mode != "auto" or self.compile:
            raise ConfigError(f"curvature: mode and compile apply to the hessian only, not to {self.kind!r}")
        return opts


class MetricSpec(Strict):
    """A metric: ``kind`` from the catalogue, damping δ ≥ 0, ``of`` (the θ metric a pullback pulls back),
    ``options`` passed to the metric (e.g. ``method: cg``, ``mc_samples``)."""

    kind: MetricName = "euclidean"
    damping: Annotated[float, Field(ge=0)] = 0.0
    of: PullbackOfName = "euclidean"
    damping_reference: DampingReferenceName = "pullback"
    options: dict[str, Any] = Field(default_factory=dict)

    def label(self) -> str:
        name = f"pullback({self.of})" if self.kind == "pullback" else self.kind
        return name if not self.damping else f"{name}+{self.damping:g}"


class QueryBase(NamedSpecs):
    curvature: CurvatureSpec | None = None
    metric: MetricSpec | None = None
    seed: int | None = None


class EigsQuery(QueryBase):
    kind: Literal[QueryKind.EIGS.value]
    k: PositiveInt = 1
    which: WhichName = "largest"
    tol: Annotated[float, Field(gt=0)] | None = None
    maxiter: PositiveInt | None = None


class TraceQuery(QueryBase):
    kind: Literal[QueryKind.TRACE.value]
    method: TraceMethodName = "hutchpp"
    matvecs: PositiveInt = 100


class DiagQuery(QueryBase):
    kind: Literal[QueryKind.DIAG.value]
    method: DiagMethodName = "xdiag"
    matvecs: PositiveInt = 100


class LogdetQuery(QueryBase):
    kind: Literal[QueryKind.LOGDET.value]
    damping: Annotated[float, Field(ge=0)] = 0.0
    probes: PositiveInt = 20
    steps: PositiveInt = 50


class DensityQuery(QueryBase):
    kind: Literal[QueryKind.DENSITY.value]
    probes: PositiveInt = 5
    steps: PositiveInt = 80
    grid: PositiveInt = 1000
    sigma: Annotated[float, Field(gt=0)] | None = None


class GradNormQuery(QueryBase):
    kind: Literal[QueryKind.GRAD_NORM.value]


class FlatnessQuery(QueryBase):
    kind: Literal[QueryKind.FLATNESS.value]
    trace_method: choice(TraceMethod.HUTCHINSON, TraceMethod.HUTCHPP, TraceMethod.XTRACE) = "hutchpp"
    matvecs: PositiveInt = 100
    logdet_damping: Annotated[float, Field(ge=0)] = 0.0
    probes: PositiveInt = 10
    steps: PositiveInt = 40
    tol: Annotated[float, Field(gt=0)] | None = None  # of the top eigenvalue's Lanczos solve
    maxiter: PositiveInt | None = None  # of the top eigenvalue's Lanczos solve (each step keeps one vector)


class BlockSpectraQuery(QueryBase):
    """Per-block generalized spectra of (C_b, M_b) (:func:`curvdist.block_spectra`): ``groups`` ``block`` (the
    blocks of a transformer or any numbered stack), ``layer`` or ``parameter``; ``compare`` also computes the full
    spectrum (small models)."""

    kind: Literal[QueryKind.BLOCK_SPECTRA.value]
    groups: choice(Grouping) = "block"
    k: PositiveInt = 3
    compare: bool = False
    dense_block_dim: PositiveInt = 1024  # larger blocks: Lanczos for the top k, Hutch++ for the trace
    trace_matvecs: PositiveInt = 60


class EvidenceQuery(QueryBase):
    """The invariant Laplace log-evidence at the invariant MAP (:func:`curvdist.evidence`): a Gaussian prior of
    precision ``prior_precision`` in θ, M = F + αR with F from ``metric.kind`` (``kflr`` by default, ``diag_ggn``,
    or ``fisher`` for the dense route; the metric's damping must stay 0: α is the damping), A from ``curvature.kind``
    (``ggn`` by default, or ``hessian``); log det(M⁻¹A) ``exact``, ``slq`` (``probes`` × ``steps``) or ``auto``."""

    kind: Literal[QueryKind.EVIDENCE.value]
    prior_precision: Annotated[float, Field(gt=0)] = 1.0
    logdet: Literal["auto", "exact", "slq"] = "auto"
    probes: PositiveInt = 30
    steps: PositiveInt = 40
    max_iter: PositiveInt = 2000


Query = Annotated[
    EigsQuery | TraceQuery | DiagQuery | LogdetQuery | DensityQuery | GradNormQuery | FlatnessQuery
    | BlockSpectraQuery | EvidenceQuery,
    Field(discriminator="kind"),
]


def _where(loc: tuple[Any, ...]) -> str:
    # drop the union-member tags pydantic inserts for discriminated unions ("eigs", "EigsQuery", ...)
    parts = [str(p) for p in loc]
    out: list[str] = []
    for i, p in enumerate(parts):
        if i > 0 and parts[i - 1].isdigit() and out and out[-2:-1] == ["queries"] and not p.isdigit() and \
                p in names(QueryKind):
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




def validate(model: type[BaseModel], raw: Any, where: str = "") -> Any:
    """``model.model_validate(raw)``, a validation error as one-line :class:`ConfigError` (prefixed ``where: ``)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e)}" if where else format_validation_error(e)) from None
