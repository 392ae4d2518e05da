"""The query layer shared by ``curvdist run``, ``curvdist train`` and the DeepSpeed monitor.

* :class:`Coordinates` — one coordinate system of a run (θ, or ψ of a reparametrization): its problem and one cache
  of its operators and metrics, built on demand from specs;
* :func:`answer` — a query spec on an operator and a metric → the query function's :class:`Result`;
* :func:`run_query` — one query in one coordinate system, its provenance (curvature, metric label, coordinates,
  backend) set here, where the result is made;
* :func:`scalars` / :func:`describe` — the one mapping from a result to named scalars (``eig0``, ``value``, ...)
  and their human-readable labels (``eig[0] (largest)``), used by the history, the monitor and the invariance table.

In ψ every operator and metric is computed by autodiff on the reparametrized model, independently of θ, except
what a metric's definition takes from θ on purpose: ``pullback`` (M_ψ = Jᵀ M_θ J of the θ metric ``of`` — paired
with the Hessian it uses the Riemannian Hessian) and the damping, δ·I_θ pulled back to δ·JᵀJ
(``damping_reference: pullback``, the default) so that the damped metric is a tensor; ``identity`` damps with
δ·I_ψ (needed when J is not invertible).
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..resources import release_free_memory
from ..geometry.metrics import EuclideanMetric, Metric, metric
from ..geometry.riemannian import RiemannianHessian
from ..operators import CurvatureOperator, operator
from ..problem.base import BaseProblem, StagedProblem
from .api import density, diag, eigs, flatness, grad_norm, logdet, trace
from .blocks import block_spectra
from .result import Result
from .specs import (
    BlockSpectraQuery,
    CurvatureSpec,
    DensityQuery,
    DiagQuery,
    EigsQuery,
    EvidenceQuery,
    FlatnessQuery,
    GradNormQuery,
    LogdetQuery,
    MetricSpec,
    TraceQuery,
)


class Coordinates:
    """One coordinate system: ``problem`` (local, sharded or staged), its operators and metrics, cached by spec.

    ``theta``: for ψ coordinates, the θ system (pull-backs and pulled-back damping come from it); ``optimizer``:
    the Adam/AdamW whose state the ``adam`` metric reads.
    """

    def __init__(self, name: str, problem: BaseProblem | StagedProblem, seed: int,
                 theta: Coordinates | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.name, self.problem, self.seed, self.theta, self.optimizer = name, problem, seed, theta, optimizer
        self._ops: dict[str, Any] = {}
        self._metrics: dict[str, Metric | None] = {}

    def operator(self, spec: CurvatureSpec, metric_spec: MetricSpec) -> CurvatureOperator:
        riemannian = self.theta is not None and spec.kind == "hessian" and metric_spec.kind == "pullback"
        key = "riemannian" if riemannian else spec.model_dump_json()
        if key not in self._ops:
            self._ops[key] = RiemannianHessian(self.problem) if riemannian else \
                operator(self.problem, spec.kind, **spec.options(self.seed))
        return self._ops[key]

    def release(self) -> None:
        """Drop the cached operators and metrics (a KFAC metric of GPT-2 small holds ~2.5 GB): done with this
        system's queries; what another system still asks of it (a pull-back's θ metric) is rebuilt on demand."""
        self._ops.clear()
        self._metrics.clear()
        gc.collect()
        release_free_memory()  # hand the freed heap back: the next system's metric would otherwise come on top

    def metric(self, spec: MetricSpec) -> Metric | None:
        key = spec.model_dump_json()
        if key not in self._metrics:
            self._metrics[key] = self._build(spec)
        return self._metrics[key]

    def _build(self, spec: MetricSpec) -> Metric | None:
        kind, damping, opts = spec.kind, spec.damping, dict(spec.options)
        if kind == "pullback":
            if self.theta is None:  # in θ the pulled-back metric is the θ metric itself
                return self.metric(spec.model_copy(update={"kind": spec.of}))
            of = self.theta.metric(spec.model_copy(update={"kind": spec.of})) or \
                EuclideanMetric(self.theta.problem.dim, self.theta.problem.dtype, self.theta.problem.device)
            return metric(self.problem, "pullback", of=of)  # Jᵀ M_θ J of the θ system's (cached) metric
        if kind == "euclidean" and not damping:
            return None
        if kind == "euclidean" and not isinstance(self.problem, StagedProblem):
            return EuclideanMetric(self.problem.dim, self.problem.dtype, self.problem.device, damping)
        if kind == "adam":
            if self.optimizer is None or not isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                raise ConfigError("metric kind 'adam' needs train.optimizer adam or adamw (it reads their state)")
            if self.theta is not None:
                raise ConfigError("metric kind 'adam' exists only in the coordinates the optimizer trained in (θ)")
            opts["optimizer"] = self.optimizer
        if self.theta is not None:  # in ψ: damp with δ·I_θ pulled back (a tensor) unless told otherwise
            opts["damping_reference"] = spec.damping_reference
        return metric(self.problem, kind, damping, **opts)


def answer(q: Any, op: CurvatureOperator, M: Metric | None, seed: int, progress: bool = False,
           lanczos_file: Path | None = None, checkpoint_every: int = 10) -> Result:
    """Run the query spec ``q`` on the operator with the metric (None: Euclidean); eigenvalue solves checkpoint
    their Lanczos state to ``lanczos_file`` when given."""
    if isinstance(q, EigsQuery):
        return eigs(op, k=q.k, which=q.which, metric=M, tol=q.tol, maxiter=q.maxiter, seed=seed, progress=progress,
                    checkpoint=lanczos_file, checkpoint_every=checkpoint_every)
    if isinstance(q, TraceQuery):
        return trace(op, method=q.method, matvecs=q.matvecs, metric=M, seed=seed, progress=progress)
    if isinstance(q, DiagQuery):
        if M is not None:
            raise ConfigError("queries: diag is coordinate-dependent and takes no metric (only euclidean)")
        return diag(op, method=q.method, matvecs=q.matvecs, seed=seed, progress=progress)
    if isinstance(q, LogdetQuery):
        return logdet(op, damping=q.damping, metric=M, probes=q.probes, steps=q.steps, seed=seed, progress=progress)
    if isinstance(q, DensityQuery):
        return density(op, metric=M, probes=q.probes, steps=q.steps, grid=q.grid, sigma=q.sigma, seed=seed,
                       progress=progress)
    if isinstance(q, FlatnessQuery):
        return flatness(op, metric=M, trace_method=q.trace_method, matvecs=q.matvecs,
                        logdet_damping=q.logdet_damping, probes=q.probes, steps=q.steps, seed=seed, tol=q.tol,
                        maxiter=q.maxiter, progress=progress)
    if isinstance(q, GradNormQuery):
        return grad_norm(op, metric=M)
    raise ConfigError(f"queries: unsupported query kind {getattr(q, 'kind', q)!r}")


def blocks_of(q: BlockSpectraQuery, coords: Coordinates, curvature: CurvatureSpec, metric_spec: MetricSpec,
              seed: int) -> Result:
    """A ``block_spectra`` query: each block's metric is built on the block's own sub-problem."""
    if not isinstance(coords.problem, BaseProblem):
        raise ConfigError("queries: block_spectra needs the parameters in this process (local or data-parallel "
                          "backend), not pipeline stages")
    if metric_spec.kind in ("pullback", "adam"):
        raise ConfigError(f"queries: block_spectra builds each block's metric on the block's sub-problem; metric "
                          f"kind {metric_spec.kind!r} is not available there (use euclidean, fisher, ggn, kfac, ...)")
    if metric_spec.kind == "euclidean" and metric_spec.damping:
        raise ConfigError("queries: block_spectra takes the Euclidean metric without damping")
    kind = None if metric_spec.kind == "euclidean" else metric_spec.kind
    return block_spectra(coords.problem, curvature=curvature.kind, metric=kind, damping=metric_spec.damping,
                         groups=q.groups, k=q.k, compare=q.compare, dense_block_dim=q.dense_block_dim,
                         trace_matvecs=q.trace_matvecs, metric_options=dict(metric_spec.options),
                         operator_options=curvature.options(seed), seed=seed)


def evidence_of(q: EvidenceQuery, coords: Coordinates, seed: int) -> Result:
    """An ``evidence`` query: the metric kind names F (default ``kflr``), its damping is the prior precision."""
    from ..problem.problem import Problem
    from .evidence import evidence

    spec = q.metric or MetricSpec(kind="kflr")
    if spec.damping or spec.options:
        raise ConfigError("queries: evidence takes the metric's kind only; α = prior_precision is its damping")
    curvature = (q.curvature or CurvatureSpec(kind="ggn")).kind
    if curvature not in ("ggn", "hessian"):
        raise ConfigError(f"queries: evidence takes curvature ggn or hessian, not {curvature!r}")
    if not isinstance(coords.problem, Problem):
        raise ConfigError("queries: evidence needs the parameters in this process (the local backend)")
    return evidence(coords.problem, q.prior_precision, spec.kind, curvature=curvature, logdet_method=q.logdet,
                    probes=q.probes, steps=q.steps, seed=seed, max_iter=q.max_iter)


def run_query(q: Any, coords: Coordinates, curvature: CurvatureSpec, metric_spec: MetricSpec, seed: int,
              progress: bool = False, lanczos_file: Path | None = None, checkpoint_every: int = 10) -> Result:
    """One query in one coordinate system with its own curvature/metric/seed (or the defaults given); the result
    records the metric's label, the coordinate system and the problem's backend."""
    curvature = q.curvature or curvature
    metric_spec = q.metric or metric_spec
    seed = seed if q.seed is None else q.seed
    problem = coords.problem
    problem.memory_reset()  # memory is a result: every process's peak during this query
    if isinstance(q, EvidenceQuery):
        r = evidence_of(q, coords, seed)
        return replace(r, coordinates=coords.name, backend=problem.backend,
                       info=dict(r.info, memory=problem.memory_records()))
    if isinstance(q, BlockSpectraQuery):
        r = blocks_of(q, coords, curvature, metric_spec, seed)
        return replace(r, metric=metric_spec.label(), coordinates=coords.name, backend=problem.backend,
                       info=dict(r.info, memory=problem.memory_records()))
    op = coords.operator(curvature, metric_spec)
    r = answer(q, op, coords.metric(metric_spec), seed, progress, lanczos_file, checkpoint_every)
    product = getattr(op, "product_info", None)  # the Hessian's product mode / the pipeline's schedule
    info = dict(r.info, product=product()) if callable(product) else dict(r.info)
    info["memory"] = problem.memory_records()
    return replace(r, metric=metric_spec.label(), coordinates=coords.name, backend=problem.backend, info=info)


def scalars(result: Result) -> dict[str, float]:
    """The named scalars of a result: ``eig0``… (eigs), ``top_eigenvalue``/``trace``/``logdet`` (flatness),
    ``sum`` (diag), ``support_max`` (density) or ``value``."""
    if result.query == "eigs":
        return {f"eig{i}": float(v) for i, v in enumerate(result.value)}
    if result.query == "flatness":
        return {k: float(v) for k, v in result.value.items()}
    if result.query == "diag":
        return {"sum": float(result.info["sum"])}
    if result.query == "block_spectra":  # by position: ψ coordinates name their parameters differently
        return {f"block{i}": float(v["max"]) for i, v in enumerate(result.value["blocks"].values())}
    if result.query == "density":
        return {"support_max": float(result.info["support"][1])}
    return {"value": float(result.value)}


def describe(result: Result, name: str) -> str:
    """A readable label of the scalar ``name`` of ``result``: ``eig[0] (largest)``, ``trace (xtrace)``, ..."""
    if result.query == "eigs":
        return f"eig[{name[3:]}] ({result.info['which']})"
    if result.query == "flatness":
        return f"flatness.{name}"
    if result.query == "density":
        return "density support max"
    if result.query == "diag":
        return "diag sum"
    if result.query == "block_spectra":
        block = list(result.value["blocks"])[int(name[5:])]
        return f"block {block} top eigenvalue"
    if result.query == "trace":
        return f"trace ({result.info.get('method')})"
    return result.query


def invariance_rows(theta: list[Result], psi: list[Result]) -> list[dict[str, Any]]:
    """Pair each θ result with its ψ twin: quantity, curvature, metric, θ value, ψ value, relative change."""
    rows = []
    for a, b in zip(theta, psi):
        sb = scalars(b)
        for name, va in scalars(a).items():
            vb = sb[name]
            rel = abs(vb - va) / abs(va) if va != 0 else abs(vb - va)
            rows.append({"quantity": describe(a, name), "curvature": a.curvature, "metric": a.metric, "theta": va,
                         "psi": vb, "relative_change": rel})
    return rows
