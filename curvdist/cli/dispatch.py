"""Query specs (the config's query objects) → the query functions of :mod:`curvdist.queries`; shared by the CLI,
``curvdist train`` and the DeepSpeed monitor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..geometry.metrics import Metric
from ..operators import CurvatureOperator
from ..queries import Result, density, diag, eigs, flatness, grad_norm, logdet, trace
from .config import DensityQuery, DiagQuery, EigsQuery, FlatnessQuery, GradNormQuery, LogdetQuery, TraceQuery


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
                        logdet_damping=q.logdet_damping, probes=q.probes, steps=q.steps, seed=seed, progress=progress)
    if isinstance(q, GradNormQuery):
        return grad_norm(op, metric=M)
    raise ConfigError(f"queries: unsupported query kind {getattr(q, 'kind', q)!r}")


def scalars(result: Result) -> dict[str, float]:
    """The scalars of a result: ``eig0``… (eigs), ``top_eigenvalue``/``trace``/``logdet`` (flatness), ``sum``
    (diag) or ``value``."""
    if result.query == "eigs":
        return {f"eig{i}": float(v) for i, v in enumerate(result.value)}
    if result.query == "flatness":
        return {k: float(v) for k, v in result.value.items()}
    if result.query == "diag":
        return {"sum": float(result.info["sum"])}
    return {"value": float(result.value)}
