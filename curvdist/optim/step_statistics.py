"""Metric statistics from the training step's own forward pass, as kfac-pytorch collects its factors, with moving
averages.

While a micro-batch's forward runs inside :meth:`StepStatistics.track`, the model's modules record their sites in
place (:func:`curvdist.geometry.blocks.probes.instrumented`: layer inputs, and a zero probe added to each layer's
output, which leaves the training gradient unchanged). When the model's forward returns, the K output-space
vectors of the metric are formed from its output f and the micro-batch's labels y — exactly as a separate pass
forms them (:func:`~curvdist.geometry.blocks.kronecker.block_output_factors`: the columns of Λ's factor for KFLR
and the GGN diagonal, labels drawn from p(y | f) for KFAC and the sampled diagonal, keyed by the global sample
index, here the number of samples the optimizer has seen) — and backpropagated to the probes only, keeping the
graph for the training backward. So no extra forward pass runs; K backward passes to the layer outputs do (one,
for KFAC and the empirical diagonal).

A step's statistics are the sums over all micro-batches tracked since the previous step (gradient accumulation),
normalized with the step's own count of loss terms (the mean loss the gradients belong to: s = 1/Σ count, or 1 for
``reduction="sum"``). They enter exponential moving averages with decay β:

    T_t = β T_{t−1} + (1 − β) T_step,   T_0 = T_step,

of the Kronecker terms (each orientation's pair of normalized factors, whose product is the block) or of the
diagonal; the metric is formed from the averages (a tied weight's terms combined by their nearest Kronecker
product) and eigendecomposed every ``refresh`` steps. On a single step with β irrelevant, the statistics equal those
of a separate pass over the same batch (the tests check it, with accumulation too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MetricError, ProblemError
from ..geometry.blocks.kronecker import BLOCK_METRICS, KroneckerStats, block_output_factors, site_gradients
from ..geometry.blocks.probes import MATRIX_FREE_HINT, check_calls, instrumented
from ..geometry.metrics.base import DiagonalMetric, Metric
from ..geometry.metrics.kfac import KFACMetric, factors_from_terms, normalized_terms
from ..geometry.structured import LowRankFactor
from ..problem.losses import make_loss
from ..problem.outputs import network_output

#: the metric kinds whose statistics a training step can give
STEP_KINDS = tuple(BLOCK_METRICS)


def _ema(old: Any, new: Any, decay: float) -> Any:
    """β·old + (1 − β)·new for tensors and structured factors (a structured average whose rows outnumber its
    dimension is kept dense; rows whose weight has decayed below rounding are dropped)."""
    if isinstance(old, LowRankFactor) and isinstance(new, Tensor):
        old = old.dense()
    if isinstance(new, LowRankFactor) and isinstance(old, Tensor):
        new = new.dense()
    out = old * decay + new * (1 - decay)
    if isinstance(out, LowRankFactor):
        if out.rank >= out.n:
            return out.dense()
        w = out.weights.abs()
        keep = w > torch.finfo(w.dtype).eps * float(w.max()) if w.numel() else w.bool()
        out = LowRankFactor(out.diag, out.rows[keep], out.weights[keep])
    return out


class StepStatistics:
    """Moving averages of a metric's statistics from tracked training forward passes (see the module docstring).

    Args:
        model: the network being trained.
        names: the parameters the metric covers (all must have a layer rule: a site).
        loss: the training loss (its name or a :class:`~curvdist.problem.losses.Loss`).
        kind: a kind of :data:`STEP_KINDS`.
        decay: β ∈ [0, 1) of the moving averages.
        mc_samples, seed: the sampled labels of ``kfac`` and ``diag_fisher_mc``.
        kfac_approx: ``expand`` or ``reduce`` (Kronecker kinds).
        reduction: ``mean`` (the training loss is the mean over the step's loss terms) or ``sum``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], loss: Any, kind: str, decay: float = 0.95,
                 mc_samples: int = 1, seed: int = 0, kfac_approx: str = "expand", reduction: str = "mean") -> None:
        if kind not in STEP_KINDS:
            raise MetricError(f"statistics from the training step are offered for {', '.join(STEP_KINDS)}, not "
                              f"{kind!r}; use statistics='separate'")
        if not 0 <= decay < 1:
            raise ProblemError(f"decay must lie in [0, 1), got {decay!r}")
        if reduction not in ("mean", "sum"):
            raise ProblemError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.model, self.names, self.kind, self.decay = model, list(names), kind, float(decay)
        self.loss = make_loss(loss)
        self.statistic, _ = BLOCK_METRICS[kind]
        self.mc_samples, self.seed, self.kfac_approx, self.reduction = int(mc_samples), int(seed), kfac_approx, \
            reduction
        named = dict(model.named_parameters())
        self.shapes = {n: named[n].shape for n in self.names}
        self.seen = 0  # samples tracked so far: the global index of the next micro-batch's first sample
        self.average: dict[str, Any] | None = None  # the moving averages (Kronecker terms, or the diagonal)
        self._reset()

    def _reset(self) -> None:
        self.stats = KroneckerStats(self.names, {n: s.numel() for n, s in self.shapes.items()}, self.kfac_approx)
        self.diagonal: dict[str, Tensor] = {}
        self.terms_count, self.samples = 0, 0

    # ------------------------------------------------------------------ tracking
    @contextmanager
    def track(self, y: Tensor, attention_mask: Tensor | None = None) -> Iterator[None]:
        """Record the statistics of the forward pass run inside the block, for labels ``y`` (the micro-batch's;
        ``attention_mask`` for padded sequences). One forward pass of the model per block."""
        B = int(y.shape[0])
        done: list[bool] = []
        with instrumented(self.model, self.names) as (rec, plan):
            if plan.exact:
                raise MetricError(f"statistics from the training step need a layer rule for every parameter; "
                                  f"{plan.exact} have none. {MATRIX_FREE_HINT}, or use statistics='separate'")

            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if done:
                    raise MetricError("one forward pass of the model per track() block (its sites are recorded "
                                      "once per micro-batch)")
                check_calls(rec, self.names, B)
                self._collect(list(rec.sites), network_output(output), y)
                done.append(True)

            rec.begin(B, attention_mask)
            handle = self.model.register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()
        if not done:
            raise MetricError("no forward pass of the model ran inside track()")
        self.seen += B
        self.samples += B
        self.terms_count += self.loss.count(y)

    def _collect(self, sites: list[Any], out: Tensor, y: Tensor) -> None:
        """The micro-batch's sums: K backward passes from the output to the probes, the graph kept for training."""
        U = block_output_factors(self.loss, out.detach(), y, self.kind, self.seen, self.mc_samples, self.seed)
        U = U.to(out.dtype)
        probes = [s.probe for s in sites]
        if self.statistic == "kronecker":
            self.stats.add_inputs(sites)
        for k in range(U.shape[0]):
            grads = torch.autograd.grad(out, probes, U[k], retain_graph=True, allow_unused=True)
            b = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(probes, grads)]
            if self.statistic == "kronecker":
                self.stats.add_outputs(sites, b)
            else:
                for name, g in site_gradients(sites, b, self.shapes, per_sample=True).items():
                    sq = g.pow(2).sum(0)
                    self.diagonal[name] = sq if name not in self.diagonal else self.diagonal[name] + sq

    # ------------------------------------------------------------------ steps
    @property
    def pending(self) -> bool:
        """Whether micro-batches were tracked since the last :meth:`end_step`."""
        return self.samples > 0

    def averaged(self, carry: bool = False) -> dict[str, Any]:
        """The moving averages with the tracked micro-batches' statistics folded in (not yet committed:
        :meth:`commit`); with ``carry``, a step that tracked nothing keeps the current averages."""
        if carry and not self.pending and self.average is not None:
            return self.average
        if not self.pending:
            raise ProblemError("no statistics were tracked for this step: run the forward pass inside "
                               "`with optimizer.track(y):` (statistics='step')")
        sums = self.stats.result() if self.statistic == "kronecker" else self.diagonal
        sums, terms, samples = self.reduce(sums, self.terms_count, self.samples)
        scale = 1.0 / max(terms, 1) if self.reduction == "mean" else 1.0
        if self.statistic == "kronecker":
            G, A = sums
            new: dict[str, Any] = normalized_terms(self.names, G, A, scale, samples)
        else:
            new = {n: sums[n] * scale for n in self.names}
        if self.average is None:
            return new
        return {n: _tree_ema(self.average[n], new[n], self.decay) for n in self.names}

    def reduce(self, sums: Any, terms: int, samples: int) -> tuple[Any, int, int]:
        """The step's sums, loss-term count and sample count over every process that trained on a share of the
        step (here: this one's; data-parallel subclasses add the other ranks')."""
        return sums, terms, samples

    def commit(self, average: dict[str, Any]) -> None:
        """Install ``average`` (from :meth:`averaged`) and start the next step's sums."""
        self.average = average
        self._reset()

    def metric(self, average: dict[str, Any], damping: float, names: Sequence[str] | None = None,
               previous: Metric | None = None) -> Metric:
        """M_δ from moving averages, eigendecomposed now; ``names``: only those parameters' Kronecker blocks.
        ``previous`` (a :class:`KFACMetric` of the same parameters): its eigenbases are updated by one step of
        subspace iteration (:func:`subspace_eigh`) instead of full eigendecompositions."""
        if self.statistic == "kronecker":
            names = self.names if names is None else [n for n in self.names if n in set(names)]
            factors = factors_from_terms({n: average[n] for n in names})
            eigh = _subspace_updates(factors, previous) if isinstance(previous, KFACMetric) else None
            return KFACMetric(names, [self.shapes[n] for n in names], factors, damping=damping, kind=self.kind,
                              eigh=eigh)
        d = torch.cat([average[n].reshape(-1) for n in self.names])
        return DiagonalMetric(d, damping, kind=self.kind)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """The averages and the sample count as plain values and tensors (a structured factor as its parts)."""
        return {"seen": self.seen, "average": None if self.average is None else _tree_map(_plain, self.average)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.average = None if state["average"] is None else _tree_map(_structured, state["average"])
        self._reset()


def subspace_eigh(F: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """An eigendecomposition of the symmetric PSD factor F updated from a previous eigenbasis Q by one step of
    subspace iteration: Q' = qr(F Q P), λ = diag(Q'ᵀ F Q') clipped at 0, with P ordering Q's columns by their
    Rayleigh quotients, largest first — the eigenbasis update of SOAP (Vyas et al.
    2024, "SOAP: Improving and Stabilizing Shampoo using Adam", after Shampoo's preconditioner updates). Exact when
    Q is an eigenbasis of F; for a slowly changing F (a moving average) it tracks the eigenbasis at the cost of two
    matrix products and a QR instead of an eigendecomposition, in F's own precision."""
    Q = Q.to(F.dtype)
    order = ((F @ Q) * Q).sum(0).argsort(descending=True)  # large directions first: QR keeps them, and the
    Qn, _ = torch.linalg.qr(F @ Q[:, order])  # rounding-level ones (zero eigenvalues) are orthogonalized last
    lam = ((F @ Qn) * Qn).sum(0).clamp_min(0)
    return lam, Qn


def _subspace_updates(factors: dict[str, tuple[Any, ...]], previous: KFACMetric) -> dict[str, list[Any]]:
    """Per parameter, the (λ, Q) of its dense Kronecker factors from :func:`subspace_eigh` on the previous
    metric's eigenbases (parameters whose previous block is not a plain dense Kronecker block are left out: they
    are eigendecomposed)."""
    blocks = {b.name: b for b in previous.blocks}
    out: dict[str, list[Any]] = {}
    for name, fs in factors.items():
        b = blocks.get(name)
        if (b is None or b.structured is not None or b.corrected is not None or len(b.evecs) != len(fs)
                or not all(isinstance(F, Tensor) and F.ndim == 2 for F in fs)):
            continue
        if any(U is None or tuple(U.shape) != tuple(F.shape) for U, F in zip(b.evecs, fs)):
            continue
        out[name] = [subspace_eigh(F, U) for F, U in zip(fs, b.evecs)]
    return out


def _plain(x: Any) -> Any:
    return {"diag": x.diag, "rows": x.rows, "weights": x.weights} if isinstance(x, LowRankFactor) else x


def _structured(x: Any) -> Any:
    return LowRankFactor(x["diag"], x["rows"], x["weights"]) if isinstance(x, dict) else x


def _tree_map(fn: Any, tree: Any) -> Any:
    if isinstance(tree, dict) and not set(tree) == {"diag", "rows", "weights"}:
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return fn(tree)


def _tree_ema(old: Any, new: Any, decay: float) -> Any:
    if isinstance(old, (list, tuple)):
        if len(old) != len(new):
            raise MetricError("the Kronecker terms of a parameter changed between steps (a weight used in another "
                              "orientation): its moving average is undefined")
        return type(old)(_tree_ema(a, b, decay) for a, b in zip(old, new))
    return _ema(old, new, decay)
