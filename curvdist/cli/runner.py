"""Run a validated config: build the problem, run every query, collect results, write JSON (and plots)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError
from ..geometry.reparam import make_reparam, reparametrize
from ..queries import Result
from ..queries.result import to_jsonable
from .backends import theta_coordinates, trained_spec
from .build import build_problem, spec_of
from .checkpoint import QueryCheckpoint
from .config import Config, GradNormQuery
from .coordinates import Coordinates
from .dispatch import answer


def versions() -> dict[str, str]:
    import scipy

    return {"curvdist": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}


def run_query(q: Any, coords: Coordinates, cfg: Config, progress: bool, lanczos_file: Path | None = None
              ) -> Result:
    """One query in one coordinate system (eigenvalue solves checkpoint their Lanczos state to ``lanczos_file``)."""
    spec = q.curvature or cfg.curvature
    mspec = q.metric or cfg.metric
    seed = cfg.seed if q.seed is None else q.seed
    op = coords.operator(spec, mspec)
    M = coords.metric(mspec)
    if isinstance(q, GradNormQuery) and coords.problem is None:
        raise ConfigError("grad_norm is not available in pipeline mode")
    r = answer(q, op, M, seed, progress, lanczos_file, cfg.backend.checkpoint_every)
    return replace(r, metric=mspec.label(), coordinates=coords.name)


def invariance_rows(theta: list[Result], psi: list[Result]) -> list[dict[str, Any]]:
    """Pair each θ result with its ψ twin: quantity, curvature, metric, θ value, ψ value, relative change."""
    rows = []
    for a, b in zip(theta, psi):
        for name, va, vb in _scalars(a, b):
            rel = abs(vb - va) / abs(va) if va != 0 else abs(vb - va)
            rows.append({"quantity": name, "curvature": a.curvature, "metric": a.metric, "theta": va, "psi": vb,
                         "relative_change": rel})
    return rows


def _scalars(a: Result, b: Result) -> list[tuple[str, float, float]]:
    if a.query == "eigs":
        return [(f"eig[{i}] ({a.info['which']})", x, y) for i, (x, y) in enumerate(zip(a.value, b.value))]
    if a.query == "flatness":
        return [(f"flatness.{k}", a.value[k], b.value[k]) for k in a.value]
    if a.query == "density":
        return [("density support max", a.info["support"][1], b.info["support"][1])]
    if a.query == "diag":
        return [("diag sum", a.info["sum"], b.info["sum"])]
    label = a.query if a.query != "trace" else f"trace ({a.info.get('method')})"
    return [(label, float(a.value), float(b.value))]


def output_path(cfg: Config, config_path: str | Path, output: str | None) -> Path:
    if output:
        return Path(output)
    if cfg.output:
        return Path(cfg.output)
    return Path("results") / f"{Path(config_path).stem}.json"


def run(cfg: Config, config_path: str | Path = "config.yaml", output: str | None = None,
        progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Execute ``cfg``; returns the JSON document that is also written to the output path.

    With a ``reparam``, every query runs in θ and, independently, in ψ = φ⁻¹(θ) coordinates, and the document
    gains an ``invariance`` table pairing them. Finished queries and Lanczos states are checkpointed next to the
    output; ``resume=True`` continues an interrupted run from them.
    """
    t0 = time.perf_counter()
    problem, train_info, optimizer = build_problem(cfg)
    spec = trained_spec(spec_of(cfg), problem.model, train_info is not None)
    path = output_path(cfg, config_path, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = QueryCheckpoint(path.with_name(path.name + ".ckpt"), cfg.model_dump(mode="json"), resume)
    with theta_coordinates(cfg, problem, spec, optimizer) as theta:
        systems = [theta]
        if cfg.reparam is not None:
            r = make_reparam(cfg.reparam.kind, **cfg.reparam.kwargs)
            systems.append(Coordinates("psi", reparametrize(problem, r), cfg.seed, theta=theta))
        by_system: dict[str, list[Result]] = {}
        for c in systems:
            by_system[c.name] = []
            for i, q in enumerate(cfg.queries):
                key = f"{c.name}-{i}"
                r = ckpt.load(key)
                if r is None:
                    r = run_query(q, c, cfg, progress, ckpt.lanczos_path(key))
                    r = replace(r, backend=_backend_label(cfg))
                    ckpt.save(key, r)
                by_system[c.name].append(r)
        pool = getattr(theta.problem, "pool", None)
        stats = {"retried_worker_calls": pool.retries} if pool is not None else None
    results = [r for rs in by_system.values() for r in rs]
    doc: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "problem": {"dim": problem.dim, "samples": problem.num_samples, "batches": problem.num_batches,
                    "loss": problem.loss.name, "reduction": problem.reduction, "dtype": str(problem.dtype),
                    "loss_value": problem.value(), "params": list(problem.param_names)},
        "train": train_info,
        "backend": stats,
        "results": [r.to_dict() for r in results],
    }
    if cfg.reparam is not None:
        doc["invariance"] = invariance_rows(by_system["theta"], by_system["psi"])
    densities = [r for r in results if r.query == "density"]
    if densities and cfg.plot:
        from .plot import plot_densities

        png = path.with_name(path.stem + "_density.png")
        plot_densities(densities, png)
        doc["plots"] = [str(png)]
    doc["seconds"] = time.perf_counter() - t0
    path.write_text(json.dumps(to_jsonable(doc), indent=2))
    ckpt.finish()
    doc["output"] = str(path)
    return doc


def _backend_label(cfg: Config) -> str:
    b = cfg.backend
    if b.kind == "local":
        return "local"
    return f"ray-data[{b.workers}]" if b.mode == "data" else f"ray-pipeline[{b.stages}]"
