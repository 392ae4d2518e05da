"""Pipeline mode, stage side: Kronecker factors and exact diagonals of a stage's own parameters from the
activations and output gradients that pass through it.

BackPACK backpropagates curvature through a whole model in one process and cannot cross stage boundaries; sites
can. Per micro-batch the stages run the forward pass in order, each through its program with sites recorded
(module hooks on a sequential stack, :mod:`curvdist.geometry.blocks.probes`; recording nodes in a traced block
stack's graph, :mod:`curvdist.geometry.blocks.graph_sites`), the last stage forms the K output-space vectors U
exactly as locally (the columns of Λ's factor for KFLR and the GGN diagonal, sampled gradients for KFAC and the
sampled-Fisher diagonal, observed ones for the empirical diagonal, keyed by the global sample index), and the K
vectors are backpropagated stage by stage: each stage takes the gradients w.r.t. its outgoing carry, accumulates
its statistics from its probes, and passes the gradients w.r.t. its incoming carry on.

* Kronecker (``kfac``, ``kflr``): the sums of :class:`~curvdist.geometry.blocks.kronecker.KroneckerStats`.
* EKFAC (``ekfac``, :mod:`curvdist.geometry.metrics.ekfac`): two passes. The first collects the Kronecker sums; each
  stage forms its factors and their eigenbases (:meth:`StageBlocks.begin_correction`); the second accumulates
  Σ_{n,k} (Q₁ᵀ W^k_n Q₂)² from the per-sample gradients of its weights, handled like a diagonal's squares (a tied
  weight's uses added before rotating and squaring, at the owner, which holds the bases).
* Diagonal (``diag_ggn``, ``diag_fisher_mc``, ``empirical_fisher_diag``): Σ_{n,k} g_{n,k}², g_{n,k} the per-sample
  gradient J_nᵀ U[k, n] that the sites give exactly when they account for every use of a parameter.

A weight tied across stages (an embedding and the head) is owned by its first stage. A later stage that uses it
accumulates that use's statistics too and hands them to the owner: its Kronecker sums once, at the end (a separate
term per orientation, as locally: the nearest Kronecker product of the embedding and head terms); for a diagonal,
the per-sample gradients of each micro-batch, which the owner adds to its own before squaring — the square of the
sum of the uses, not the sum of their squares. The statistics never leave the stages otherwise: each normalizes
and eigendecomposes its own (as distributed K-FAC spreads layers over workers) and applies its blocks of M_δ to its
shard of a vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..geometry.blocks.eigencorrection import rotated_squares
from ..geometry.blocks.kronecker import (BLOCK_METRICS, KroneckerStats, _add, attention_mask,
                                         site_gradients)
from ..geometry.blocks.probes import check_calls
from ..geometry.metrics.base import DiagonalMetric, Metric
from ..geometry.metrics.ekfac import FISHER_TYPES, ekfac_bases, ekfac_from_corrections
from ..geometry.metrics.kfac import KFACMetric, normalized_factors
from ..problem.autodiff import differentiable_kernels
from ..problem.data import Inputs, batch_len
from .stacks import Carry, StageProgram, split_floats

class StageBlocks:
    """The statistics of one stage's parameters for the metric ``kind``
    (:data:`~curvdist.geometry.blocks.kronecker.BLOCK_METRICS`) and, once
    finished, its blocks of the metric.

    Args:
        program: the stage's program.
        values: every parameter the stage uses, by problem name.
        names: the parameters it owns, in the order of its shard.
        foreign: the parameters it uses but an earlier stage owns (tied weights).
        tied: the owned parameters that later stages use too.
    """

    def __init__(self, program: StageProgram, values: Mapping[str, Tensor], names: Sequence[str],
                 foreign: Sequence[str], tied: Sequence[str], kind: str, fisher_type: str = "mc") -> None:
        if kind == "ekfac":
            self.statistic, self.out_kind = "kronecker", FISHER_TYPES[fisher_type]
        else:
            self.statistic, self.out_kind = BLOCK_METRICS[kind]
        self.kind = kind
        self.factors: dict[str, tuple[Any, ...]] = {}
        self.bases: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        self.program, self.values = program, values
        self.names, self.foreign, self.tied = list(names), list(foreign), set(tied)
        self.used = [*self.names, *self.foreign]
        self.shapes = {n: values[n].shape for n in self.used}
        self.run, self.rec = program.with_sites(self.used)
        self.saved: dict[int, tuple[Carry, Any, list[Any]]] = {}
        self.samples: dict[int, dict[str, Tensor]] = {}  # per micro-batch: (K, B, *shape) of foreign parameters
        self.metric: Metric | None = None
        self.reset()

    def reset(self) -> None:
        self.stats = KroneckerStats(self.used, {n: s.numel() for n, s in self.shapes.items()})
        self.diagonal: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ passes
    def forward(self, b: int, X: Inputs, incoming: Any, key: Any) -> Any:
        """Run the stage on micro-batch b (inputs X at the first stage, else the incoming carry), recording its
        sites; keep the graph for the backward passes. Returns the outgoing (floating carry, constants), or the
        network output at the last stage."""
        if incoming is None:
            floats, const = split_floats(self.program.first_carry(X))
        else:
            floats, const = incoming
            floats = {k: v.detach().requires_grad_(True) for k, v in floats.items()}
        B = batch_len(X)
        self.rec.begin(B, attention_mask(X))
        with torch.enable_grad(), differentiable_kernels():
            out = self.run(self.values, {**floats, **const}, key)
        check_calls(self.rec, self.used, B)
        sites = list(self.rec.sites)
        if self.statistic == "kronecker":
            self.stats.add_inputs(sites)
        self.saved[b] = (floats, out, sites)
        if isinstance(out, Tensor):
            return out.detach()
        fo, co = split_floats(out)
        return {k: v.detach() for k, v in fo.items()}, co

    def backward(self, b: int, grads_out: Tensor | dict[str, Tensor], parts: Sequence[dict[str, Tensor]] = ()
                 ) -> dict[str, Tensor] | None:
        """Accumulate the statistics for the K output vectors ``grads_out`` ((K, *shape): the network output's
        at the last stage, else per floating entry of the outgoing carry); ``parts``: later stages' per-sample
        gradients of tied parameters this stage owns (diagonal). Returns the K gradients w.r.t. the incoming
        floating carry (None at the first stage)."""
        floats, out, sites = self.saved.pop(b)
        if isinstance(out, Tensor):
            outs, gouts = [out], [grads_out]
        else:
            keys = [k for k in grads_out if out[k].requires_grad]  # type: ignore[union-attr]
            outs, gouts = [out[k] for k in keys], [grads_out[k] for k in keys]  # type: ignore[index]
        into = [k for k, v in floats.items() if v.requires_grad]
        probes = [s.probe for s in sites]
        K = gouts[0].shape[0] if gouts else 0
        to_input: dict[str, list[Tensor]] = {k: [] for k in into}
        samples: dict[str, list[Tensor]] = {}
        with torch.enable_grad():
            for k in range(K):
                grads = torch.autograd.grad(outs, probes + [floats[c] for c in into],
                                            [g[k].to(o.dtype) for o, g in zip(outs, gouts)],
                                            retain_graph=k < K - 1, allow_unused=True)
                at_probes = [torch.zeros_like(p) if g is None else g for p, g in zip(probes, grads)]
                if self.statistic == "kronecker":
                    self.stats.add_outputs(sites, at_probes)
                else:
                    self._add_squares(site_gradients(sites, at_probes, self._squared, per_sample=True), samples)
                for c, g in zip(into, grads[len(probes):]):
                    to_input[c].append(torch.zeros_like(floats[c]) if g is None else g.detach())
        if self.statistic != "kronecker":
            self._tied_squares(b, samples, parts)
        if not to_input:
            return None
        return {c: torch.stack(v) if v else torch.zeros(0, *floats[c].shape, dtype=floats[c].dtype)
                for c, v in to_input.items()}

    def _add_squares(self, per_sample: dict[str, Tensor], samples: dict[str, list[Tensor]]) -> None:
        """Σ_n g_n² of one output vector; the per-sample gradients of tied parameters are kept (their uses are
        added before squaring)."""
        for name, g in per_sample.items():
            if name in self.tied or name in self.foreign:
                samples.setdefault(name, []).append(g.detach())
            else:
                _add(self.diagonal, name, self._square(name, g))

    def _tied_squares(self, b: int, samples: dict[str, list[Tensor]], parts: Sequence[dict[str, Tensor]]) -> None:
        foreign = {n: torch.stack(samples[n]) for n in self.foreign if n in samples}
        if foreign:
            self.samples[b] = foreign
        for name in self.tied:
            total = torch.stack(samples[name]) if name in samples else None
            for part in parts:
                if name in part:
                    total = part[name].to(self.values[name].dtype) if total is None else total + part[name]
            if total is not None and name in self._squared:
                _add(self.diagonal, name, self._square(name, total.flatten(0, 1)))

    @property
    def _squared(self) -> dict[str, torch.Size]:
        """The parameters whose per-sample gradients are squared: all (diagonal), or the Kronecker-factored
        weights (EKFAC's correction; foreign ones are squared at their owners)."""
        if self.statistic == "correction":
            return {n: self.shapes[n] for n in self.used if n in self.bases or n in self.foreign}
        return self.shapes

    def _square(self, name: str, g: Tensor) -> Tensor:
        """Σ_n of g_n² (diagonal), or of (Q₁ᵀ g_n Q₂)² in the weight's bases (EKFAC), g: (n, *shape)."""
        if self.statistic != "correction":
            return g.pow(2).sum(0)
        (_, Q1), (_, Q2) = self.bases[name]
        return rotated_squares(g, Q1, Q2)

    def tied_samples(self, b: int) -> dict[str, Tensor]:
        """Micro-batch b's per-sample gradients (K, B, *shape) of the foreign parameters (for their owners)."""
        return self.samples.pop(b, {})

    def tied_sums(self) -> dict[tuple[str, str], tuple[Any, Any, int]]:
        """The Kronecker sums of the foreign parameters' uses on this stage, handed to their owners."""
        return self.stats.take(self.foreign)

    # ------------------------------------------------------------------ the metric
    def begin_correction(self, scale: float, num_samples: int,
                         parts: Sequence[dict[tuple[str, str], tuple[Any, Any, int]]] = ()) -> None:
        """EKFAC, after the first pass: this stage's factors (with the later stages' sums of the tied weights it
        owns) and their eigenbases; the next pass accumulates the corrected eigenvalues."""
        for part in parts:
            self.stats.merge(part)
        G, A = self.stats.result(self.names)
        self.factors = normalized_factors(self.names, G, A, scale, num_samples)
        self.bases = ekfac_bases(self.factors)
        self.reset()
        self.statistic = "correction"

    def finish(self, scale: float, num_samples: int, damping: float,
               parts: Sequence[dict[tuple[str, str], tuple[Any, Any, int]]] = ()) -> float:
        """Form this stage's blocks (Kronecker factors eigendecomposed, with the later stages' sums of the tied
        weights it owns); returns log det of its blocks of M_δ."""
        if self.statistic == "correction":
            shapes = [self.shapes[n] for n in self.names]
            corrections = {n: self.diagonal[n] * scale for n in self.bases}
            self.metric = ekfac_from_corrections(self.names, shapes, self.factors, self.bases, corrections, damping)
        elif self.statistic == "kronecker":
            for part in parts:
                self.stats.merge(part)
            G, A = self.stats.result(self.names)
            shapes = [self.shapes[n] for n in self.names]
            self.metric = KFACMetric(self.names, shapes, normalized_factors(self.names, G, A, scale, num_samples),
                                     damping=damping, kind=self.kind)
        else:
            missing = [n for n in self.names if n not in self.diagonal]
            if missing:  # pragma: no cover - check_calls refuses parameters without sites
                raise AssertionError(missing)
            d = torch.cat([self.diagonal[n].reshape(-1) for n in self.names]) * scale
            self.metric = DiagonalMetric(d, damping=damping, kind=self.kind)
        self.reset()
        return self.metric.logdet()
