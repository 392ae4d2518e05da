"""A metric whose statistics are reduced over a data-parallel process group, as a ``problem -> Metric`` callable
for :class:`curvdist.optim.RiemannianSGD` (``metric=``).

Every rank passes the same metric batch; at each refresh every rank takes its contiguous shard of it, computes
the local statistics on a clean replica of the model (in the metric's dtype, e.g. float32 under bf16 training) and
``all_reduce``-s them, so all ranks build the same metric as one process would on the whole batch:

* ``kfac``/``kflr``: local Kronecker sums (:func:`~curvdist.geometry.metrics.kfac.kfac_sums`) → all_reduce →
  :func:`~curvdist.geometry.metrics.statistics.kronecker_from_sums` with the global sample count;
* ``diag_ggn``, ``diag_fisher_mc``, ``empirical_fisher_diag``: local raw diagonal sums → all_reduce →
  :class:`~curvdist.geometry.metrics.base.DiagonalMetric`;
* ``fisher``, ``ggn``, ``fisher_mc``, ``empirical_fisher``, ``euclidean``: ``cd.metric`` on the data-parallel
  problem, whose products are all-reduced.

Sampled statistics (``kfac``, ``diag_fisher_mc``, ``fisher_mc``) draw their labels per shard: a different sample
than one process would draw. The reduced statistics of the last build are kept (:meth:`state_dict`) so that a
checkpoint restores the very same metric (:meth:`rebuild`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...catalogue import CURVATURE_METRICS, DIAGONAL_METRICS, KRONECKER_METRICS, MetricKind, names
from ...errors import MetricError
from ...geometry.metrics import Metric, metric
from ...geometry.metrics.base import DiagonalMetric
from ...geometry.metrics.statistics import kronecker_from_sums, reduced_diagonal, reduced_kronecker
from ...problem.data import as_batches
from ...problem.losses import Loss
from ...problem.problem import Problem
from ...problem.sharded import ShardedProblem
from .data_parallel import concatenate, split_problem
from .engine import torch_linear
from .replica import Replica

KRONECKER = tuple(names(KRONECKER_METRICS))
DIAGONAL = tuple(names(DIAGONAL_METRICS))
MATRIX_FREE = (MetricKind.EUCLIDEAN.value, *names(CURVATURE_METRICS))
KINDS = KRONECKER + (MetricKind.EKFAC.value,) + DIAGONAL + MATRIX_FREE


class DataParallelMetric:
    """``problem -> M_δ`` with M of ``kind`` reduced over the ranks of ``group`` (default: the default group).

    Args:
        kind: one of :data:`KINDS`.
        damping: δ ≥ 0.
        group: the data-parallel process group (the engine's ``data_parallel_group``; None: the default group).
        dtype: the precision of the statistics (the replica's dtype).
        batch_size: batch size for each rank's shard (None: one batch).
        **options: options of the metric (``mc_samples``, ``seed``, ``backend``, ``method``...).
    """

    def __init__(self, kind: str = "kfac", damping: float = 1e-3, *, group: Any = None,
                 dtype: torch.dtype | str = torch.float32, batch_size: int | None = None, **options: Any) -> None:
        if kind not in KINDS:
            raise MetricError(f"a data-parallel metric must be one of {KINDS}, got {kind!r}")
        if not damping >= 0:
            raise MetricError(f"damping must be ≥ 0, got {damping!r}")
        self.kind, self.damping, self.group, self.options = kind, float(damping), group, dict(options)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.batch_size = batch_size
        self._replica: Replica | None = None
        self._replica_of: int | None = None
        self._state: dict[str, Any] | None = None

    def __call__(self, problem: Problem) -> Metric:
        """Build M at the current parameters of ``problem.model`` on ``problem``'s data split across the ranks."""
        return self.build(problem.model, problem.loss, problem.data, problem.param_names, problem.reduction)

    def build(self, model: nn.Module, loss: str | Loss, data: Any, params: Sequence[str] | None = None,
              reduction: str = "mean", owned: Sequence[str] | None = None) -> Metric:
        """Build M for ``model`` at its current parameters on ``data`` (any form :class:`Problem` accepts, the same
        on every rank) split across the ranks. ``model`` is only read (through a clean replica): no forward pass
        runs through it, so DeepSpeed's module hooks never fire. ``owned`` (``kfac``/``kflr``): the blocks this
        rank forms and eigendecomposes (:mod:`.owners`); the metric then acts on the owned parameters' vectors
        only, while the reduced statistics (:meth:`state_dict`) stay those of every parameter."""
        if self._replica is None or self._replica_of != id(model):
            self._replica, self._replica_of = Replica(model, self.dtype), id(model)
        X, y = concatenate(list(as_batches(data)))
        with torch_linear(), self._replica.loaded(model) as replica:
            dp = split_problem(replica, loss, X, y, self.group, params, reduction, self.batch_size)
            return self._build(dp, owned)

    def _build(self, dp: ShardedProblem, owned: Sequence[str] | None = None) -> Metric:
        if self.kind in KRONECKER:
            exact = self.kind == "kflr"
            G, A = reduced_kronecker(dp, exact, self.options)
            self._state = {"kind": self.kind, "G": G, "A": A, "names": list(dp.param_names),
                           "shapes": [list(s) for s in dp.shapes], "scale": dp.scale,
                           "num_samples": dp.num_samples}
            if owned is not None:
                return self._owned_kronecker(self._state, owned)
            return kronecker_from_sums(dp, G, A, self.damping, self.kind)
        if self.kind == MetricKind.EKFAC:  # factors, bases and corrections reduced over the ranks
            M = metric(dp, self.kind, self.damping, **self.options)
            self._state = {"kind": self.kind, "metric": M.state_dict()}
            return M
        if self.kind in DIAGONAL:
            total = reduced_diagonal(dp, self.kind, self.options)
            self._state = {"kind": self.kind, "diagonal_sum": total, "scale": dp.scale}
            return DiagonalMetric(total * dp.scale, self.damping, kind=self.kind)
        self._state = None  # matrix-free metrics keep the problem; they are rebuilt, not restored
        return metric(dp, self.kind, self.damping, **self.options)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any] | None:
        """The reduced statistics of the last build (None before the first build and for matrix-free kinds)."""
        return self._state

    def _owned_kronecker(self, state: dict[str, Any], owned: Sequence[str]) -> Metric | None:
        """The Kronecker blocks of the ``owned`` parameters from the reduced sums (None when this rank owns none)."""
        from ...geometry.metrics.kfac import kfac_from_sums

        shapes = dict(zip(state["names"], state["shapes"]))
        names = [n for n in state["names"] if n in set(owned)]
        if not names:
            return None
        return kfac_from_sums(names, [torch.Size(shapes[n]) for n in names], state["G"], state["A"], state["scale"],
                              state["num_samples"], self.damping, self.kind)

    def rebuild(self, state: dict[str, Any], owned: Sequence[str] | None = None) -> Metric | None:
        """The metric of :meth:`state_dict`'s statistics, identical to the one built then (``owned``: as in
        :meth:`build`)."""
        from ...geometry.metrics.base import DiagonalMetric
        from ...geometry.metrics.kfac import kfac_from_sums

        kind = state.get("kind")
        if kind != self.kind:
            raise MetricError(f"the checkpoint holds a {kind} metric, this preconditioner uses {self.kind}")
        self._state = state
        if kind == MetricKind.EKFAC:
            from ...geometry.metrics.kfac import KFACMetric

            return KFACMetric.from_state_dict(state["metric"])
        if kind in KRONECKER:
            if owned is not None:
                return self._owned_kronecker(state, owned)
            return kfac_from_sums(state["names"], [torch.Size(s) for s in state["shapes"]], state["G"], state["A"],
                                  state["scale"], state["num_samples"], self.damping, kind)
        return DiagonalMetric(state["diagonal_sum"] * state["scale"], self.damping, kind=kind)
