"""Pipeline mode, training: the loss and its gradient through the stages, and each step applied where the
parameters live.

The gradient of the batch-mean loss L_i = (1/|T_i|) Σ_{t ∈ T_i} ℓ_t (T_i: the loss terms of batch i — samples, or
non-ignored tokens — over its micro-batches) is one forward and one backward pass per micro-batch, GPipe-scheduled
like the products: stage s returns the cotangent of its incoming carry and keeps its shard of ∂L/∂θ; a later
stage using a tied weight returns its part to the owner, which adds it. The stages recompute their forward pass in
the backward call (activation checkpointing), so only the carries travel.

Steps (:class:`PipelineTrainer`):

* ``sgd``, ``adam``, ``adamw``: each stage runs the torch optimizer on the parameters it owns with its gradient
  shard. These optimizers act entry by entry, so the stages' steps are the step of the whole model.
* ``riemannian_sgd``: d = (M + δI)⁻¹ g with a pipeline metric (the stage-local ``kfac``/``kflr``/diagonal blocks,
  or the CG-solved ``ggn``/``fisher``), rebuilt at the current parameters every ``refresh`` steps on all of the
  pool's data, as :class:`~curvdist.optim.RiemannianSGD` builds it locally; heavy-ball momentum b_t = μ b_{t−1} +
  d_t; θ ← θ − lr·d, each stage adding its shard.

After every step the owners send the new values of tied weights to the stages holding copies. Each stage counts
its updates: a stage that Ray restarted rebuilds the *initial* parameters from the spec, so the trainer (and every
product after training) refuses to go on with it rather than compute at the wrong point.

The stages run the model as it was traced, in eval mode: a model with dropout or BatchNorm, whose training
forward differs, is refused (:func:`check_eval_equals_train`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError, NonFiniteError, ProblemError
from ..optim.riemannian_sgd import NONFINITE_DIRECTION
from .pipeline import PipelineProblem, ShardedVector

#: the optimizers the stages run themselves (elementwise)
STAGE_OPTIMIZERS = ("sgd", "adam", "adamw")


def check_eval_equals_train(model: nn.Module) -> None:
    """Refuse a model whose train-mode forward differs from its eval-mode forward (pipeline stages are traced
    in eval mode)."""
    found = sorted({type(m).__name__ for m in model.modules()
                    if (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
                    or isinstance(m, nn.modules.batchnorm._BatchNorm)})
    if found:
        raise ConfigError(f"pipeline training runs the stages in eval mode (they are traced once), but the model "
                          f"has {', '.join(found)} modules whose training forward differs; set their rates to 0 "
                          f"(e.g. the config's resid_pdrop/embd_pdrop/attn_pdrop), or train on the local backend or "
                          f"in ray data mode")


class PipelineTrainer:
    """Optimizer steps on a pipelined model (see the module docstring).

    Args:
        problem: the pipeline problem (its pool's stages hold the parameters and the data).
        optimizer: ``sgd``, ``adam``, ``adamw`` or ``riemannian_sgd``.
        lr, momentum, weight_decay: as for the local optimizers (weight decay: not for ``riemannian_sgd``).
        metric, damping, refresh, metric_options: ``riemannian_sgd``'s metric (a pipeline metric kind).
    """

    def __init__(self, problem: PipelineProblem, optimizer: str, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, metric: str = "kfac", damping: float = 1e-3, refresh: int = 10,
                 metric_options: dict[str, Any] | None = None) -> None:
        if optimizer not in (*STAGE_OPTIMIZERS, "riemannian_sgd"):
            raise ProblemError(f"pipeline training runs {', '.join(STAGE_OPTIMIZERS)} or riemannian_sgd, not "
                               f"{optimizer!r}")
        if not lr > 0:
            raise ProblemError(f"lr must be positive, got {lr!r}")
        if not isinstance(refresh, int) or refresh < 1:
            raise ProblemError(f"refresh must be a positive integer, got {refresh!r}")
        if optimizer == "riemannian_sgd" and weight_decay:
            raise ProblemError("weight_decay is not supported by riemannian_sgd")
        self.problem, self.pool = problem, problem.pool
        self.kind, self.lr, self.momentum = optimizer, lr, momentum
        self.metric_kind, self.damping, self.refresh = metric, damping, refresh
        self.metric_options = dict(metric_options or {})
        self.options: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
        if optimizer == "sgd":
            self.options["momentum"] = momentum
        self.steps = 0
        self.metric: Any = None
        self.buffer: ShardedVector | None = None
        info = self.pool.infos[-1]
        self.batches: dict[int, list[int]] = {}
        for mb, b in enumerate(info["batch_of"]):
            self.batches.setdefault(b, []).append(mb)
        self.counts = info["counts"]

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def loss_and_gradient(self, batch: int) -> tuple[float, ShardedVector]:
        """(L_i, ∂L_i/∂θ) of batch i, the gradient sharded over the stages."""
        loss, g, _ = self._loss_gradient_norm2(batch)
        return loss, g

    def _loss_gradient_norm2(self, batch: int) -> tuple[float, ShardedVector, float]:
        """(L_i, ∂L_i/∂θ, ‖∂L_i/∂θ‖²): the squared norm from the stages' ``finish``, no further round of calls."""
        pool = self.pool
        actors, space = pool.actors, pool.space
        micro = self.batches[batch]
        count = max(sum(self.counts[b] for b in micro), 1)
        pool.check_versions()
        epoch = space.snapshot_point(force=True)  # gradients are not replayed: each starts a snapshot
        out = space._new()
        started = [a.grad_begin.remote(out.id, epoch) for a in actors]
        losses = []
        for b in micro:
            carry = None
            for a in actors:
                carry = a.grad_forward.remote(b, carry)
            losses.append(carry)
        pending, done = pool.backward_pass(len(micro), "grad_backward", lambda s, i, cot: (micro[i], cot, out.id),
                                           1.0 / count)
        pool.get(started)
        results = pool.get([*losses, *pending, *done])
        space.confirm_snapshot()  # the stages' last calls returned once the snapshot was on disk
        space.record_product(None)
        return float(sum(results[:len(losses)])) / count, out, float(sum(results[-len(done):]))

    def step(self, batch: int) -> float:
        """One step on batch i; returns the loss before it."""
        pool = self.pool
        loss, g, g_norm2 = self._loss_gradient_norm2(batch)
        if not np.isfinite(loss) or not np.isfinite(g_norm2):
            raise NonFiniteError(f"the loss or the gradient of batch {batch} is NaN or inf at step {self.steps}")
        if self.kind in STAGE_OPTIMIZERS:
            pool.get([a.optimizer_step.remote(g.id, self.kind, self.options, pool.version) for a in pool.actors])
        else:
            d = self._direction(g)
            pool.get([a.add_to_params.remote(d.id, -self.lr, pool.version) for a in pool.actors])
        pool.version += 1
        pool.sync_ties()
        self.steps += 1
        return loss

    def _direction(self, g: ShardedVector) -> ShardedVector:
        """(M + δI)⁻¹ g, with momentum; M rebuilt every ``refresh`` steps."""
        from ..geometry.metrics import metric

        space = self.pool.space
        if self.metric is None or self.steps % self.refresh == 0:
            self.metric = metric(self.problem, self.metric_kind, self.damping, **self.metric_options)
        d = self.metric.solve(g)
        if not np.isfinite(space.dot(d, d)):
            raise NonFiniteError(NONFINITE_DIRECTION)
        if self.momentum:
            self.buffer = d if self.buffer is None else space.axpy(self.momentum, self.buffer, d)
            d = self.buffer
        return d
