"""Run a validated config: build the problem, run every query, collect results, write JSON (and plots)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..operators import CurvatureOperator, operator
from ..problem import Problem
from ..queries import Result, density, diag, eigs, grad_norm, logdet, trace
from ..queries.result import to_jsonable
from .build import build_problem
from .config import Config, CurvatureSpec, DensityQuery, DiagQuery, EigsQuery, LogdetQuery, TraceQuery


def versions() -> dict[str, str]:
    import scipy

    return {"curvdist": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}


class OperatorCache:
    """One operator per curvature spec, built on first use."""

    def __init__(self, problem: Problem, seed: int) -> None:
        self.problem, self.seed, self._ops = problem, seed, {}

    def get(self, spec: CurvatureSpec) -> CurvatureOperator:
        key = spec.model_dump_json()
        if key not in self._ops:
            self._ops[key] = operator(self.problem, spec.kind, **spec.options(self.seed))
        return self._ops[key]


def run_query(q: Any, op: CurvatureOperator, seed: int, progress: bool) -> Result:
    if isinstance(q, EigsQuery):
        return eigs(op, k=q.k, which=q.which, tol=q.tol, maxiter=q.maxiter, seed=seed, progress=progress)
    if isinstance(q, TraceQuery):
        return trace(op, method=q.method, matvecs=q.matvecs, seed=seed, progress=progress)
    if isinstance(q, DiagQuery):
        return diag(op, method=q.method, matvecs=q.matvecs, seed=seed, progress=progress)
    if isinstance(q, LogdetQuery):
        return logdet(op, damping=q.damping, probes=q.probes, steps=q.steps, seed=seed, progress=progress)
    if isinstance(q, DensityQuery):
        return density(op, probes=q.probes, steps=q.steps, grid=q.grid, sigma=q.sigma, seed=seed,
                       progress=progress)
    return grad_norm(op)


def output_path(cfg: Config, config_path: str | Path, output: str | None) -> Path:
    if output:
        return Path(output)
    if cfg.output:
        return Path(cfg.output)
    return Path("results") / f"{Path(config_path).stem}.json"


def run(cfg: Config, config_path: str | Path = "config.yaml", output: str | None = None,
        progress: bool = True, echo: Any = None) -> dict[str, Any]:
    """Execute ``cfg``; returns the JSON document that is also written to the output path."""
    t0 = time.perf_counter()
    problem, train_info = build_problem(cfg)
    cache = OperatorCache(problem, cfg.seed)
    results: list[Result] = []
    for q in cfg.queries:
        spec = q.curvature or cfg.curvature
        seed = cfg.seed if q.seed is None else q.seed
        results.append(run_query(q, cache.get(spec), seed, progress))
    doc = {
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "problem": {"dim": problem.dim, "samples": problem.num_samples, "batches": problem.num_batches,
                    "loss": problem.loss.name, "reduction": problem.reduction, "dtype": str(problem.dtype),
                    "loss_value": problem.value(), "params": list(problem.param_names)},
        "train": train_info,
        "results": [r.to_dict() for r in results],
        "seconds": time.perf_counter() - t0,
    }
    path = output_path(cfg, config_path, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    densities = [r for r in results if r.query == "density"]
    if densities:
        from .plot import plot_densities

        png = path.with_name(path.stem + "_density.png")
        plot_densities(densities, png)
        doc["plots"] = [str(png)]
    path.write_text(json.dumps(to_jsonable(doc), indent=2))
    doc["output"] = str(path)
    return doc
