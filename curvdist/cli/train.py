"""``curvdist train CONFIG``: train with the config's optimizer and evaluate its queries along the way.

Every ``train.log_every`` steps (and at the start and the end) the model is put in eval mode and every query of
the config runs at the current parameters — e.g. invariant flatness, the spectrum of M⁻¹C with the Fisher metric —
together with the full-data loss. The history goes to the JSON output and a PNG of each scalar over the steps.
With ``backend: {kind: ray, mode: data}`` the queries and the ``riemannian_sgd`` metric run on Ray workers (their
parameters moved to the current point before each use); gradients of the training steps are local mini-batches.
With ``mode: pipeline`` everything runs on the stages: the gradient of each batch through them, each stage's step
on its own parameters (``sgd``/``adam``/``adamw`` stage-local, ``riemannian_sgd`` with a pipeline metric), and
the queries at the current point (:mod:`curvdist.distributed.pipeline_train`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..problem import Problem
from ..problem.data import as_batches
from ..problem.spec import ProblemSpec
from ..queries.result import to_jsonable
from ..queries.session import Coordinates, scalars
from ..runtime import set_threads, threads
from .backends import theta_coordinates
from .build import make_optimizer, spec_of, train_step
from .config import Config, MetricSpec
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
    t0 = time.perf_counter()
    spec = spec_of(cfg)
    path = output_path(cfg, config_path, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []

    def record(step: int, target: Any) -> None:
        """Run the queries and the full-data loss at the current parameters (``target``: the problem)."""
        coords = Coordinates("theta", target, cfg.seed)
        results = [run_query(q, coords, cfg, False) for q in cfg.queries]
        entry: dict[str, Any] = {"step": step, "loss": target.value(), "seconds": time.perf_counter() - t0}
        for q, r in zip(cfg.queries, results):
            entry.update({f"{q.kind}/{k}": v for k, v in scalars(r).items()})
        history.append(entry)
        if progress:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("step", "seconds"))
            print(f"step {step:>5}: {shown}", file=sys.stderr if not sys.stdout.isatty() else sys.stdout)

    if cfg.backend.kind == "ray" and cfg.backend.mode == "pipeline":
        stats, choice = _train_pipeline(cfg, spec, record)
    else:
        stats, choice = _train_local(cfg, spec, record)
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


def _logged_steps(cfg: Config, batches: Callable[[], Iterable[Any]], step: Callable[[Any], Any],
                  log: Callable[[int], None]) -> None:
    """``cfg.train.steps`` steps over the batches, cycled, logging at step 0, every ``log_every`` and the end."""
    assert cfg.train is not None
    done = 0
    log(0)
    while done < cfg.train.steps:
        for batch in batches():
            if done >= cfg.train.steps:
                break
            step(batch)
            done += 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                log(done)


def _train_local(cfg: Config, spec: ProblemSpec, record: Callable[[int, Any], None]) -> tuple[Any, Any]:
    """Training steps in this process (local backend, or ray data mode: queries and the metric on workers)."""
    assert cfg.train is not None
    model = spec.build_model()
    data = as_batches(spec.build_data(), cfg.data.batch_size)
    problem = Problem(model, cfg.loss, data, params=cfg.params, reduction=cfg.reduction)
    choice = set_threads(cfg.threads, dim=problem.dim)
    with theta_coordinates(cfg, problem, spec, None) as theta:
        remote = theta.problem if theta.problem is not problem else None
        opt = make_optimizer(model, problem, cfg.train, remote)

        def log(step: int) -> None:
            model.eval()
            if remote is not None:
                remote.set_params(tuple(p.detach() for p in problem.params))
            record(step, remote if remote is not None else Problem(model, cfg.loss, data, params=cfg.params,
                                                                    reduction=cfg.reduction))
            model.train()

        model.train()
        _logged_steps(cfg, problem.batches, lambda batch: train_step(model, problem, opt, *batch), log)
        model.eval()
        return theta.problem.backend_stats(), choice


def _train_pipeline(cfg: Config, spec: ProblemSpec, record: Callable[[int, Any], None]) -> tuple[Any, Any]:
    """Training steps on the pipeline stages (:mod:`curvdist.distributed.pipeline_train`): the gradient through
    the stages, each stage updating its own parameters; the queries run on the stages at the current point."""
    from ..distributed.pipeline_train import PipelineTrainer, check_eval_equals_train

    assert cfg.train is not None
    check_eval_equals_train(spec.build_model())
    choice = set_threads(cfg.threads)
    with theta_coordinates(cfg, None, spec, None) as theta:  # type: ignore[arg-type]
        t = cfg.train
        m = t.metric if t.metric is not None else MetricSpec(kind="kfac", damping=1e-3)
        if t.metric is not None and t.optimizer != "riemannian_sgd":
            raise ConfigError(f"train.metric is used by riemannian_sgd only, not by {t.optimizer}")
        trainer = PipelineTrainer(theta.problem, t.optimizer, t.lr, t.momentum, t.weight_decay,  # type: ignore[arg-type]
                                  m.kind, m.damping, t.refresh, dict(m.options))
        _logged_steps(cfg, lambda: range(trainer.num_batches), trainer.step, lambda s: record(s, theta.problem))
        stats = theta.problem.backend_stats()
        return {**(stats or {}), "train_updates": trainer.steps}, choice
