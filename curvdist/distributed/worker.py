"""The data-parallel Ray worker: a model replica and one disjoint data shard, built from a :class:`ProblemSpec`.

Workers compute sum-reduced partial products on their shard; the coordinator adds them (in worker order, so the
result is deterministic) and applies the mean's 1/N. A worker that dies is restarted by Ray (``max_restarts``),
rebuilds itself from its spec and shard in ``__init__``, and the coordinator retries the call.

Fault injection for tests: ``CURVDIST_FAULT="worker=<i>,call=<k>"`` makes worker i exit hard at its k-th product
(only in its first life, so the restarted worker completes the retried call).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ..operators import operator
from ..problem.spec import ProblemSpec

FAULT_ENV = "CURVDIST_FAULT"


def _fault_plan() -> tuple[int, int] | None:
    text = os.environ.get(FAULT_ENV, "")
    if not text:
        return None
    kv = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    return int(kv.get("worker", -1)), int(kv.get("call", kv.get("matvec", -1)))


class ShardWorker:
    """Holds ``spec.build(shard, shards, reduction="sum")``; answers products, gradients and loss sums."""

    def __init__(self, spec: ProblemSpec, shard: int, shards: int) -> None:
        import ray

        self.shard = shard
        self.problem = spec.build(shard, shards, reduction="sum",
                                  device="cuda" if torch.cuda.is_available() else "cpu")
        self._ops: dict[str, Any] = {}
        self.calls = 0
        ctx = ray.get_runtime_context()
        self.restarted = bool(getattr(ctx, "was_current_actor_reconstructed", False))

    def _maybe_fail(self) -> None:
        self.calls += 1
        plan = _fault_plan()
        if plan and plan[0] == self.shard and plan[1] == self.calls and not self.restarted:
            os._exit(1)

    def info(self) -> dict[str, Any]:
        return {"samples": self.problem.num_samples, "dim": self.problem.dim, "restarted": self.restarted}

    def _op(self, kind: str, options: dict[str, Any]) -> Any:
        key = repr((kind, sorted(options.items())))
        if key not in self._ops:
            self._ops[key] = operator(self.problem, kind, check_determinism=False, **options)
        return self._ops[key]

    def matvec(self, kind: str, options: dict[str, Any], v: Tensor) -> Tensor:
        """Σ_{n in shard} C_n v (flat)."""
        self._maybe_fail()
        p = self.problem
        v = v.to(p.device, p.dtype)
        return p.flatten(self._op(kind, options).matvec_params(p.unflatten(v))).cpu()

    def matvec_seconds(self, kind: str, options: dict[str, Any], v: Tensor, repeats: int = 3) -> float:
        """Best wall time of the shard product inside this worker (benchmarks: compute without Ray's overhead)."""
        import time

        p = self.problem
        op = self._op(kind, options)
        u = p.unflatten(v.to(p.device, p.dtype))
        op.matvec_params(u)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            op.matvec_params(u)
            best = min(best, time.perf_counter() - t0)
        return best

    def matmat(self, kind: str, options: dict[str, Any], V: Tensor) -> Tensor:
        """Σ_{n in shard} C_n V for V of shape (k, d)."""
        self._maybe_fail()
        p = self.problem
        V = V.to(p.device, p.dtype)
        parts = self._op(kind, options).matmat_params(
            tuple(t.reshape(V.shape[0], *s) for t, s in zip(torch.split(V, [s.numel() for s in p.shapes], 1),
                                                             p.shapes)))
        return torch.cat([t.reshape(V.shape[0], -1) for t in parts], 1).cpu()

    def gradient(self) -> Tensor:
        self._maybe_fail()
        return self.problem.flatten(self.problem.gradient()).cpu()

    def loss_sum(self) -> float:
        return self.problem.value()

    def set_params(self, flat: Tensor) -> None:
        """Overwrite the replica's selected parameters (the problem aliases them, so products follow)."""
        p = self.problem
        with torch.no_grad():
            for t, new in zip(p.params, p.unflatten(flat.to(p.device, p.dtype))):
                t.copy_(new)

    def factor_eigh(self, factors: dict[str, list[Tensor]]) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """Eigendecompositions of the given layers' Kronecker factors (this worker's share of the layers)."""
        from ..geometry.metrics.kfac import eigh_psd

        return {n: [tuple(t.cpu() for t in eigh_psd(F, n)) for F in fs] for n, fs in factors.items()}

    def diag_metric(self, kind: str, options: dict[str, Any]) -> Tensor:
        """The shard's sum-reduced diagonal of a BackPACK diagonal metric (undamped)."""
        from ..geometry.metrics.backpack_metrics import raw_diagonal

        return raw_diagonal(self.problem, kind, **options).cpu()

    def kfac_sums(self, exact: bool, options: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The shard's summed Kronecker statistics (see :func:`curvdist.geometry.metrics.kfac.kfac_sums`)."""
        from ..geometry.metrics.kfac import kfac_sums

        G, A = kfac_sums(self.problem, exact=exact, **options)
        return ({k: v.cpu() for k, v in G.items()}, {k: (None if v is None else v.cpu()) for k, v in A.items()})
