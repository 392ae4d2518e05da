"""Pipeline mode, coordinator side: stage actors, the sharded vector space, and the pipelined operator.

Vectors are :class:`ShardedVector` handles; their shards stay on the stage actors and every vector-space
operation is one round of remote calls returning at most a few scalars, so Lanczos, Hutch++, XTrace, SLQ and CG
run unchanged (DESIGN §4). Freed handles release their shards.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
import weakref
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..catalogue import Curvature, MetricKind, names
from ..errors import NonFiniteError, ProblemError, ShapeError
from ..geometry.metrics.base import Metric
from ..geometry.metrics.curvature import SolvedMetric
from ..geometry.metrics.staged import check_staged_metric
from ..problem.base import StagedProblem
from ..problem.spec import ProblemSpec
from ..solvers.space import assemble, select
from .cluster import ClusterError, resources_per_worker, wait_alive, wait_scheduled
from .stages import StageWorker

#: how often a product is run again after a stage was lost
RETRIES = 2
#: what the stages compute: curvature products, and the metrics built from them or from the stages' own blocks
KINDS = (Curvature.HESSIAN.value, Curvature.GGN.value, Curvature.FISHER.value)

class ShardedVector:
    """A handle to a vector whose shards live on the stage actors."""

    __slots__ = ("id", "space", "__weakref__")

    def __init__(self, space: ShardedSpace, vid: int) -> None:
        self.id, self.space = vid, space
        weakref.finalize(self, space._release, vid)


class ShardedSpace:
    """The :class:`~curvdist.solvers.space.VectorSpace` of stage-sharded vectors."""

    def __init__(self, actors: list[Any], dims: list[int], dtype: torch.dtype,
                 segments: list[list[tuple[int, int]]] | None = None) -> None:
        import ray

        self.ray, self.actors, self.dims, self.dtype = ray, actors, dims, dtype
        self.dim = sum(dims)
        if segments is None:  # stage after stage
            offsets = np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(int).tolist()
            segments = [[(o, d)] for o, d in zip(offsets, dims)]
        #: per stage, the (offset, length) pieces of the problem's flat layout it owns, in its own order
        self.segments = segments
        self._ids = itertools.count(1)
        self._garbage: list[int] = []

    # ------------------------------------------------------------ plumbing
    def _new(self) -> ShardedVector:
        return ShardedVector(self, next(self._ids))

    def _release(self, vid: int) -> None:
        self._garbage.append(vid)

    def flush(self) -> None:
        """Free the shards of dropped handles on every stage now (one asynchronous call each; an actor runs it
        before any later call). Shards of a 100M-parameter model are hundreds of MB, so nothing is batched."""
        if self._garbage:
            ids, self._garbage = self._garbage, []
            for a in self.actors:
                a.free.remote(ids)

    def _all(self, method: str, *args: Any) -> list[Any]:
        self.flush()
        try:
            return self.ray.get([getattr(a, method).remote(*args) for a in self.actors])
        except self.ray.exceptions.RayActorError as e:
            raise ClusterError(f"a stage actor died during '{method}': pipeline vectors live on the actors, so the "
                               "solve must restart from its last checkpoint") from e

    # ------------------------------------------------------------ the interface
    def dot(self, x: ShardedVector, y: ShardedVector) -> float:
        return float(sum(self._all("dot", x.id, y.id)))

    def dots(self, xs: list[ShardedVector], y: ShardedVector) -> np.ndarray:
        if not xs:
            return np.zeros(0)
        return np.sum(np.array(self._all("dots", [x.id for x in xs], y.id)), axis=0)

    def norm(self, x: ShardedVector) -> float:
        return float(np.sqrt(max(self.dot(x, x), 0.0)))

    def axpy(self, a: float, x: ShardedVector, y: ShardedVector) -> ShardedVector:
        out = self._new()
        self._all("axpy", out.id, float(a), x.id, y.id)
        return out

    def scale(self, a: float, x: ShardedVector) -> ShardedVector:
        out = self._new()
        self._all("scale", out.id, float(a), x.id)
        return out

    def mul(self, x: ShardedVector, y: ShardedVector) -> ShardedVector:
        out = self._new()
        self._all("mul", out.id, x.id, y.id)
        return out

    def zeros(self) -> ShardedVector:
        out = self._new()
        self._all("zeros", out.id)
        return out

    def random(self, seed: int, kind: str = "rademacher") -> ShardedVector:
        out = self._new()
        self._all("random", out.id, int(seed), kind)
        return out

    def lincomb(self, coeffs: np.ndarray, xs: list[ShardedVector]) -> ShardedVector:
        out = self._new()
        self._all("lincomb", out.id, [float(c) for c in coeffs], [x.id for x in xs])
        return out

    def to_tensor(self, x: ShardedVector) -> Tensor:
        return assemble(self.dim, list(zip(self.segments, self._all("get", x.id))))

    def from_tensor(self, t: Tensor) -> ShardedVector:
        if t.ndim != 1 or t.numel() != self.dim:
            raise ShapeError(f"expected a flat vector of length {self.dim}, got {tuple(t.shape)}")
        out = self._new()
        t = t.cpu()
        self.ray.get([a.put.remote(out.id, select(t, segs)) for a, segs in zip(self.actors, self.segments)])
        return out


class StagePool:
    """S :class:`StageWorker` actors built from a spec, with restarts."""

    def __init__(self, spec: ProblemSpec, stages: int, max_restarts: int = 2, micro_batches: int | None = None,
                 snapshot_dir: str | None = None, snapshots: bool = True) -> None:
        import ray

        from .stacks import split_points

        if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
            raise ProblemError(f"micro_batches must be a positive integer, got {micro_batches!r}")
        with torch.random.fork_rng(devices=[]):
            split_points(spec.build_model(), stages)  # validate on the coordinator: a clear error, early
        cls = ray.remote(max_restarts=max_restarts, max_task_retries=0, **resources_per_worker())(StageWorker)
        self.ray, self.spec, self.micro_batches = ray, spec, micro_batches
        self._own_dir = snapshots and snapshot_dir is None
        self.snapshot_dir = (tempfile.mkdtemp(prefix="curvdist-stages-") if self._own_dir else
                             snapshot_dir if snapshots else None)
        self.retries = 0
        self.actors = [cls.remote(spec, i, stages, micro_batches, self.snapshot_dir) for i in range(stages)]
        wait_scheduled(ray, self.actors, "pipeline stages")
        try:
            for a in self.actors:  # one at a time: a stage holds the whole model while it builds
                ray.get(a.build.remote())
            self.infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if getattr(e, "cause", None) is not None else e) from None
        owned = sum(i["dim"] for i in self.infos)
        if owned != self.infos[0]["total"]:
            raise ProblemError(f"the stages own {owned} of the problem's {self.infos[0]['total']} parameters")
        self.space = ShardedSpace(self.actors, [i["dim"] for i in self.infos], getattr(torch, spec.dtype),
                                  [[tuple(seg) for seg in i["segments"]] for i in self.infos])
        self.num_samples = self.infos[-1]["samples"]
        self.num_batches = self.infos[-1]["batches"]  # micro-batches, in order
        #: tied parameters: (name, owner stage, user stage)
        self.ties = [(n, o, s) for s, i in enumerate(self.infos) for n, o in i["foreign"].items()]
        self.products = 0
        self.product_s = 0.0
        self.busy_s = [0.0] * stages
        self.version = 0  # parameter updates made by pipeline training (:mod:`.pipeline_train`)

    def get(self, refs: list[Any]) -> list[Any]:
        """``ray.get`` with a stage's exception raised as itself."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            raise (e.cause if getattr(e, "cause", None) is not None else e) from None

    def tied_parts(self) -> list[list[Any]]:
        """Per stage, (name, ref) of the later stages' parts of the tied weights it owns, for ``finish``."""
        parts: list[list[Any]] = [[] for _ in self.actors]
        users = sorted({user for _, _, user in self.ties})
        contributions = {user: self.actors[user].tied_contributions.remote() for user in users}
        for name, owner, user in self.ties:
            parts[owner].append((name, contributions[user]))
        return parts

    def params_flat(self) -> Tensor:
        """θ, flat in the problem's order, gathered from the stages (for tests and checkpoints)."""
        return assemble(self.space.dim, list(zip(self.space.segments,
                                                 self.get([a.params_flat.remote() for a in self.actors]))))

    def sync_ties(self) -> None:
        """Send the owners' current values of tied weights to the stages holding copies."""
        self.get([self.actors[user].set_param_value.remote(name, self.actors[owner].param_value.remote(name))
                  for name, owner, user in self.ties])

    def check_versions(self) -> None:
        """Every stage holds the parameters of the latest update: a stage Ray restarted after training steps
        rebuilt the initial parameters, and computing with it would be silently wrong."""
        if self.version == 0:
            return
        versions = self.get([a.param_version.remote() for a in self.actors])
        stale = [s for s, v in enumerate(versions) if v != self.version]
        if stale:
            raise ClusterError(f"pipeline stages {stale} were restarted after {self.version} training updates and "
                               f"hold their initial parameters; restart the run from a checkpoint")

    def reset_meters(self) -> None:
        """Start a new window of busy times and peak memory on every stage."""
        self.ray.get([a.reset_meters.remote() for a in self.actors])
        self.products, self.product_s = 0, 0.0

    def meters(self) -> dict[str, Any]:
        """Stage utilization (busy time / product wall time) and per-stage memory since :meth:`reset_meters`."""
        m = self.ray.get([a.meters.remote() for a in self.actors])
        wall = self.product_s
        return {"stages": len(self.actors), "micro_batches": self.num_batches, "products": self.products,
                "product_wall_s": wall,
                "utilization": [round(x["busy_s"] / wall, 4) if wall else None for x in m],
                "memory": [x["memory"] for x in m]}

    def wait_alive(self) -> None:
        """Block until Ray has restarted every stage that died (each rebuilds itself and reloads its shards)."""
        for i, a in enumerate(self.actors):
            wait_alive(self.ray, a, f"stage {i}")

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._own_dir and self.snapshot_dir:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)


class PipelineProblem(StagedProblem):
    """The problem of a :class:`StagePool`: the model split into stages on Ray actors, vectors sharded by stage.

    ``cd.operator`` gives the pipelined ``hessian``/``ggn``/``fisher``; ``cd.metric`` the CG-solved ``ggn``/``fisher``
    metrics and the stage-local ``kfac``/``kflr`` blocks and exact diagonals (``diag_ggn``, ``diag_fisher_mc``,
    ``empirical_fisher_diag``), on sequential and traced stacks, tied weights included. Anything else — other curvature or metric kinds, the
    gradient (and so ``grad_norm``), reparametrizations, ``block_spectra``, ``RiemannianSGD`` — is refused when
    asked, with an error naming what pipeline mode offers.
    """

    def __init__(self, pool: StagePool, reduction: str | None = None) -> None:
        self.pool = pool
        self.reduction = reduction or pool.spec.reduction
        self.dim, self.dtype = pool.space.dim, pool.space.dtype
        self.num_samples = pool.num_samples

    @property
    def backend(self) -> str:
        return f"ray-pipeline[{len(self.pool.actors)}]"

    def curvature_operator(self, kind: str, check_determinism: bool = True, **options: Any) -> PipelineOperator:
        if options:
            raise ProblemError(f"pipeline operators take no options, got {sorted(options)}")
        return PipelineOperator(self.pool, kind, self.reduction)

    def curvature_metric(self, kind: str, damping: float = 0.0, **options: Any) -> Metric | None:
        check_staged_metric(kind, damping, options, "pipeline mode")
        if kind == MetricKind.EUCLIDEAN:
            return None
        if kind in (MetricKind.GGN, MetricKind.FISHER):
            return PipelineMetric(PipelineOperator(self.pool, kind, self.reduction), damping, **options)
        return PipelineBlockMetric(self.pool, kind, damping, reduction=self.reduction, **options)

    def backend_stats(self) -> dict[str, Any] | None:
        return {"retried_stage_products": self.pool.retries}

    def memory_reset(self) -> None:
        super().memory_reset()
        self.pool.reset_meters()

    def memory_records(self) -> list[dict[str, Any]]:
        return super().memory_records() + self.pool.meters()["memory"]

    def value(self) -> float:
        """The loss over all of the pool's data (mean over its loss terms, or their sum), by forward passes."""
        pool = self.pool
        pool.check_versions()
        losses = []
        for b in range(pool.num_batches):
            carry = None
            for a in pool.actors:
                carry = a.grad_forward.remote(b, carry, False)
            losses.append(carry)
        total = float(sum(pool.get(losses)))
        return total / max(sum(pool.infos[-1]["counts"]), 1) if self.reduction == "mean" else total

    def gradient(self) -> Any:
        raise ProblemError("pipeline problems give the loss and curvature products; the gradient lives on the "
                           "stages (pipeline training: curvdist.distributed.pipeline_train), and grad_norm is not "
                           "available")


class PipelineOperator:
    """C v for C ∈ {hessian, ggn, fisher} through the stage pipeline; v and C v are :class:`ShardedVector`."""

    def __init__(self, pool: StagePool, kind: str = "hessian", reduction: str = "mean") -> None:
        """``kind``'s product through ``pool``'s stages, GPipe-scheduled over its micro-batches."""
        if kind not in KINDS:
            raise ProblemError(f"pipeline mode supports the curvature kinds {', '.join(KINDS)}; got {kind!r} "
                               f"(of {', '.join(names(Curvature))})")
        self.pool, self.kind = pool, kind
        self.backend = f"ray-pipeline[{len(pool.actors)}]"
        self.problem = PipelineProblem(pool, reduction)
        self.dim = pool.space.dim
        self.dtype = pool.space.dtype
        self.scale = 1.0 / pool.num_samples if reduction == "mean" else 1.0

    def vector_space(self) -> ShardedSpace:
        return self.pool.space

    def apply_vector(self, v: ShardedVector) -> ShardedVector:
        """C v; a stage lost during the product (restarted by Ray, its shards reloaded from the snapshots) is
        waited for and the product is run again, up to ``RETRIES`` times."""
        pool = self.pool
        pool.check_versions()
        t0 = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                out = self._product(v)
                break
            except pool.ray.exceptions.RayActorError as e:
                if pool.snapshot_dir is None or attempt == RETRIES:
                    raise ClusterError("a stage actor died during a pipelined product"
                                       + (" and stage snapshots are off" if pool.snapshot_dir is None else
                                          f" {RETRIES + 1} times") + "; restart the solve from its last checkpoint"
                                       ) from e
                pool.wait_alive()
                pool.check_versions()
                pool.retries += 1
        if not np.isfinite(pool.space.dot(out, out)):
            raise NonFiniteError(f"the pipelined {self.kind} product is NaN or inf")
        pool.products += 1
        pool.product_s += time.perf_counter() - t0
        return out

    def _product(self, v: ShardedVector) -> ShardedVector:
        """GPipe: every micro-batch's forward pass is submitted, then every backward pass. A Ray actor runs its
        calls in submission order, so stage s works on micro-batch m while stage s+1 works on m−1 (and the
        other way round in the backward pass); each call passes one object to the next stage."""
        ray, actors, space, pool = self.pool.ray, self.pool.actors, self.pool.space, self.pool
        space.flush()  # before the stages write their snapshots: dropped vectors are not written
        out = space._new()
        tied: list[dict[str, Any]] = [{} for _ in actors]
        for name, owner, user in pool.ties:
            tied[user][name] = actors[owner].tied_part.remote(v.id, name)
        started = [a.begin.remote(v.id, out.id, t) for a, t in zip(actors, tied)]
        mode = "hessian" if self.kind == "hessian" else "ggn"
        M = pool.num_batches
        for b in range(M):
            carry = None
            for a in actors:
                carry = a.forward.remote(b, carry, v.id)
        pending = []
        for b in range(M):
            cot = None
            for a in reversed(actors):
                cot = a.backward.remote(b, cot, mode, out.id)
            pending.append(cot)
        done = [a.finish.remote(out.id, self.scale, p) for a, p in zip(actors, pool.tied_parts())]
        try:
            ray.get(started)
            ray.get(pending)
            ray.get(done)
        except ray.exceptions.RayActorError:
            raise
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if getattr(e, "cause", None) is not None else e) from None
        return out

    def product_info(self) -> dict[str, Any]:
        """The schedule, the stage utilization and the per-stage memory of the products since the pool's meters
        were last reset."""
        meters = self.pool.meters()
        meters.pop("memory")  # reported per query in info["memory"], with the coordinator's line
        return {"mode": "pipeline", **meters}


class PipelineMetric(SolvedMetric):
    """M_δ = C + δI for a pipelined curvature C (``ggn``/``fisher``), applied through the pipeline and solved by
    CG in the sharded space: a metric without a cheap factor, so queries run Lanczos in its inner product."""

    def __init__(self, op: PipelineOperator, damping: float = 0.0, cg_tol: float = 1e-12,
                 cg_maxiter: int | None = None) -> None:
        super().__init__(op, damping, kind=op.kind, cg_tol=cg_tol, cg_maxiter=cg_maxiter)


class PipelineBlockMetric(Metric):
    """A stage-local metric of a pipelined model — KFAC/KFLR M_δ = blockdiag(G ⊗ A) + δI, EKFAC (two passes: factors
    and their eigenbases, then the corrected eigenvalues; option ``fisher_type``) or an exact diagonal
    (``diag_ggn``, ``diag_fisher_mc``, ``empirical_fisher_diag``) + δI — every block computed, eigendecomposed and
    applied on the stage actor that holds its parameters (:mod:`curvdist.distributed.stage_blocks`; weights tied
    across stages get the statistics of all their uses); the coordinator only schedules the per-batch forward and
    backward passes and adds the stages' log-determinants. Equal to the local own-kernel metric of the same kind
    (``backend="torch"``; the same sampled labels)."""

    has_factor = True

    _ids = itertools.count()

    def __init__(self, pool: StagePool, kind: str, damping: float = 0.0, mc_samples: int = 1, seed: int = 0,
                 reduction: str = "mean", fisher_type: str = "mc") -> None:
        super().__init__(pool.space.dim, pool.space.dtype, "cpu", damping)
        self.pool, self.kind, self.id = pool, kind, next(self._ids)
        self.has_inv_sqrt = True
        ray, actors = pool.ray, pool.actors
        S = len(actors)
        owners: dict[int, list[int]] = {}  # owner stage → the later stages using its tied weights
        for _, owner, user in pool.ties:
            owners.setdefault(owner, []).append(user)
        if kind == MetricKind.EKFAC:
            from ..geometry.metrics.ekfac import statistic_of

            statistic_of(fisher_type, mc_samples)
        squares = kind not in (MetricKind.KFAC, MetricKind.KFLR, MetricKind.EKFAC)  # diagonal: per-sample squares
        scale = 1.0 / pool.num_samples if reduction == "mean" else 1.0

        def one_pass(squares: bool) -> None:
            """Forward and backward passes of every micro-batch through the stages; with ``squares`` the tied
            weights' per-sample gradients go to their owners per micro-batch."""
            pending = []
            for b in range(pool.num_batches):
                x = None
                for a in actors:
                    x = a.metric_forward.remote(b, x)
                g = actors[-1].metric_start.remote(b, x, int(mc_samples), int(seed))
                parts: dict[int, Any] = {}
                for s in reversed(range(S)):
                    extra = [parts[u] for u in sorted(set(owners.get(s, ())))] if squares else []
                    g = actors[s].metric_backward.remote(b, g, *extra)
                    if squares and pool.infos[s]["foreign"]:
                        parts[s] = actors[s].metric_tied_samples.remote(b)
                pending.append(g)
            ray.get(pending)

        def tied_sums() -> dict[int, list[Any]]:
            """Per owner stage the Kronecker sums of its tied weights' uses on later stages."""
            sums = {s: actors[s].metric_tied_sums.remote() for s in range(S) if pool.infos[s]["foreign"]}
            return {s: [sums[u] for u in sorted(set(owners.get(s, ())))] for s in range(S)}

        try:
            ray.get([a.metric_begin.remote(kind, fisher_type) for a in actors])
            one_pass(squares)
            parts = {s: [] for s in range(S)} if squares else tied_sums()
            if kind == MetricKind.EKFAC:  # factors and bases on the stages, then the corrected eigenvalues
                ray.get([a.metric_correction_begin.remote(scale, pool.num_samples, *parts[s])
                         for s, a in enumerate(actors)])
                one_pass(True)
                parts = {s: [] for s in range(S)}
            logdets = [a.metric_finish.remote(self.id, scale, pool.num_samples, float(damping), *parts[s])
                       for s, a in enumerate(actors)]
            self._logdet = float(sum(ray.get(logdets)))
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if getattr(e, "cause", None) is not None else e) from None
        weakref.finalize(self, _release_metric, actors, self.id)

    def _apply(self, v: ShardedVector, method: str) -> ShardedVector:
        space = self.pool.space
        out = space._new()
        try:
            space._all("metric_apply", self.id, out.id, v.id, method)
        except self.pool.ray.exceptions.RayTaskError as e:
            raise (e.cause if getattr(e, "cause", None) is not None else e) from None
        return out

    def apply_undamped(self, v: ShardedVector) -> ShardedVector:  # type: ignore[override]
        return self._apply(v, "apply_undamped")

    def apply(self, v: ShardedVector) -> ShardedVector:  # type: ignore[override]
        return self._apply(v, "apply")

    def solve(self, v: ShardedVector) -> ShardedVector:  # type: ignore[override]
        return self._apply(v, "solve")

    def inv_factor_apply(self, v: ShardedVector) -> ShardedVector:  # type: ignore[override]
        return self._apply(v, "inv_factor_apply")

    def inv_factor_t_apply(self, v: ShardedVector) -> ShardedVector:  # type: ignore[override]
        """W⁻ᵀ v (= W⁻¹ v except for structured blocks with a non-constant diagonal, whose factor is not
        symmetric: :mod:`curvdist.geometry.structured`)."""
        return self._apply(v, "inv_factor_t_apply")

    def inv_sqrt_apply(self, v: ShardedVector) -> ShardedVector:  # type: ignore[override]
        return self._apply(v, "inv_sqrt_apply")

    def logdet(self) -> float:
        return self._logdet


def _release_metric(actors: list[Any], mid: int) -> None:
    """Drop a collected metric's blocks on the stages (best effort: the pool may be gone)."""
    try:
        for a in actors:
            a.metric_release.remote(mid)
    except Exception:  # noqa: BLE001 - shutdown order; nothing to release any more
        pass
