"""``curvdist train CONFIG``: train with the config's optimizer and evaluate its queries along the way.

Every ``train.log_every`` steps (and at the start and the end) the model is put in eval mode and every query of
the config runs at the current parameters — e.g. invariant flatness, the spectrum of M⁻¹C with the Fisher metric —
together with the full-data loss. The history goes to the JSON output and a PNG of each scalar over the steps.
With ``backend: {kind: ray, mode: data}`` the queries and the ``riemannian_sgd`` metric run on Ray workers (their
parameters moved to the current point before each use); gradients of the training steps are local mini-batches.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..problem import Problem
from ..problem.data import as_batches
from ..queries.result import to_jsonable
from ..queries.session import Coordinates, scalars
from ..runtime import set_threads, threads
from .backends import theta_coordinates
from .build import make_optimizer, spec_of, train_step
from .config import Config
from .runner import output_path, run_query, versions


def train_and_log(cfg: Config, config_path: str | Path = "config.yaml", output: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run ``cfg.train`` and log ``cfg.queries`` every ``log_every`` steps; returns the JSON document written.
    Runs with ``cfg.threads`` intra-op threads (recorded in the document), restored afterwards."""
    with threads(cfg.threads):
        return _train_and_log(cfg, config_path, output, progress)


def _train_and_log(cfg: Config, config_path: str | Path, output: str | None, progress: bool) -> dict[str, Any]:
    if cfg.train is None:
        raise ConfigError("curvdist train needs a 'train' section (optimizer, lr, steps, log_every)")
    if cfg.reparam is not None:
        raise ConfigError("curvdist train runs in the model's coordinates; remove 'reparam' (use a metric for "
                          "invariant queries)")
    if cfg.backend.kind == "ray" and cfg.backend.mode == "pipeline":
        raise ConfigError("curvdist train supports the local backend and ray data mode, not pipeline mode")
    t0 = time.perf_counter()
    spec = spec_of(cfg)
    model = spec.build_model()
    data = as_batches(spec.build_data(), cfg.data.batch_size)
    problem = Problem(model, cfg.loss, data, params=cfg.params, reduction=cfg.reduction)
    choice = set_threads(cfg.threads, dim=problem.dim)
    path = output_path(cfg, config_path, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    with theta_coordinates(cfg, problem, spec, None) as theta:
        remote = theta.problem if theta.problem is not problem else None
        opt = make_optimizer(model, problem, cfg.train, remote)

        def log(step: int) -> None:
            model.eval()
            if remote is not None:
                remote.set_params(tuple(p.detach() for p in problem.params))
            target = remote if remote is not None else Problem(model, cfg.loss, data, params=cfg.params,
                                                               reduction=cfg.reduction)
            coords = Coordinates("theta", target, cfg.seed)
            results = [run_query(q, coords, cfg, False) for q in cfg.queries]
            entry: dict[str, Any] = {"step": step, "loss": target.value(), "seconds": time.perf_counter() - t0}
            for q, r in zip(cfg.queries, results):
                entry.update({f"{q.kind}/{k}": v for k, v in scalars(r).items()})
            history.append(entry)
            if progress:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("step", "seconds"))
                print(f"step {step:>5}: {shown}", file=sys.stderr if not sys.stdout.isatty() else sys.stdout)
            model.train()

        step = 0
        log(0)
        model.train()
        while step < cfg.train.steps:
            for X, y in problem.batches():
                if step >= cfg.train.steps:
                    break
                train_step(model, problem, opt, X, y)
                step += 1
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    log(step)
        model.eval()
        stats = theta.problem.backend_stats()
    doc: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "versions": versions(),
                           "train": {"optimizer": cfg.train.optimizer, "lr": cfg.train.lr, "steps": cfg.train.steps,
                                     "final_loss": history[-1]["loss"]},
                           "history": history, "backend": stats, "threads": choice.as_dict()}
    if cfg.plot:
        from .plot import plot_history

        png = path.with_name(path.stem + "_history.png")
        plot_history(history, png, title=f"{cfg.train.optimizer} (lr {cfg.train.lr:g})")
        doc["plots"] = [str(png)]
    doc["seconds"] = time.perf_counter() - t0
    path.write_text(json.dumps(to_jsonable(doc), indent=2))
    doc["output"] = str(path)
    return doc
