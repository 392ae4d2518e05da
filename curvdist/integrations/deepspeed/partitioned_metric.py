"""Kronecker and diagonal metrics of a ZeRO-3 engine on its partitions: statistics from the engine's own forward and
backward, one owner per layer, M⁻¹ applied to partitioned vectors.

Statistics. The engine's module is instrumented in place for one pass over this rank's shard of the held batch
(:func:`curvdist.geometry.blocks.probes.instrumented`: module hooks record each layer's input and add a zero probe
to its output; all are removed afterwards). ZeRO-3 gathers each module's parameters when it runs, as in training;
layer inputs and output gradients are activations, never partitioned. The last layer's output gives the K
output-space vectors of the metric (:data:`~curvdist.geometry.blocks.kronecker.BLOCK_METRICS`; Monte-Carlo labels
keyed by the global sample index, so 2 ranks draw what one process draws), and K backward passes to the probes give
the output-side vectors b at every site:

* Kronecker (``kfac``, ``kflr``): each rank sums its shard's factors G, A for every layer
  (:class:`~curvdist.geometry.blocks.kronecker.KroneckerStats`). Each layer then has one owner, assigned by cost
  (Σ n³ of its factor sides, longest-processing-time first: :func:`~curvdist.problem.reducers.assign_by_cost`, as
  KAISA assigns factor work), and its sums are reduced to that owner only, which forms and eigendecomposes the
  damped block. To apply M_δ, M_δ⁻¹, W⁻¹, W⁻ᵀ or M_δ^{-1/2} to a partitioned vector, the pieces of one
  parameter at a time are gathered at its owner, the block is applied there, and the result is scattered back as
  pieces: no rank holds more than one parameter's vector in full at once — what a ZeRO-3 training step gathers.
* EKFAC (``ekfac``, :mod:`curvdist.geometry.metrics.ekfac`): the Kronecker sums as above; each owner forms its
  layers' factors and eigenbases, and a second pass accumulates the corrected eigenvalues Σ_{n,k}(Q₁ᵀ W_{n,k} Q₂)²
  from the per-sample gradients of every rank's samples: the bases are broadcast from their owners (every rank
  holds all of them during that pass: Σ_layers n₁² + n₂² entries, about 1.3 GB in float32 at GPT-2 small), each
  rank sums its samples' squares in them, and each layer's sum is reduced to its owner. (Splitting the bases into
  groups with one pass each would bound that memory, but a second probe-only pass through a ZeRO-3 module here
  found a LayerNorm weight still partitioned in its backward; one pass is what is supported.)
* Diagonal (``diag_ggn``, ``diag_fisher_mc``, ``empirical_fisher_diag``): the exact diagonal Σ_{n,k} g_{n,k}² of
  per-sample gradients g = J_nᵀ U[k, n], which the sites give exactly. Each parameter's contribution of a chunk of
  the K vectors is reduced over the ranks straight into this rank's pieces, one parameter at a time, and the metric
  acts on the pieces elementwise, without communication.

On the first batch the gradient the sites account for is compared, parameter by parameter and reduced into pieces,
with the engine's own gradient of ⟨U[0], f⟩: a parameter used outside its module is refused, not given a block that
misses that use (as locally). Parameters without a layer rule (their exact blocks need per-sample passes through the
whole model) are refused with the alternatives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ...errors import MetricError
from ...geometry.blocks.eigencorrection import EigenCorrection
from ...geometry.blocks.kronecker import (BLOCK_METRICS, KroneckerStats, attention_mask, block_output_factors,
                                          site_gradients)
from ...geometry.blocks.probes import MATRIX_FREE_HINT, Site, check_calls, instrumented
from ...geometry.metrics.base import DiagonalMetric, Metric
from ...geometry.metrics.ekfac import FISHER_TYPES, ekfac_from_corrections, statistic_of
from ...geometry.metrics.kfac import KFACMetric, normalized_factors
from ...geometry.structured import LowRankFactor
from ...problem.reducers import assign_by_cost
from .finite_difference import PartitionedProblem

#: bytes of output-side vectors kept at once for a diagonal's chunk of the K output vectors
DIAGONAL_CHUNK_BYTES = 256 * 1024**2



class PartitionedBlockMetric(Metric):
    """M_δ = blockdiag(G ⊗ A) + δI (``kfac``, ``kflr``) or diag(d) + δI (the exact diagonals) of a ZeRO-3 engine's
    module on the held batch, acting on this rank's pieces of partitioned vectors (see the module docstring).

    Args:
        problem: the partitioned problem (the engine, this rank's shard of the held batch).
        kind: a kind of :data:`~curvdist.geometry.blocks.kronecker.BLOCK_METRICS`, or ``ekfac``.
        damping: δ.
        mc_samples, seed: the sampled labels of ``kfac``, ``ekfac`` (``fisher_type`` ``mc``) and ``diag_fisher_mc``.
        fisher_type: ``ekfac``'s curvature (type2, mc, empirical).
    """

    has_factor = True
    has_inv_sqrt = True

    def __init__(self, problem: PartitionedProblem, kind: str, damping: float = 0.0, mc_samples: int = 1,
                 seed: int = 0, fisher_type: str = "mc") -> None:
        if kind not in BLOCK_METRICS and kind != "ekfac":
            raise MetricError(f"ZeRO-3 partitioned block metrics are {sorted([*BLOCK_METRICS, 'ekfac'])}, not "
                              f"{kind!r}")
        super().__init__(problem.dim, problem.dtype, problem.space.device, damping)
        self.problem, self.parts, self.kind = problem, problem.parts, kind
        if kind == "ekfac":
            statistic_of(fisher_type, mc_samples)
            self.statistic, self.out_kind = "kronecker", FISHER_TYPES[fisher_type]
        else:
            self.statistic, self.out_kind = BLOCK_METRICS[kind]
        self.shapes = {n: torch.Size(p.ds_shape) for n, p in zip(self.parts.names, self.parts.params)}
        module = self.parts.module
        training = module.training
        module.eval()
        try:
            stats, pieces, check = self._collect(int(mc_samples), int(seed))
            self._check_uses(*check)
        finally:
            self.parts.release()
            module.train(training)
        if self.statistic == "kronecker":
            self._own_blocks(stats)
            if kind == "ekfac":
                self._correct(int(mc_samples), int(seed))
        else:
            self.diagonal = DiagonalMetric((pieces * problem.scale).to(torch.float64), damping, kind=kind)
        self._logdet = self._total_logdet()

    # ------------------------------------------------------------------ statistics
    def _passes(self, mc_samples: int, seed: int) -> Iterator[tuple[int, Tensor, list[Site], Tensor, int, list[Tensor]]]:
        """One instrumented pass over this rank's batches: per batch i (inputs X, recorded sites, output vectors
        U) and output vector k, the probe gradients b; the engine's gathered parameters released after each
        batch, the module in eval mode and its hooks removed afterwards."""
        p, parts = self.problem, self.parts
        module = parts.module
        training = module.training
        module.eval()
        first = p.sample_offset
        try:
            with instrumented(module, parts.names) as (rec, plan):
                if plan.exact:
                    raise MetricError(f"ZeRO-3 partitioned {self.kind} blocks need a layer rule for every parameter; "
                                      f"{plan.exact} have none (their exact blocks need per-sample passes through the "
                                      f"whole model). {MATRIX_FREE_HINT}, or set the monitor's zero3: gather")
                for i, (X, y) in enumerate(p.batches()):
                    B = int(X.shape[0])
                    rec.begin(B, attention_mask(X))
                    with torch.enable_grad(), parts.meter.watching(module):
                        out = p.forward(X)
                        check_calls(rec, parts.names, B)
                        sites = list(rec.sites)
                        U = self._output_vectors(out, y, first, mc_samples, seed)
                        K = U.shape[0]
                        for k in range(K):
                            grads = torch.autograd.grad(out, [s.probe for s in sites], U[k], retain_graph=k < K - 1,
                                                        allow_unused=True)
                            yield i, X, sites, U, k, [torch.zeros_like(s.probe) if g is None else g.detach()
                                                      for s, g in zip(sites, grads)]
                    parts.release()
                    first += B
        finally:
            parts.release()
            module.train(training)

    def _collect(self, mc_samples: int, seed: int) -> tuple[KroneckerStats | None, Tensor | None, Any]:
        parts = self.parts
        stats = KroneckerStats(parts.names, {n: s.numel() for n, s in self.shapes.items()}) \
            if self.statistic == "kronecker" else None
        pieces = torch.zeros(parts.local_dim, dtype=torch.float64, device=self.problem.space.device) \
            if self.statistic == "diagonal" else None
        check: Any = (None, None, None)
        kept: list[list[Tensor]] = []
        for i, X, sites, U, k, b in self._passes(mc_samples, seed):
            if i == 0 and k == 0:
                check = (sites, b, (X, U[0]))
            if stats is not None:
                if k == 0:
                    stats.add_inputs(sites)
                stats.add_outputs(sites, b)
            else:
                kept.append(b)
                if len(kept) * _bytes(b) >= DIAGONAL_CHUNK_BYTES or k == U.shape[0] - 1:
                    self._add_squares(sites, kept, pieces)  # type: ignore[arg-type]
                    kept = []
        return stats, pieces, check

    def _output_vectors(self, out: Tensor, y: Tensor, first: int, mc_samples: int, seed: int) -> Tensor:
        """The K output-space vectors of a batch whose first sample has the global index ``first``."""
        return block_output_factors(self.problem.loss, out.detach().double(), y, self.kind, first, mc_samples, seed,
                                    self.out_kind if self.kind == "ekfac" else None).to(out.dtype)

    def _add_squares(self, sites: list[Site], chunk: list[list[Tensor]], pieces: Tensor) -> None:
        """pieces += this rank's piece of Σ_ranks Σ_{n, k in chunk} g_{n,k}², one parameter at a time."""
        split = self.parts.split(pieces)
        for i, name in enumerate(self.parts.names):
            mine = [j for j, s in enumerate(sites) if name in s.params.values()]
            total = None
            for b in chunk:
                g = site_gradients([sites[j] for j in mine], [b[j] for j in mine], {name: self.shapes[name]},
                                   per_sample=True)[name]
                sq = g.double().pow(2).sum(0)
                total = sq if total is None else total + sq
            assert total is not None
            split[i].add_(self.parts._piece(total, i))

    def _check_uses(self, sites: list[Site] | None, b: list[Tensor] | None, batch: Any) -> None:
        """The sites' gradient of ⟨U[0], f⟩ on the first batch equals the engine's (both reduced into pieces)."""
        if sites is None or b is None:
            return
        parts, (X, u) = self.parts, batch
        true = torch.zeros(parts.local_dim, dtype=torch.float64, device=self.problem.space.device)
        parts.gradient(lambda: (self.problem.forward(X), u), true)
        seen = torch.zeros_like(true)
        split = parts.split(seen)
        for i, name in enumerate(parts.names):
            mine = [j for j, s in enumerate(sites) if name in s.params.values()]
            g = site_gradients([sites[j] for j in mine], [b[j] for j in mine], {name: self.shapes[name]})[name]
            split[i].add_(parts._piece(g, i).to(torch.float64))
        errs = torch.tensor([[float((a - c).pow(2).sum()), float(c.pow(2).sum())]
                             for a, c in zip(parts.split(seen), parts.split(true))], dtype=torch.float64)
        dist.all_reduce(errs, group=parts.group)
        tol = torch.finfo(parts.dtype).eps ** 0.5
        bad = [n for n, (e, t) in zip(parts.names, errs.tolist()) if e ** 0.5 > tol * max(t ** 0.5, 1e-30)]
        if bad:
            raise MetricError(f"{bad} are used in the forward pass outside the modules that hold them (or by a "
                              f"module whose forward is not the layer it subclasses), so their blocks would miss that "
                              f"use; {MATRIX_FREE_HINT}")

    # ------------------------------------------------------------------ owners
    def _own_blocks(self, stats: KroneckerStats | None) -> None:
        """Reduce every layer's sums to its owner, which forms its damped block."""
        assert stats is not None
        parts, group = self.parts, self.parts.group
        costs = {}
        for n, s in self.shapes.items():
            lead = s[0] if len(s) else 1
            rest = max(s.numel() // max(lead, 1), 1)
            costs[n] = float(lead ** 3 + rest ** 3) if len(s) >= 2 else float(min(s.numel(), 4096) ** 3)
        shares = assign_by_cost(costs, parts.world)
        self.owner = {n: r for r, share in enumerate(shares) for n in share}
        self.blocks: dict[str, KFACMetric] = {}
        scale, N = self.problem.scale, self.problem.num_samples
        for name in parts.names:
            taken = stats.take([name])
            single = stats.single.pop(name, None)
            reduced = _reduce_to(self.owner[name], (taken, single), group)
            if parts.rank != self.owner[name]:
                continue
            taken, single = reduced
            own = KroneckerStats([name], {name: self.shapes[name].numel()})
            own.merge(taken)
            if single is not None:
                own.single[name] = single
                own.role[name] = "single"
            G, A = own.result()
            self.blocks[name] = KFACMetric([name], [self.shapes[name]], normalized_factors([name], G, A, scale, N),
                                           damping=self.damping, kind=self.kind)

    def _correct(self, mc_samples: int, seed: int) -> None:
        """EKFAC: the owners' eigenbases broadcast to every rank, one pass over this rank's batches summing the
        rotated per-sample squares, each layer's sum reduced to its owner, which replaces its Kronecker block by the
        corrected one."""
        parts, group = self.parts, self.parts.group
        names = [n for n in parts.names if len(self.shapes[n]) >= 2 and self._is_kron(n)]
        bases = {n: self._broadcast_bases(n) for n in names}
        acc = EigenCorrection(bases, self.shapes)
        for _, _, sites, _, _, b in self._passes(mc_samples, seed):
            acc.add(sites, b)
        del bases
        for n in names:
            E = acc.sums.get(n)
            if E is None:  # pragma: no cover - check_calls: every layer has a site on every batch
                raise MetricError(f"no per-sample gradients reached {n}")
            E = _reduce_to(self.owner[n], E.contiguous(), group)
            if parts.rank == self.owner[n]:
                self.blocks[n] = ekfac_from_corrections([n], [self.shapes[n]], self.blocks[n].factors(),
                                                        {n: self._bases[n]}, {n: E * self.problem.scale},
                                                        self.damping)

    def _is_kron(self, name: str) -> bool:
        """Whether ``name`` has a two-factor block (known at its owner; agreed over the ranks)."""
        flag = torch.tensor([0.0])
        if self.parts.rank == self.owner[name]:
            flag[0] = float(self.blocks[name].blocks[0].num_factors == 2)
        dist.all_reduce(flag, group=self.parts.group)
        return bool(flag.item())

    def _broadcast_bases(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """The eigenbases (Q₁, Q₂) of ``name``'s Kronecker factors, formed at its owner and broadcast (None: the
        identity of a structured side)."""
        parts, group = self.parts, self.parts.group
        owner = self.owner[name]
        if not hasattr(self, "_bases"):
            self._bases: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        sides = (self.shapes[name][0], self.shapes[name][1:].numel())
        present = torch.zeros(2)
        if parts.rank == owner:
            self._bases[name] = _kronecker_bases(self.blocks[name])
            present = torch.tensor([float(U is not None) for _, U in self._bases[name]])
        dist.broadcast(present, src=_global(owner, group), group=group)
        out: list[Tensor | None] = []
        for k, n in enumerate(sides):
            if not present[k]:
                out.append(None)
                continue
            Q = self._bases[name][k][1].contiguous() if parts.rank == owner else \
                torch.empty(n, n, dtype=parts.dtype, device=self.problem.space.device)
            Q = Q.to(parts.dtype)
            dist.broadcast(Q, src=_global(owner, group), group=group)
            out.append(Q)
        return out[0], out[1]

    def _total_logdet(self) -> float:
        if self.statistic == "diagonal":
            local = float(torch.log(self.diagonal._d).sum())
        else:
            local = sum(m.logdet() for m in self.blocks.values())
        t = torch.tensor([local], dtype=torch.float64, device=self.problem.space.device)
        dist.all_reduce(t, group=self.parts.group)
        return float(t[0])

    # ------------------------------------------------------------------ the metric on pieces
    def _map(self, v: Tensor, method: str) -> Tensor:
        if self.statistic == "diagonal":
            return getattr(self.diagonal, method)(v.to(torch.float64)).to(v.dtype)
        parts = self.parts
        out = torch.empty_like(v)
        for i, (name, piece, dst) in enumerate(zip(parts.names, parts.split(v), parts.split(out))):
            owner = self.owner[name]
            full = _gather(piece, i, parts, owner)
            res = None
            if full is not None:
                parts.meter.peak = max(parts.meter.peak, full.numel())
                block = self.blocks[name]
                res = getattr(block, method)(full.to(block.dtype)).to(v.dtype)
            dst.copy_(_scatter(res, i, parts, owner))
        return out

    def apply_undamped(self, v: Tensor) -> Tensor:
        return self._map(v, "apply_undamped")

    def apply(self, v: Tensor) -> Tensor:
        return self._map(v, "apply")

    def solve(self, v: Tensor) -> Tensor:
        return self._map(v, "solve")

    def inv_factor_apply(self, v: Tensor) -> Tensor:
        return self._map(v, "inv_factor_apply")

    def inv_factor_t_apply(self, v: Tensor) -> Tensor:
        return self._map(v, "inv_factor_t_apply")

    def inv_sqrt_apply(self, v: Tensor) -> Tensor:
        return self._map(v, "inv_sqrt_apply")

    def logdet(self) -> float:
        return self._logdet

    def to_dense(self, max_dim: int = 8192) -> Tensor:
        raise MetricError("a ZeRO-3 partitioned metric is never assembled (no rank holds the model's vectors)")


def _kronecker_bases(metric: KFACMetric) -> list[tuple[Tensor, Tensor | None]]:
    """The eigendecompositions [(λ₁, Q₁), (λ₂, Q₂)] of a one-block Kronecker metric's factors, as its block holds
    them (Q = None, λ the factor's diagonal, for a structured side: EKFAC's identity basis)."""
    block = metric.blocks[0]
    S = block.structured
    if S is None:
        return [(lam, U) for lam, U in zip(block.evals, block.evecs)]
    return [(S.F.diagonal(), None) if k == S.side else (S.lam, S.U)
            for k in range(2)]


# ---------------------------------------------------------------------- collectives
def _global(rank: int, group: Any) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _gather(piece: Tensor, i: int, parts: Any, owner: int) -> Tensor | None:
    """Parameter i's vector assembled from the ranks' pieces at ``owner`` (None elsewhere)."""
    P = int(parts.params[i].ds_tensor.numel())
    buf = torch.zeros(P, dtype=piece.dtype, device=piece.device)
    buf[:piece.numel()] = piece
    if parts.world == 1:
        return buf[:parts.numels[i]]
    bufs = [torch.empty_like(buf) for _ in range(parts.world)] if parts.rank == owner else None
    dist.gather(buf, bufs, dst=_global(owner, parts.group), group=parts.group)
    return torch.cat(bufs)[:parts.numels[i]] if bufs is not None else None


def _scatter(full: Tensor | None, i: int, parts: Any, owner: int) -> Tensor:
    """This rank's piece of parameter i's vector ``full`` (given at ``owner``)."""
    P = int(parts.params[i].ds_tensor.numel())
    k = parts.owned[i]
    if parts.world == 1:
        assert full is not None
        return full[:k]
    out = torch.empty(P, dtype=parts.dtype, device=parts.params[i].ds_tensor.device)
    chunks = None
    if full is not None:
        padded = torch.zeros(P * parts.world, dtype=out.dtype, device=out.device)
        padded[:full.numel()] = full
        chunks = list(padded.split(P))
    dist.scatter(out, chunks, src=_global(owner, parts.group), group=parts.group)
    return out[:k]


def _reduce_to(owner: int, value: Any, group: Any) -> Any:
    """Σ_ranks of a tree of tensors, :class:`LowRankFactor` s and ints at ``owner`` (the input elsewhere): dense
    leaves by ``dist.reduce``; a parameter with a structured leaf on any rank by ``gather_object`` and a sum."""
    leaves: list[Any] = []
    _leaves(value, leaves)
    flag = torch.tensor([float(any(isinstance(x, LowRankFactor) for x in leaves))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    rank = dist.get_rank(group)
    if flag.item():
        gathered: list[Any] | None = [None] * dist.get_world_size(group) if rank == owner else None
        dist.gather_object(value, gathered, dst=_global(owner, group), group=group)
        if gathered is None:
            return value
        total = gathered[0]
        for other in gathered[1:]:
            total = _tree_add(total, other)
        return total
    return _tree_reduce(value, owner, group)


def _leaves(x: Any, out: list[Any]) -> None:
    if isinstance(x, dict):
        for v in x.values():
            _leaves(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _leaves(v, out)
    else:
        out.append(x)


def _tree_reduce(x: Any, owner: int, group: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tree_reduce(v, owner, group) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_reduce(v, owner, group) for v in x)
    if isinstance(x, Tensor):
        t = x.contiguous().clone()
        dist.reduce(t, dst=_global(owner, group), group=group)
        return t
    if isinstance(x, int) and not isinstance(x, bool):
        t = torch.tensor([x], dtype=torch.int64)
        dist.reduce(t, dst=_global(owner, group), group=group)
        return int(t[0])
    return x


def _tree_add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _tree_add(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(_tree_add(x, y) for x, y in zip(a, b))
    if a is None:
        return None
    if isinstance(a, LowRankFactor) or isinstance(b, LowRankFactor):
        return (a.dense() if isinstance(a, LowRankFactor) and isinstance(b, Tensor) else a) + \
            (b.dense() if isinstance(b, LowRankFactor) and isinstance(a, Tensor) else b)
    return a + b


def _bytes(b: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in b)


__all__ = ["PartitionedBlockMetric"]
