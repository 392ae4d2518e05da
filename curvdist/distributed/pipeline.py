"""Pipeline mode, coordinator side: stage actors, the pipelined operator and the stage metrics.

Vectors are :class:`~.sharded_space.ShardedVector` handles whose shards stay on the stage actors
(:mod:`curvdist.distributed.sharded_space`); solvers run unchanged on them (DESIGN §4).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..catalogue import Curvature, MetricKind, names
from ..errors import NonFiniteError, ProblemError
from ..geometry.metrics.base import Metric
from ..geometry.metrics.curvature import SolvedMetric
from ..geometry.metrics.staged import check_staged_metric
from ..problem.base import StagedProblem
from ..problem.spec import ProblemSpec
from ..resources import release_free_memory
from ..solvers.space import assemble
from .cluster import ClusterError, is_lost, resources_per_worker, wait_scheduled
from .materialize import publish
from .sharded_space import ShardedBasis, ShardedSpace, ShardedVector
from .stacks import Balance

__all__ = ["StagePool", "PipelineProblem", "PipelineOperator", "PipelineMetric", "PipelineBlockMetric",
           "ShardedSpace", "ShardedVector", "ShardedBasis"]
from .stages import StageWorker

#: how often a product is run again after a stage was lost
RETRIES = 2
#: what the stages compute: curvature products, and the metrics built from them or from the stages' own blocks
KINDS = (Curvature.HESSIAN.value, Curvature.GGN.value, Curvature.FISHER.value)

class StagePool:
    """S :class:`StageWorker` actors built from a spec, with restarts.

    ``snapshots``: the stages write their vector shards to ``snapshot_dir`` (default: a temporary directory) at the
    start of every ``snapshot_every``-th product, so a lost stage is restarted and recovered
    (:mod:`.sharded_space`); off, a lost stage ends the solve. ``skeletons``: stages build the model on the
    ``meta`` device and fetch only their own parameters (files on one node, else Ray's object store:
    :mod:`.materialize`); off, each builds the whole model and drops the rest. ``balance``: cut where the stages
    hold near-equal ``parameters`` (memory), or do near-equal ``compute`` (parameters multiplied with per token;
    embedding tables left out, a tied head counted), or take near-equal ``time`` (each block's forward and backward
    pass timed here on the first micro-batch, :mod:`.unit_times`), or as given: the number of blocks (modules) of
    each stage, a list, which is also how a measured split reaches the stages (``units``). ``basis_on_disk``: the
    stages keep their rows of every Lanczos basis in memory-mapped files of a temporary directory (unlinked at
    once, so they go with the stage) instead of their working memory: the rows live in the page cache, which the
    system can write back and reclaim (CPU stages; for the largest models, whose basis would not fit beside the
    stage's products). ``threads``: torch's intra-op threads per stage
    (default: one per CPU Ray gives the stage, i.e. one). More threads than the stage's CPU let a stage use the cores
    its neighbours leave idle while the pipeline fills and drains, and while it does more work than they; the
    stages then wait for their OpenMP threads passively (``OMP_WAIT_POLICY=PASSIVE``), since spinning threads
    would take the cores from each other. Measured on GPT-2 small in 2 stages × 4 micro-batches on 2 cores: a GGN
    product 7.33 s with 2 threads a stage against 8.53 s with 1, a Lanczos step 1.77× local against 1.94×
    (``benchmarks/results/sharded_benchmark_gpt2_small_b8_threads.json``); with 2 spinning threads a stage about
    11 s a product (docs/guides/ray.md)."""

    def __init__(self, spec: ProblemSpec, stages: int, max_restarts: int = 2, micro_batches: int | None = None,
                 snapshot_dir: str | None = None, snapshots: bool = True, snapshot_every: int = 1,
                 skeletons: bool = True, balance: Balance = "parameters", basis_on_disk: bool = False,
                 threads: int | None = None) -> None:
        import ray

        from ..problem.losses import make_loss
        from .stacks import counts_from_cuts, split_points
        from .stages import micro_batches_of
        from .unit_times import resolve_balance

        if micro_batches is not None and (not isinstance(micro_batches, int) or micro_batches < 1):
            raise ProblemError(f"micro_batches must be a positive integer, got {micro_batches!r}")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ProblemError(f"snapshot_every must be a positive integer (products between stage snapshots), "
                               f"got {snapshot_every!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ProblemError(f"threads must be a positive integer (torch threads per stage), got {threads!r}")
        with torch.random.fork_rng(devices=[]):
            model = spec.build_model()

        def example() -> tuple[Any, Callable[[Tensor], Tensor]]:
            _, _, X, y = next(micro_batches_of(spec, micro_batches, torch.device("cpu")))
            loss = make_loss(spec.loss)
            return X, lambda out: loss.per_sample(out, y).sum()

        balance = resolve_balance(balance, stages, model, example)  # measured here when "time", once for all
        #: the modules (sequential stack) or blocks (block stack) of each stage, checked here: a clear error, early
        self.units = counts_from_cuts(model, split_points(model, stages, balance))
        # the model's tensors published (files on one node, else the object store): each stage fetches only what it
        # uses (:mod:`.materialize`)
        weights = publish(ray, model) if skeletons else None
        del model
        release_free_memory()
        options: dict[str, Any] = dict(max_restarts=max_restarts, max_task_retries=0, **resources_per_worker())
        if threads is not None:  # OpenMP reads its environment when the worker process starts
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}}
        cls = ray.remote(**options)(StageWorker)
        self.ray, self.spec, self.micro_batches = ray, spec, micro_batches
        self._own_dir = snapshots and snapshot_dir is None
        self.snapshot_dir = (tempfile.mkdtemp(prefix="curvdist-stages-") if self._own_dir else
                             snapshot_dir if snapshots else None)
        if not isinstance(basis_on_disk, bool):
            raise ProblemError(f"basis_on_disk must be True or False, got {basis_on_disk!r}")
        self.basis_dir = tempfile.mkdtemp(prefix="curvdist-basis-") if basis_on_disk else None
        self.retries = 0
        try:
            self.actors = [cls.remote(spec, i, stages, micro_batches, self.snapshot_dir, balance, self.basis_dir,
                                      threads) for i in range(stages)]
            wait_scheduled(ray, self.actors, "pipeline stages")
            if skeletons:  # each stage holds its own parameters only: build them together
                ray.get([a.build.remote(weights) for a in self.actors])
            else:  # one at a time: a stage holds the whole model while it builds
                for a in self.actors:
                    ray.get(a.build.remote())
            self.infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if getattr(e, "cause", None) is not None else e) from None
        finally:
            if weights is not None:  # the published model goes (a stage Ray restarts builds it whole)
                weights.close()
            del weights
        owned = sum(i["dim"] for i in self.infos)
        if owned != self.infos[0]["total"]:
            raise ProblemError(f"the stages own {owned} of the problem's {self.infos[0]['total']} parameters")
        self.space = ShardedSpace(self.actors, [i["dim"] for i in self.infos], getattr(torch, spec.dtype),
                                  [[tuple(seg) for seg in i["segments"]] for i in self.infos],
                                  snapshot_every if self.snapshot_dir is not None else None,
                                  bases_off_memory=self.basis_dir is not None)
        self.num_samples = self.infos[-1]["samples"]
        self.num_batches = self.infos[-1]["batches"]  # micro-batches, in order
        #: tied parameters: (name, owner stage, user stage)
        self.ties = [(n, o, s) for s, i in enumerate(self.infos) for n, o in i["foreign"].items()]
        self.products = 0
        self.product_s = 0.0
        self.busy_s = [0.0] * stages
        self.version = 0  # parameter updates made by pipeline training (:mod:`.pipeline_train`)

    def get(self, refs: list[Any]) -> list[Any]:
        """``ray.get`` with a stage's exception raised as itself (after the vector operations submitted without
        waiting: :meth:`~.sharded_space.ShardedSpace.settle`)."""
        try:
            return self.space.settle(refs)
        except self.ray.exceptions.RayTaskError as e:
            self.drop_micro_batches()
            raise (e.cause if getattr(e, "cause", None) is not None else e) from None

    def drop_micro_batches(self) -> None:
        """After a failed pass: every stage drops what its forward passes kept for backward passes that will not
        run. A stage runs its calls in submission order, so the failed pass's remaining calls have run by then."""
        try:
            self.ray.get([a.drop_micro_batches.remote() for a in self.actors])
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError):
            pass  # a lost stage holds nothing; it is restarted (and recovered) by the next call that needs it

    def backward_pass(self, micro_batches: int, method: str, args: Callable[[int, int, Any], tuple[Any, ...]],
                      scale: float) -> tuple[list[Any], list[Any]]:
        """Submit every micro-batch's backward call, last stage first: stage s's ``method`` on micro-batch b with
        ``args(s, b, cot)`` (``cot``: the next stage's cotangents). The last micro-batch's call also finishes the
        stage: it gets ``scale`` and ``parts`` (the later stages' parts of the tied weights the stage owns), adds
        them, scales, and returns two refs: (cotangents, the stage's part of ‖out‖²), one call less per stage than
        a separate finish. A tied weight's users are later stages, so their parts are asked for (right after their
        last backward) before the owner's last call is submitted. Returns (the first stage's refs per micro-batch,
        the stages' squared-norm parts)."""
        pending: list[Any] = []
        done: list[Any] = []
        users = {user for _, _, user in self.ties}
        contributions: dict[int, Any] = {}  # user stage → its parts of the tied weights, after its last backward
        for b in range(micro_batches):
            cot = None
            for s in reversed(range(len(self.actors))):
                call = getattr(self.actors[s], method)
                if b < micro_batches - 1:
                    cot = call.remote(*args(s, b, cot))
                    continue
                parts = [(name, contributions[user]) for name, owner, user in self.ties if owner == s]
                cot, norm2 = call.options(num_returns=2).remote(*args(s, b, cot), scale, parts)
                done.append(norm2)
                if s in users:
                    contributions[s] = self.actors[s].tied_contributions.remote()
            pending.append(cot)
        return pending, done

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
        """The units (modules or blocks) of each stage, stage utilization (busy time / product wall time), the time
        each stage's last product calls waited for snapshot writes, each stage's torch threads and per-stage memory
        since :meth:`reset_meters`."""
        m = self.ray.get([a.meters.remote() for a in self.actors])
        wall = self.product_s
        return {"stages": len(self.actors), "units": self.units, "micro_batches": self.num_batches,
                "products": self.products, "product_wall_s": wall,
                "utilization": [round(x["busy_s"] / wall, 4) if wall else None for x in m],
                "snapshot_wait_s": [round(x["snapshot_wait_s"], 4) for x in m],
                "threads": [x["threads"] for x in m], "memory": [x["memory"] for x in m]}

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._own_dir and self.snapshot_dir:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)
        if self.basis_dir:
            shutil.rmtree(self.basis_dir, ignore_errors=True)


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
        """C v; a stage lost during the product (restarted by Ray, recovered from its snapshot and the log since:
        :meth:`~.sharded_space.ShardedSpace.recover`) is waited for and the product is run again, up to
        ``RETRIES`` times."""
        pool, space = self.pool, self.pool.space
        pool.check_versions()
        t0 = time.perf_counter()
        epoch = space.snapshot_point()  # frees dropped vectors first: they are not written
        out = space._new()
        for attempt in range(RETRIES + 1):
            try:
                norm2 = self._product(v, out, epoch)
                break
            except Exception as e:  # noqa: BLE001 - a lost stage is recovered, anything else raised as it is
                if not is_lost(pool.ray, e):
                    raise
                if pool.snapshot_dir is None or attempt == RETRIES:
                    raise ClusterError("a stage actor died during a pipelined product"
                                       + (" and stage snapshots are off" if pool.snapshot_dir is None else
                                          f" {RETRIES + 1} times") + "; restart the solve from its last checkpoint"
                                       ) from e
                space.recover(e)
                pool.check_versions()
                pool.retries += 1
        space.record_product(lambda restarted: self._replay(v, out, restarted), [v])
        if not np.isfinite(norm2):
            raise NonFiniteError(f"the pipelined {self.kind} product is NaN or inf")
        pool.products += 1
        pool.product_s += time.perf_counter() - t0
        return out

    def _replay(self, v: ShardedVector, out: ShardedVector, restarted: set[int]) -> None:
        """The product again, its output written on the ``restarted`` stages only (the others into scratch)."""
        scratch = self.pool.space._new()
        self._product(v, out, None, [out.id if s in restarted else scratch.id for s in range(len(self.pool.actors))])

    def _product(self, v: ShardedVector, out: ShardedVector, epoch: int | None,
                 outs: list[int] | None = None) -> float:
        """GPipe: every micro-batch's forward pass is submitted, then every backward pass. A Ray actor runs its
        calls in submission order, so stage s works on micro-batch m while stage s+1 works on m−1 (and the
        other way round in the backward pass); each call passes one object to the next stage. ``epoch``: the
        stages first write that snapshot; ``outs``: per stage the vector its shard of C v goes to (default
        ``out``). Returns ‖C v‖² (from the stages' ``finish``; with ``outs``, of what they wrote)."""
        actors, pool = self.pool.actors, self.pool
        outs = outs or [out.id] * len(actors)
        tied: list[dict[str, Any]] = [{} for _ in actors]
        for name, owner, user in pool.ties:
            tied[user][name] = actors[owner].tied_part.remote(v.id, name)
        started = [a.begin.remote(v.id, o, t, epoch) for a, o, t in zip(actors, outs, tied)]
        mode = "hessian" if self.kind == "hessian" else "ggn"
        M = pool.num_batches
        ends = []  # the last stage's forward calls: a forward that failed is the cause of what fails after it
        for b in range(M):
            carry = None
            for a in actors:
                carry = a.forward.remote(b, carry, v.id)
            ends.append(carry)
        pending, done = pool.backward_pass(M, "backward", lambda s, b, cot: (b, cot, mode, outs[s]), self.scale)
        # StagePool.get: a lost stage's RayActorError as it is (the caller recovers), a stage's error as its cause
        pool.get(started)  # the vector operations submitted before the product, too
        pool.get(ends)
        pool.get(pending)
        norm2 = float(sum(pool.get(done)))
        if epoch is not None:  # the stages' last calls returned once the snapshot was on disk
            pool.space.confirm_snapshot()
        return norm2

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
