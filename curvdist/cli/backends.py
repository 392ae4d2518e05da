"""Where a run's θ coordinates live, from the config's ``backend`` section: the local process, or the Python API's
Ray backend (:func:`curvdist.ray_backend`) in data or pipeline mode."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..problem import Problem
from ..problem.spec import ProblemSpec
from ..queries.session import Coordinates
from .config import Config


@contextmanager
def theta_coordinates(cfg: Config, problem: Problem, spec: ProblemSpec, optimizer: Any) -> Iterator[Coordinates]:
    """The θ coordinates of a run on its backend (Ray started and stopped around the block)."""
    b = cfg.backend
    if b.kind == "local":
        yield Coordinates("theta", problem, cfg.seed, optimizer=optimizer)
        return
    if cfg.reparam is not None:
        raise ConfigError("reparam runs on the local backend only (the ψ problem is built by autodiff through φ "
                          "in the coordinator's process)")
    from ..distributed.backend import ray_backend

    actors = b.workers if b.mode == "data" else b.stages
    with ray_backend(b.workers, b.address, b.max_restarts, num_cpus=max(os.cpu_count() or 1, actors)) as backend:
        remote = (backend.data_parallel(spec) if b.mode == "data" else
                  backend.pipeline(spec, b.stages, b.micro_batches, snapshot_every=b.snapshot_every,
                                   balance=b.balance, threads=b.stage_threads))
        yield Coordinates("theta", remote, cfg.seed, optimizer=optimizer if b.mode == "data" else None)


def trained_spec(spec: ProblemSpec, model: nn.Module, trained: bool) -> ProblemSpec:
    """Workers rebuild the model from the spec; after training they also need the trained parameters."""
    return spec.with_state(model) if trained else spec
