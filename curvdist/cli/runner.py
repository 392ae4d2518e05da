"""Run a validated config: build the problem, run every query, collect results, write JSON (and plots)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..geometry.reparam import make_reparam, reparametrize
from ..queries import Result, session
from ..queries.result import to_jsonable
from ..queries.session import Coordinates, invariance_rows
from ..runtime import set_threads, threads
from .backends import theta_coordinates, trained_spec
from .build import build_problem, spec_of
from .checkpoint import QueryCheckpoint
from .config import Config


def versions() -> dict[str, str]:
    import scipy

    return {"curvdist": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}


def run_query(q: Any, coords: Coordinates, cfg: Config, progress: bool, lanczos_file: Path | None = None
              ) -> Result:
    """One query of the config in one coordinate system (see :func:`curvdist.queries.session.run_query`)."""
    return session.run_query(q, coords, cfg.curvature, cfg.metric, cfg.seed, progress, lanczos_file,
                             cfg.backend.checkpoint_every)


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
    output; ``resume=True`` continues an interrupted run from them. The run uses ``cfg.threads`` intra-op threads
    (``auto``: :func:`curvdist.runtime.thread_choice`, recorded in the document), restored afterwards.
    """
    with threads(cfg.threads):  # until the problem's size is known: by the free cores alone
        return _run(cfg, config_path, output, progress, resume)


def _run(cfg: Config, config_path: str | Path, output: str | None, progress: bool, resume: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    problem, train_info, optimizer = build_problem(cfg)
    choice = set_threads(cfg.threads, dim=problem.dim)
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
                    ckpt.save(key, r)
                by_system[c.name].append(r)
            c.release()  # the next system's queries do not need this one's operators and metrics kept
        stats = theta.problem.backend_stats()
    results = [r for rs in by_system.values() for r in rs]
    doc: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "problem": {"dim": problem.dim, "samples": problem.num_samples, "batches": problem.num_batches,
                    "loss": problem.loss.name, "reduction": problem.reduction, "dtype": str(problem.dtype),
                    "loss_value": problem.value(), "params": list(problem.param_names)},
        "train": train_info,
        "backend": stats,
        "threads": choice.as_dict(),
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
