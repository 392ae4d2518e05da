"""Curvature of a ZeRO-3 engine without gathering the model: vectors as this rank's partitions, products by
central finite differences of the engine's own forward and backward (DESIGN §7).

For the risk L(θ) = s · Σ_ranks Σ_{n in shard} ℓ_n (s = 1/N or 1) and a direction v,

    Hessian:  H v ≈ D(ε) = [∇L(θ + εv) − ∇L(θ − εv)] / 2ε,
    GGN:      G v ≈ s · Σ_n J_nᵀ Λ_n [f_n(θ + εv) − f_n(θ − εv)] / 2ε   (one backward at θ with ΛJv as the
              output gradient),

with truncation error c₂ε² + c₄ε⁴ + … and rounding error O(u/ε) in the working precision u of the parameters. In
float32 no single step serves every direction: the curvature directions Lanczos converges to can be far more
nonlinear than a random direction (in a GPT-2 the top directions live on the zero-initialized projection biases and
need steps a thousand times smaller), while a random probe, whose product is small, needs a large step to rise
above rounding. So every product chooses its own step and removes the truncation terms it can (Ridders 1982,
Richardson extrapolation with an error estimate): D is taken at ε_i = ε_0 / c^i (c = 2, ε = h·(1 + ‖θ‖)/‖v‖),
each new difference is extrapolated against the previous ones (eliminating ε², ε⁴: T_j = (c^{2j} T_{j−1,i} −
T_{j−1,i−1})/(c^{2j} − 1)), the entry whose change against its neighbours is smallest is the product and that change
its error estimate, and the walk stops when the extrapolations start to diverge (rounding has taken over) or the
estimate reaches ``fd_tol``. The walk starts a few levels above the previous product's step (at most h_max), so a
Krylov sequence pays few levels. Every product's step, error estimate and number of differences are recorded
(``info["product"]["per_product"]``). A fixed ``step`` gives plain central differences at that step instead, with
the error estimated once from one extra difference at 2ε. θ ± εv is formed on each rank's
own slices (:meth:`~.partitions.ZeroPartitions.shifted`), gradients are reduced straight into partitions
(:meth:`~.partitions.ZeroPartitions.gradient`), and inner products are ``all_reduce``-d scalars
(:class:`PartitionSpace`): every rank runs the same solver on its pieces and gets the same numbers.
(Granziol & Juarev 2026 use the same shard-local finite differences under FSDP.)

Memory, in vectors of this rank's share: a product holds the tableau (at most two rows of three entries, the
previous row freed entry by entry as it is used up), the kept entry, the copy
:meth:`~.partitions.ZeroPartitions.shifted` restores θ from, and one accumulator — float64 (two vectors' worth)
for the Hessian, whose difference of two gradients cancels, the parameters' dtype for the GGN, whose single
vector-Jacobian product does not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ...catalogue import Curvature, MetricKind
from ...errors import ConfigError, NonFiniteError, ProblemError, ShapeError
from ...problem.base import StagedProblem
from ...problem.losses import Loss, make_loss
from ...problem.outputs import network_output
from ...resources import memory_record, reset_peak
from ...solvers.space import Basis, TorchSpace, assemble, random_segments, select
from .partitions import ZeroPartitions

#: the curvatures a partitioned product is a finite difference of
KINDS = (Curvature.HESSIAN.value, Curvature.GGN.value)

#: Ridders' extrapolation (:meth:`FiniteDifference._extrapolated`): the largest relative step, the step ratio, the
#: most differences per product, the extrapolation depth (ε², ε⁴ removed), the divergence factor, and how many levels
#: above the previous product's step the walk starts
H_MAX = 4e-3
RIDDERS_C = 2.0
RIDDERS_LEVELS = 12
RIDDERS_DEPTH = 2
RIDDERS_SAFE = 2.0
START_LEVELS = 3
#: stop a product's walk once its error estimate is this small (relative)
FD_TOL = 1e-6


class PartitionSpace(TorchSpace):
    """The :class:`~curvdist.solvers.space.VectorSpace` of vectors held as the ranks' partitions: each rank keeps its
    pieces as one flat tensor in the parameters' dtype (a :class:`~curvdist.solvers.space.Basis` of them for
    Lanczos), handled by the local space's kernels — inner products in float64 a slice at a time — and inner
    products are the local sums ``all_reduce``-d over the group."""

    def __init__(self, parts: ZeroPartitions) -> None:
        super().__init__(parts.local_dim, parts.dtype, parts.params[0].ds_tensor.device)
        self.parts, self.group = parts, parts.group
        self.local_dim, self.dim = parts.local_dim, parts.dim

    def reduce_sum(self, local: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.atleast_1d(local), dtype=torch.float64, device=self.device).clone()
        dist.all_reduce(t, group=self.group)
        return t.cpu().numpy()

    def dot_local(self, x: Tensor, y: Tensor) -> float:
        """This rank's part of xᵀy (float64, a slice at a time)."""
        return super().dot(x, y)

    def dot(self, x: Tensor, y: Tensor) -> float:
        return float(self.reduce_sum(np.array([self.dot_local(x, y)]))[0])

    def dots(self, xs: Sequence[Tensor] | Basis, y: Tensor) -> np.ndarray:
        if not len(xs):
            return np.zeros(0)
        return self.reduce_sum(super().dots(xs, y))

    def norm(self, x: Tensor) -> float:
        return float(np.sqrt(max(self.dot(x, x), 0.0)))

    def distance(self, x: Tensor, y: Tensor) -> float:
        """‖x − y‖ over all ranks, without the temporary x − y on the CPU."""
        return float(np.sqrt(max(self.reduce_sum(np.array([self.squared_distance_local(x, y)]))[0], 0.0)))

    def zeros(self) -> Tensor:
        return torch.zeros(self.local_dim, dtype=self.dtype, device=self.device)

    def new_basis(self, capacity: int | None = None) -> Basis:
        return Basis(self.local_dim, self.dtype, self.device, capacity)

    def random(self, seed: int, kind: str = "rademacher") -> Tensor:
        """This rank's pieces of the layout-independent random vector of ``seed`` (the local numbers), drawn as a
        stream without forming the whole vector."""
        return random_segments(self.dim, seed, kind, self.dtype, self.parts.segments).to(self.device)

    def to_tensor(self, x: Tensor) -> Tensor:
        """The whole vector on every rank (an ``all_gather``; for checkpoints and tests, not for large models)."""
        pieces: list[Any] = [None] * self.parts.world
        dist.all_gather_object(pieces, (self.parts.segments, x.cpu()), group=self.group)
        return assemble(self.dim, pieces)

    def from_tensor(self, t: Tensor) -> Tensor:
        if t.ndim != 1 or t.numel() != self.dim:
            raise ShapeError(f"expected a flat vector of length {self.dim}, got {tuple(t.shape)}")
        return select(t, self.parts.segments).to(self.device, self.dtype)


class PartitionedProblem(StagedProblem):
    """The risk of a ZeRO-3 engine's module on this rank's shard of a held batch, with vectors as partitions.

    Args:
        engine: a ZeRO stage 3 ``DeepSpeedEngine``.
        loss: the loss (name or :class:`~curvdist.problem.losses.Loss`).
        X, y: this rank's shard of the held batch (the monitor splits it).
        group: the data-parallel group (the parameters' partition group).
        params: names of the parameters to take curvature in (``None``: all trainable).
        reduction: ``mean`` (s = 1/N over all ranks' samples) or ``sum``.
        batch_size: samples per forward pass (``None``: the whole shard at once).
        step: a fixed relative finite-difference step h (``None``: each product its own, by Ridders'
            extrapolation).
        fd_tol: the error estimate at which a product's extrapolation stops.

    The module runs in eval mode during products; its training mode is restored after each.
    """

    def __init__(self, engine: Any, loss: str | Loss, X: Tensor, y: Tensor, group: Any = None,
                 params: Sequence[str] | None = None, reduction: str = "mean", batch_size: int | None = None,
                 step: float | None = None, fd_tol: float = FD_TOL) -> None:
        self.parts = ZeroPartitions(engine, params, group)
        check_dtype(self.parts.dtype)
        self.loss = make_loss(loss)
        self.X, self.y = X, y
        self.reduction = reduction
        self.batch_size = batch_size or max(int(X.shape[0]), 1)
        count = torch.tensor([float(self.loss.count(y))], dtype=torch.float64, device=X.device)
        dist.all_reduce(count, group=group)
        self.num_samples = int(count[0])
        sizes: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(sizes, int(X.shape[0]), group=group)
        #: the global index of this rank's first sample (the Monte-Carlo label keys of sampled metrics)
        self.sample_offset = sum(sizes[:dist.get_rank(group)])
        self.scale = 1.0 / self.num_samples if reduction == "mean" else 1.0
        self.dim, self.dtype = self.parts.dim, self.parts.dtype
        self.space = PartitionSpace(self.parts)
        #: a fixed relative step h (``None``: chosen per product)
        self.step = None if step is None else float(step)
        self.fd_tol = float(fd_tol)
        self.theta_norm = float(np.sqrt(self.space.reduce_sum(np.array([sum(
            self.space.dot_local(piece, piece) for piece in self.parts.pieces())]))[0]))
        self.products = 0
        self.product_s = 0.0

    @property
    def backend(self) -> str:
        return f"deepspeed-zero3[{self.parts.world}]"

    # ------------------------------------------------------------ operators and metrics
    def curvature_operator(self, kind: str, check_determinism: bool = True, **options: Any) -> FiniteDifference:
        if kind not in KINDS:
            raise ProblemError(f"ZeRO-3 partitioned curvature offers the finite-difference {' and '.join(KINDS)} "
                               f"products, not {kind!r}; set the monitor's zero3: gather for {kind} (it gathers the "
                               f"model on every rank)")
        if options:
            raise ProblemError(f"partitioned operators take no options, got {sorted(options)}")
        return FiniteDifference(self, kind)

    def curvature_metric(self, kind: str, damping: float = 0.0, **options: Any) -> Any:
        """The euclidean metric (None), the Kronecker and diagonal block metrics on the partitions
        (:mod:`.partitioned_metric`), or the ggn/fisher metric solved by CG over finite-difference products."""
        from ...geometry.blocks.kronecker import BLOCK_METRICS
        from ...geometry.metrics.curvature import SolvedMetric
        from ...geometry.metrics.staged import check_staged_metric

        check_staged_metric(kind, damping, options, "ZeRO-3 partitioned curvature",
                            "; set the monitor's zero3: gather for other metrics (it gathers the model on every rank)")
        if kind == MetricKind.EUCLIDEAN:
            return None
        if kind in BLOCK_METRICS or kind == MetricKind.EKFAC:
            from .partitioned_metric import PartitionedBlockMetric

            return PartitionedBlockMetric(self, kind, damping, **options)
        return SolvedMetric(FiniteDifference(self, Curvature.GGN.value), damping, kind=kind,
                            cg_tol=options.pop("cg_tol", PARTITIONED_CG_TOL), cg_maxiter=options.pop("cg_maxiter", 100))

    def value(self) -> float:
        raise ProblemError("ZeRO-3 partitioned curvature computes curvature products only (eigs, trace, logdet, "
                           "flatness, density); set the monitor's zero3: gather for grad_norm and diag")

    gradient = value

    def backend_stats(self) -> dict[str, Any] | None:
        return {"products": self.products, "product_wall_s": self.product_s}

    # ------------------------------------------------------------ memory
    def memory_reset(self) -> None:
        self._memory_windowed = reset_peak(self.space.device)
        self.parts.meter.peak = 0

    def memory_records(self) -> list[dict[str, Any]]:
        """One line per rank (gathered to every rank): the parameters it owns, the most it held in full at once
        during the query (ZeRO-3's layer-by-layer gathers), and its peak resident memory."""
        mine = memory_record(f"rank {self.parts.rank}", self.parts.local_dim, getattr(self, "_memory_windowed", False),
                             self.space.device, peak_gathered_parameters=self.parts.meter.peak,
                             model_parameters=self.parts.dim)
        lines: list[Any] = [None] * self.parts.world
        dist.all_gather_object(lines, mine, group=self.parts.group)
        return lines

    # ------------------------------------------------------------ passes through the engine's module
    def batches(self) -> list[tuple[Tensor, Tensor]]:
        n, b = int(self.X.shape[0]), self.batch_size
        return [(self.X[i:i + b], self.y[i:i + b]) for i in range(0, n, b)]

    def forward(self, X: Tensor) -> Tensor:
        """f on a batch: the module's output tensor, or the ``logits`` of a Hugging Face model's output."""
        return network_output(self.parts.module(X.to(self.parts.dtype) if X.is_floating_point() else X))

    def outputs(self) -> list[Tensor]:
        """f(θ) on every batch of the shard, without autograd."""
        with torch.no_grad(), self.parts.meter.watching(self.parts.module):
            outs = [self.forward(X).detach() for X, _ in self.batches()]
        self.parts.release()
        return outs

    def gradient_pieces(self, jvps: list[Tensor] | None = None, accumulate: Tensor | None = None,
                        sign: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
        """This rank's pieces of Σ_ranks Σ_n ∇ℓ_n (``jvps`` None), or of Σ_ranks Σ_n J_nᵀ Λ_n w_n for output
        directions w (one tensor per batch, Λ_n at f_n(θ)), unscaled: a new vector in ``dtype``, or ``sign`` times
        them added into ``accumulate``, which is returned."""
        acc = accumulate if accumulate is not None else torch.zeros(self.parts.local_dim, dtype=dtype,
                                                                     device=self.space.device)
        for b, (X, y) in enumerate(self.batches()):
            def run(X: Tensor = X, y: Tensor = y, b: int = b) -> tuple[Tensor, Tensor | None]:
                out = self.forward(X)
                if jvps is None:
                    return self.loss.per_sample(out, y).sum(), None
                with torch.no_grad():
                    u = self.loss.output_hessian_apply(out.detach().double(), y, jvps[b])
                return out, u.to(out.dtype)
            self.parts.gradient(run, acc, sign)
        return acc


class FiniteDifference:
    """C v for C ∈ {hessian, ggn} of a :class:`PartitionedProblem` by central differences; v and C v are this
    rank's pieces, in the parameters' dtype (the Hessian's difference of gradients is accumulated in float64)."""

    def __init__(self, problem: PartitionedProblem, kind: str) -> None:
        self.problem, self.kind = problem, kind
        self.backend = problem.backend
        self.dim, self.dtype = problem.dim, problem.dtype
        #: a fixed relative step h (the problem's), or None: each product's own (Ridders)
        self.step: float | None = problem.step
        #: the largest error estimate of the products so far
        self.error_estimate: float | None = None
        #: per product: its step h, error estimate and number of central differences
        self.records: list[dict[str, float]] = []
        self.h_last: float | None = None
        self.tol = problem.fd_tol

    def vector_space(self) -> PartitionSpace:
        return self.problem.space

    def apply_vector(self, v: Tensor) -> Tensor:
        """C v, by Ridders extrapolation at a step of its own (or at the fixed step)."""
        p = self.problem
        t0 = time.perf_counter()
        training = p.parts.module.training
        p.parts.module.eval()
        try:
            norm = p.space.norm(v)
            if norm == 0.0:
                return p.space.zeros()
            if self.step is not None:
                out = self._fixed(v, norm)
            else:
                out = self._extrapolated(v, norm)
        finally:
            p.parts.module.train(training)
        if not np.isfinite(p.space.dot(out, out)):
            raise NonFiniteError(f"the partitioned {self.kind} product is NaN or inf")
        p.products += 1
        p.product_s += time.perf_counter() - t0
        return out

    def _eps(self, h: float, norm: float) -> float:
        return h * (1.0 + self.problem.theta_norm) / norm

    def _fixed(self, v: Tensor, norm: float) -> Tensor:
        """Central differences at the fixed step; the first product also estimates their error from one extra
        difference at twice the step."""
        assert self.step is not None
        fine = self._difference(v, self._eps(self.step, norm))
        if self.error_estimate is None:
            coarse = self._difference(v, self._eps(2 * self.step, norm))
            self.error_estimate = _relative_change(self.problem.space, coarse, fine)
        self.records.append({"h": self.step, "error_estimate": self.error_estimate, "differences": 1})
        return fine

    def _extrapolated(self, v: Tensor, norm: float) -> Tensor:
        """Ridders' extrapolation of central differences (see the module docstring)."""
        space = self.problem.space
        h = H_MAX if self.h_last is None else min(H_MAX, self.h_last * RIDDERS_C ** START_LEVELS)
        prev: list[Any] = [self._difference(v, self._eps(h, norm))]  # a row of the tableau (None: used up)
        best = (float("inf"), prev[0], h)
        n = 1
        for i in range(1, RIDDERS_LEVELS):
            h /= RIDDERS_C
            cur: list[Any] = [self._difference(v, self._eps(h, norm))]
            n += 1
            fac = RIDDERS_C ** 2
            top = min(i - 1, RIDDERS_DEPTH)  # prev holds top + 1 ≥ j entries; prev[top] is compared last
            for j in range(1, min(i, RIDDERS_DEPTH) + 1):
                cur.append(torch.mul(cur[j - 1], fac).sub_(prev[j - 1]).div_(fac - 1))
                fac *= RIDDERS_C ** 2
                scale = max(space.norm(cur[j]), 1e-300)
                err = max(space.distance(cur[j], cur[j - 1]), space.distance(cur[j], prev[j - 1])) / scale
                if err <= best[0]:
                    best = (err, cur[j], h)
                if j - 1 < top:
                    prev[j - 1] = None  # used up: one vector less at the next entry (memory, not numbers)
            diverging = top >= 1 and space.distance(cur[top], prev[top]) / max(space.norm(cur[top]), 1e-300) \
                >= RIDDERS_SAFE * best[0]
            if best[0] <= self.tol or diverging:
                break
            prev = cur
        err, out, h = best
        self.h_last = h
        self.records.append({"h": h, "error_estimate": err, "differences": n})
        self.error_estimate = max(self.error_estimate or 0.0, err)
        return out.to(self.dtype)

    def product_info(self) -> dict[str, Any]:
        p = self.problem
        errs = [r["error_estimate"] for r in self.records]
        return {"mode": "zero3-finite-difference", "ranks": p.parts.world,
                "method": "central" if self.step is not None else "ridders", "step": self.step,
                "theta_norm": p.theta_norm, "error_estimate": max(errs) if errs else None,
                "median_error_estimate": float(np.median(errs)) if errs else None,
                "differences": sum(r["differences"] for r in self.records),
                "per_product": [dict(r) for r in self.records],
                "products": p.products, "product_wall_s": p.product_s}

    def _difference(self, v: Tensor, eps: float) -> Tensor:
        p = self.problem
        if self.kind == Curvature.HESSIAN:
            with p.parts.shifted(v, eps):  # one float64 vector: ∇L(θ + εv) − ∇L(θ − εv) accumulated in place
                diff = p.gradient_pieces()
            with p.parts.shifted(v, -eps):
                p.gradient_pieces(accumulate=diff, sign=-1.0)
            return diff.mul_(p.scale / (2 * eps)).to(p.dtype)
        with p.parts.shifted(v, eps):
            plus = p.outputs()
        with p.parts.shifted(v, -eps):
            minus = p.outputs()
        jvps = [(a.double() - b.double()) / (2 * eps) for a, b in zip(plus, minus)]
        # Jᵀ Λ w is one vector-Jacobian product, with no cancellation for a wider accumulator to protect (unlike
        # the Hessian's difference of gradients): accumulated in the parameters' dtype, one vector instead of three
        return p.gradient_pieces(jvps, dtype=p.dtype).mul_(p.scale)



def check_dtype(dtype: torch.dtype) -> None:
    """Refuse partitions in a precision too coarse for finite differences (bfloat16, float16)."""
    if dtype not in (torch.float32, torch.float64):
        error = float(torch.finfo(dtype).eps / 2) ** (2.0 / 3.0)
        raise ConfigError(f"finite-difference curvature needs float32 or float64 parameters, but the engine holds "
                          f"{str(dtype).replace('torch.', '')} partitions (at best ~{error:.0e} relative error); set "
                          f"the monitor's zero3: gather to measure on a gathered replica in float32/float64")


#: CG tolerance of the partitioned ggn/fisher metric: its products are float32 finite differences (error ~1e-5)
PARTITIONED_CG_TOL = 1e-6



def _relative_change(space: PartitionSpace, a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ over all ranks."""
    return space.distance(a, b) / max(space.norm(b), 1e-300)
