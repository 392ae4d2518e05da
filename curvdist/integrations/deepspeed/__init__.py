"""curvdist inside DeepSpeed training runs (``pip install 'curvdist[deepspeed]'``).

* :class:`CurvatureMonitor`: every N global steps, curvdist queries (the CLI's query objects: eigs, trace,
  logdet, flatness, grad_norm, diag — with any metric, e.g. invariant flatness with the Fisher metric) on a held
  batch, split across the data-parallel ranks and reduced with the engine's process group, logged through the
  engine's monitor (CSV/TensorBoard from the DeepSpeed config). ZeRO 0-3 (ZeRO-3 parameters are gathered for the
  measurement).
* :class:`DeepSpeedRiemannianSGD`: :class:`curvdist.optim.RiemannianSGD` as DeepSpeed's client optimizer, its
  metric statistics reduced over the data-parallel group (:class:`DataParallelMetric`); ZeRO 0-2, fp32 or bf16.
* :func:`save_checkpoint` / :func:`load_checkpoint`: both states in DeepSpeed checkpoints.
* The ``curvdist`` section of the DeepSpeed JSON configures both (:func:`read_section`).

Importing this package does not import DeepSpeed; using it without DeepSpeed raises
:class:`~curvdist.errors.DependencyError` saying how to install it.
"""

from .checkpoint import client_state, load_checkpoint, restore, save_checkpoint
from .config import CurvdistSection, MonitorSpec, PreconditionerSpec, read_section
from .data_parallel import split_problem
from .dependency import INSTALL_HINT, require_deepspeed
from .metric import DataParallelMetric
from .monitor import CurvatureMonitor
from .optimizer import DeepSpeedRiemannianSGD
from .replica import Replica

__all__ = [
    "INSTALL_HINT", "CurvatureMonitor", "CurvdistSection", "DataParallelMetric",
    "DeepSpeedRiemannianSGD", "MonitorSpec", "PreconditionerSpec", "Replica", "client_state",
    "load_checkpoint", "read_section", "require_deepspeed", "restore", "save_checkpoint", "split_problem",
]
