"""Kronecker-factor statistics from curvdist's own kernels (module probes, :mod:`.probes`; exact per-sample blocks,
:mod:`.exact`), for every layer type and every curvdist loss.

Notation. U[k, n] are the output-space factor columns of a batch
(:func:`~curvdist.operators.output_space.output_factors`: Σ_k U[k, n] U[k, n]ᵀ = Λ_n exactly for KFLR; sampled
output gradients / √S for KFAC, one sampled label per loss term, backpropagated for all positions at once). A weight
used at T positions per sample n (tokens, output pixels; several calls of a module or several modules sharing the
weight add positions) has inputs a_{n,t} and output-side vectors b^k_{n,t} = (∂f_n/∂z_{n,t})ᵀ U[k, n] at position t.
The two weight-sharing approximations of Eschenhagen et al. (NeurIPS 2023, "Kronecker-Factored Approximate
Curvature for Modern Neural Network Architectures") are, as sums over the samples (so that data shards add):

    expand (default)   G = Σ_{n,k,t} b^k_{n,t} b^k_{n,t}ᵀ,          A = Σ_{n,t} a_{n,t} a_{n,t}ᵀ,   C = N·T
    reduce             G = Σ_{n,k} (Σ_t b^k_{n,t})(Σ_t b^k_{n,t})ᵀ,  A = Σ_n ā_n ā_nᵀ,            C = N
                                                                     ā_n = (1/T) Σ_t a_{n,t}

(N the samples, N·T their positions) and the block of the metric is (s·G) ⊗ (A/C)
(:func:`curvdist.geometry.metrics.kfac.normalized_factors`; s = 1 or 1/(number of loss terms)). C counts what A
averages over — the positions (expand) or the samples (reduce) — and is summed with the statistics. For T = 1 both
are KFAC/KFLR (Martens & Grosse 2015, Botev et al. 2017). Positions whose ``attention_mask`` is 0 (padding) are left
out of A and C (their b is 0 when padding reaches no loss term, as with right padding and a causal mask). For an ``Embedding`` the inputs are one-hot token vectors (A: token counts for
expand) and the block is A ⊗ G in the weight's (V, d) layout; for a GPT-2 ``Conv1D`` (weight (in, out)) it is A ⊗ G
as well.

Single-factor blocks are exact: the bias of a Linear/Conv2d/Conv1D site (per-sample gradient Σ_t b), the weight and
bias of a LayerNorm/RMSNorm/BatchNorm site (Σ_t b ⊙ x̂ and Σ_t b), and every parameter without a site
(:mod:`.exact`): Σ_{n,k} g gᵀ, dense up to ``dense_max`` entries and its diagonal beyond.

A parameter used with both orientations — an embedding tied to the output head: rows indexed by the input token in
the embedding, by the output logit in the head — has one Kronecker term per orientation; the metric uses the nearest
Kronecker product of their sum (:func:`curvdist.geometry.metrics.kfac.nearest_kronecker`). On the first batch the
gradient the sites account for is compared with each parameter's gradient (:func:`check_site_gradients`), so a
parameter also used outside its modules is refused rather than given a block that misses that use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ...catalogue import KFACApproximation, parse
from ...errors import MetricError
from ...operators.output_space import output_factors
from ...problem.autodiff import differentiable_kernels
from ...problem.data import Inputs, batch_len
from ...problem.outputs import call
from ...problem.problem import Problem
from ...resources import check_allocation
from ..structured import LowRankFactor
from .exact import exact_block_sums
from .probes import IN_OUT, MATRIX_FREE_HINT, Plan, Site, check_calls, instrumented_copy

#: single-factor blocks with more entries than this are kept as exact diagonals (default of ``dense_max``)
DENSE_MAX = 4096

#: Kronecker factors of a larger dimension (a vocabulary) are kept structured: diagonal, or diagonal plus low rank
#: (default of ``structured_above``; :mod:`curvdist.geometry.structured`)
STRUCTURED_ABOVE = 4096

#: the output-space factors of each statistic kind: KFLR's exact factor of each sample's Λ_n; for sampled and
#: empirical statistics one label per loss term, backpropagated for all positions of a sample at once
PER_EVENT = {"ggn": False, "fisher_mc": True, "empirical": True}

#: the metrics computed from sites where no process holds the whole model (pipeline stages, ZeRO-3 partitions):
#: kind → (statistic, output-space factor kind)
BLOCK_METRICS = {"kfac": ("kronecker", "fisher_mc"), "kflr": ("kronecker", "ggn"),
                 "diag_ggn": ("diagonal", "ggn"), "diag_fisher_mc": ("diagonal", "fisher_mc"),
                 "empirical_fisher_diag": ("diagonal", "empirical")}


def _add(acc: dict[Any, Any], key: Any, value: Any) -> None:
    acc[key] = value if acc.get(key) is None else acc[key] + value


def _mask(site: Site) -> Tensor:
    """(B, T) weights of the positions for the input statistics (1 where no attention mask applies)."""
    B, T = site.inputs.shape[:2]
    if site.mask is None:
        return torch.ones(B, T, dtype=site.probe.dtype, device=site.probe.device)
    return site.mask.to(site.probe.dtype)


def _one_hot(site: Site) -> Tensor:
    """Per-sample weighted token histograms (B, V) of an embedding site (padding_idx left out)."""
    idx = site.inputs
    w = _mask(site)
    if site.extra["padding_idx"] is not None:
        w = w * (idx != site.extra["padding_idx"]).to(w.dtype)
    hist = torch.zeros(idx.shape[0], site.extra["vocab"], dtype=w.dtype, device=w.device)
    return hist.scatter_add_(1, idx, w)


class KroneckerStats:
    """Summed Kronecker statistics of a set of parameters, accumulated site by site (see the module docstring).

    Args:
        names: the parameters, in order.
        numels: their sizes (single-factor blocks above ``dense_max`` entries are kept as diagonals).
        approx: ``"expand"`` or ``"reduce"``.
    """

    def __init__(self, names: Sequence[str], numels: Mapping[str, int], approx: str = "expand",
                 dense_max: int = DENSE_MAX, structured_above: int = STRUCTURED_ABOVE) -> None:
        self.names = list(names)
        self.approx = parse(KFACApproximation, approx, "kfac_approx").value
        self.dense = {n: numels[n] <= dense_max for n in names}
        self.structured_above = structured_above
        self.G: dict[tuple[str, str], Tensor] = {}  # (weight, orientation) -> output-side sum
        self.A: dict[tuple[str, str], Tensor] = {}  # (weight, orientation) -> input-side sum
        self.C: dict[tuple[str, str], int] = {}  # (weight, orientation) -> what A averages over
        self.single: dict[str, Tensor | None] = {}  # exact single-factor sums (dense or diagonal)
        self.role: dict[str, str] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _role(self, name: str, role: str) -> None:
        if self.role.setdefault(name, role) != role:
            raise MetricError(f"{name} is used both as a Kronecker-factored weight and as a single-factor parameter "
                              f"(a bias or a norm parameter) in the forward pass; its block is not supported")

    @staticmethod
    def _weights(sites: Sequence[Site]) -> dict[tuple[str, str], list[int]]:
        """The sites of every Kronecker-factored weight and orientation, as indices into ``sites``."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(sites):
            w = s.params.get("weight")
            if w is not None and s.kind in ("linear", "embedding"):
                groups.setdefault((w, s.orientation), []).append(i)
        return groups

    def _gram(self, rows: Tensor, weights: Tensor | None = None) -> Tensor | LowRankFactor:
        """Σ_j w_j r_j r_jᵀ for the rows (k, n): dense n × n up to ``structured_above``, else a
        :class:`~curvdist.geometry.structured.LowRankFactor` of the non-zero rows (memory O(k·n))."""
        if rows.shape[-1] <= self.structured_above:
            return rows.T @ rows if weights is None else (rows * weights.reshape(-1, 1)).T @ rows
        keep = rows.abs().sum(1) > 0
        if weights is not None:
            keep = keep & (weights != 0)
        return LowRankFactor.from_rows(rows[keep], None if weights is None else weights[keep])

    def _diagonal(self, d: Tensor) -> Tensor:
        """diag(d): dense up to ``structured_above``, else the 1-d d (a structured diagonal factor)."""
        return torch.diag(d) if d.shape[0] <= self.structured_above else d

    @staticmethod
    def _add_factor(acc: dict[Any, Any], key: Any, value: Tensor | LowRankFactor) -> None:
        """Accumulate a factor sum; a structured sum whose rows outnumber its dimension is cheaper dense (and stays
        dense once it is)."""
        if isinstance(value, LowRankFactor) and isinstance(acc.get(key), Tensor):
            value = value.dense()
        _add(acc, key, value)
        F = acc[key]
        if isinstance(F, LowRankFactor) and F.rank >= F.n:
            check_allocation(F.n**2 * F.diag.element_size(),
                             f"the Kronecker factor of {key[0]} ({F.rank} rows over dimension {F.n}, densified)",
                             "use fewer tokens (and mc_samples) in the metric's data, or a diagonal metric")
            acc[key] = F.dense()

    # ------------------------------------------------------------------ input side (once per batch)
    def add_inputs(self, sites: Sequence[Site]) -> None:
        """The input-side sums of one batch's sites (independent of the output vectors)."""
        for key, group in self._weights(sites).items():
            self._role(key[0], "kron")
            if self.approx == "expand":
                for s in (sites[i] for i in group):
                    w = _mask(s)
                    if s.kind == "embedding":
                        self._add_factor(self.A, key, self._diagonal(_one_hot(s).sum(0)))
                    else:
                        a = s.inputs.reshape(-1, s.inputs.shape[-1])
                        self._add_factor(self.A, key, self._gram(a, w.reshape(-1)))
                    _add(self.C, key, round(float(w.sum())))
            else:
                total: Tensor | None = None
                count: Tensor | None = None
                for s in (sites[i] for i in group):
                    w = _mask(s)
                    feats = _one_hot(s) if s.kind == "embedding" else (s.inputs * w.unsqueeze(-1)).sum(1)
                    total = feats if total is None else total + feats
                    c = w.sum(1)
                    count = c if count is None else count + c
                assert total is not None and count is not None
                keep = count > 0
                mean = total[keep] / count[keep].unsqueeze(1)
                self._add_factor(self.A, key, self._gram(mean))
                _add(self.C, key, int(keep.sum()))

    # ------------------------------------------------------------------ output side (once per output vector)
    def add_outputs(self, sites: Sequence[Site], grads: Sequence[Tensor]) -> None:
        """The output-side sums for one output vector, ``grads[i]`` the gradient at the probe of ``sites[i]``."""
        per_sample: dict[str, Tensor] = {}
        for key, group in self._weights(sites).items():
            bs = [grads[i] for i in group]
            if self.approx == "expand":
                for b in bs:
                    self._add_factor(self.G, key, self._gram(b.reshape(-1, b.shape[-1])))
            else:
                total = sum(b.sum(1) for b in bs)
                self._add_factor(self.G, key, self._gram(total))  # type: ignore[arg-type]
        for s, b in zip(sites, grads):
            for role, name in s.params.items():
                if role == "weight" and s.kind != "norm":
                    continue
                g = (b * s.inputs).sum(1) if (s.kind == "norm" and role == "weight") else b.sum(1)
                _add(per_sample, name, g)
        for name, g in per_sample.items():
            self._role(name, "single")
            _add(self.single, name, g.T @ g if self.dense[name] else g.pow(2).sum(0))

    # ------------------------------------------------------------------ result
    def take(self, names: Sequence[str]) -> dict[tuple[str, str], tuple[Any, Any, int]]:
        """Remove and return the Kronecker sums (G, A, C) of the parameters ``names``, per (weight, orientation)
        (a pipeline stage hands the sums of a weight tied to an earlier stage to that stage: :meth:`merge`)."""
        keys = [k for k in self.A if k[0] in set(names)]
        return {k: (self.G.pop(k, None), self.A.pop(k), self.C.pop(k, 0)) for k in keys}

    def merge(self, sums: Mapping[tuple[str, str], tuple[Any, Any, int]]) -> None:
        """Add sums taken from another set of statistics (:meth:`take`)."""
        for key, (G, A, C) in sums.items():
            if G is not None:
                self._add_factor(self.G, key, G)
            self._add_factor(self.A, key, A)
            _add(self.C, key, C)

    def result(self, names: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The statistics (of ``names``, default all) in the layout of :func:`~curvdist.geometry.metrics.kfac.kfac_sums`: for a single-factor
        block ``G[name]`` is its sum (dense, or 1-d: the diagonal) and ``A[name]`` is None; for a Kronecker block
        ``G[name]`` and ``A[name]`` are lists with one entry per term (per orientation the parameter is used in),
        the first and the second factor of the term in the parameter's layout, each either an output-side sum (a
        tensor, scaled by s) or an input-side ``(sum, C)`` (divided by C)."""
        G: dict[str, Any] = {}
        A: dict[str, Any] = {}
        for name in self.names if names is None else names:
            terms = sorted(k for k in self.A if k[0] == name)
            if terms:
                firsts, seconds = [], []
                for key in terms:
                    out = self.G.get(key)
                    if out is None:  # pragma: no cover - every batch backpropagates at least one vector
                        raise MetricError(f"no output-side statistics for {name}")
                    inp = (self.A[key], max(self.C.get(key, 0), 1))
                    first, second = (inp, out) if key[1] == IN_OUT else (out, inp)
                    firsts.append(first)
                    seconds.append(second)
                G[name], A[name] = firsts, seconds
            elif self.single.get(name) is not None:
                G[name], A[name] = self.single[name], None
            else:
                raise MetricError(f"no Kronecker statistics for {name}")
        return G, A


def _site_gradient(s: Site, b: Tensor, role: str, per_sample: bool) -> Tensor:
    """The gradient of ``role`` at site ``s`` for the probe gradient b (B, T, out): summed over the batch, or per
    sample (B, *shape in the site's layout)."""
    axes = 1 if per_sample else (0, 1)
    if s.kind == "norm":
        return (b * s.inputs if role == "weight" else b).sum(axes)
    if role != "weight":
        return b.sum(axes)
    if s.kind == "embedding":
        B, d, V = b.shape[0], b.shape[-1], s.extra["vocab"]
        if per_sample:
            g = torch.zeros(B, V, d, dtype=b.dtype, device=b.device)
            g.scatter_add_(1, s.inputs.unsqueeze(-1).expand(-1, -1, d), b)
        else:
            g = torch.zeros(V, d, dtype=b.dtype, device=b.device)
            g.index_add_(0, s.inputs.reshape(-1), b.reshape(-1, d))
        if s.extra["padding_idx"] is not None:
            g[..., s.extra["padding_idx"], :] = 0
        return g
    if per_sample:
        g = torch.einsum("bto,bti->boi", b, s.inputs)
    else:
        g = b.reshape(-1, b.shape[-1]).T @ s.inputs.reshape(-1, s.inputs.shape[-1])  # (out, in)
    return g.transpose(-1, -2) if s.orientation == IN_OUT else g


def site_gradients(sites: Sequence[Site], grads: Sequence[Tensor], shapes: Mapping[str, torch.Size],
                   per_sample: bool = False) -> dict[str, Tensor]:
    """The gradients Σ_sites ∂(Uᵀf)/∂θ of the parameters in ``shapes`` as the sites see them, from their inputs and
    probe gradients (``per_sample``: each sample's, shape (B, *shape))."""
    out: dict[str, Tensor] = {}
    for s, b in zip(sites, grads):
        for role, name in s.params.items():
            if name not in shapes:
                continue
            g = _site_gradient(s, b, role, per_sample)
            _add(out, name, g.reshape(b.shape[0], *shapes[name]) if per_sample else g.reshape(shapes[name]))
    return out


def check_site_gradients(sites: Sequence[Site], grads: Sequence[Tensor], true: Mapping[str, Tensor | None]) -> None:
    """Every use of a site parameter is a site: the gradient the sites account for equals the parameter's
    gradient (a parameter also used elsewhere — e.g. a weight read directly by its parent module — would
    otherwise silently lose that use's curvature)."""
    shapes = {n: t.shape for n, t in true.items() if t is not None}
    seen = site_gradients(sites, grads, shapes)
    skip = {n for s in sites if s.kind == "embedding" and s.extra.get("scale_grad_by_freq") for n in s.params.values()}
    for name, g in true.items():
        if g is None or name in skip:  # scale_grad_by_freq rescales the gradient, not the derivative
            continue
        g = g.to_dense() if g.is_sparse else g
        tol = torch.finfo(g.dtype).eps ** 0.5 * max(float(g.norm()), float(seen[name].norm()), 1e-30)
        if float((seen[name] - g).norm()) > tol:
            raise MetricError(f"{name} is used in the forward pass outside the modules that hold it (or by a "
                              f"module whose forward is not the layer it subclasses), so its Kronecker factors "
                              f"would miss that use; {MATRIX_FREE_HINT}")


def statistic_factors(problem: Problem, out: Tensor, y: Tensor, kind: str, batch_index: int, mc_samples: int,
                      seed: int) -> Tensor:
    """The output-space vectors U (K, *out.shape) of one batch for the statistic ``kind`` (``ggn``: KFLR,
    ``fisher_mc``: KFAC, ``empirical``), with the layout of :data:`PER_EVENT`."""
    try:
        return output_factors(problem, out, y, kind, problem.first_sample(batch_index), mc_samples, seed,
                              per_event=PER_EVENT[kind])
    except NotImplementedError as e:
        raise MetricError(f"the {problem.loss.name} loss cannot give exact output-space factors ({e}); use the "
                          f"sampled 'kfac' metric, or give the loss an output_hessian_sqrt") from e


def block_output_factors(loss: Any, out: Tensor, y: Tensor, kind: str, first: int, mc_samples: int, seed: int,
                         out_kind: str | None = None) -> Tensor:
    """The K output-space vectors of a micro-batch for the metric ``kind`` of :data:`BLOCK_METRICS` (see
    :func:`~curvdist.operators.output_space.output_factors`); ``first``: the global index of its first sample (the
    Monte-Carlo label keys). Kronecker statistics take one vector per event (token) and label, diagonals the exact
    factor of each sample's matrix — as the local kernels do. ``out_kind``: the Kronecker statistic of ``ekfac``
    (its ``fisher_type``'s :data:`PER_EVENT` kind)."""
    statistic, out_kind = ("kronecker", out_kind) if out_kind is not None else BLOCK_METRICS[kind]
    per_event = PER_EVENT[out_kind] if statistic == "kronecker" else False
    return output_factors(SimpleNamespace(loss=loss), out, y, out_kind, first, mc_samples, seed,  # type: ignore[arg-type]
                          per_event=per_event)


def attention_mask(X: Inputs) -> Tensor | None:
    """The batch's ``attention_mask`` (positions with 0 are padding), if it has one."""
    if isinstance(X, Mapping):
        m = X.get("attention_mask")
        return m if isinstance(m, Tensor) and m.ndim == 2 else None
    return None


@dataclass
class ProbeBatch:
    """One batch of an instrumented pass (:func:`probe_passes`): its inputs, output-space vectors U (K, *out),
    recorded sites, and :meth:`gradients`, the probe gradients b of each vector U[k] in turn."""

    index: int
    X: Inputs
    U: Tensor
    sites: list[Site]
    out: Tensor
    check: dict[str, Tensor]  # on the first batch, the parameters whose gradients check_site_gradients compares

    def gradients(self) -> Iterator[list[Tensor]]:
        probes = [s.probe for s in self.sites]
        names, params = list(self.check), list(self.check.values())
        K = self.U.shape[0]
        for k in range(K if probes else 0):
            extra = params if k == 0 else []
            grads = torch.autograd.grad(self.out, probes + extra, self.U[k], retain_graph=k < K - 1,
                                        allow_unused=True)
            b = [torch.zeros_like(p) if g is None else g for p, g in zip(probes, grads)]
            if extra:
                check_site_gradients(self.sites, b, dict(zip(names, grads[len(probes):])))
            yield b


def probe_passes(problem: Problem, kind: str, mc_samples: int, seed: int) -> Iterator[tuple[ProbeBatch, Plan]]:
    """Instrumented forward passes over the problem's batches (on a private copy of the model): per batch its
    sites and output-space vectors for the statistic ``kind`` (:data:`PER_EVENT`); the first batch also checks that
    the sites account for every use of their parameters (:func:`check_site_gradients`)."""
    if kind not in PER_EVENT:
        raise MetricError(f"unknown Kronecker statistic {kind!r}; choose one of {sorted(PER_EVENT)}")
    twin, rec, plan = instrumented_copy(problem.model, list(problem.param_names))
    twin_params = dict(twin.named_parameters())
    checked = {n: twin_params[n] for n in plan.site_params}
    try:
        for i, (X, y) in enumerate(problem.batches()):
            B = batch_len(X)
            rec.begin(B, attention_mask(X))
            for p in checked.values():  # the first batch also differentiates the parameters themselves
                p.requires_grad_(i == 0)
            with torch.enable_grad(), differentiable_kernels():
                out = call(twin, X)
                check_calls(rec, plan.site_params, B)
                U = statistic_factors(problem, out, y, kind, i, mc_samples, seed)
            # yielded outside the grad-mode and kernel contexts (the graph is recorded; the caller's own work on
            # the batch runs in its context)
            yield ProbeBatch(i, X, U, list(rec.sites), out, checked if i == 0 else {}), plan
    finally:
        for p in checked.values():
            p.requires_grad_(False)


def kfac_sums_probes(problem: Problem, mc_samples: int = 1, seed: int = 0, exact: bool = False,
                     kfac_approx: str = "expand", dense_max: int = DENSE_MAX, kind: str | None = None,
                     structured_above: int = STRUCTURED_ABOVE) -> tuple[dict[str, Any], dict[str, Any]]:
    """Summed Kronecker statistics (layout: :meth:`KroneckerStats.result`) of the problem's selected parameters;
    see the module docstring. ``kind``: ``ggn`` (KFLR, ``exact=True``), ``fisher_mc`` (KFAC, the default: the
    labels of the ``fisher_mc`` operator with the same seed) or ``empirical`` (the observed labels)."""
    kind = kind or ("ggn" if exact else "fisher_mc")
    names = list(problem.param_names)
    numels = {n: s.numel() for n, s in zip(names, problem.shapes)}
    stats = KroneckerStats(names, numels, kfac_approx, dense_max, structured_above)
    for batch, plan in probe_passes(problem, kind, mc_samples, seed):
        stats.add_inputs(batch.sites)
        for b in batch.gradients():
            stats.add_outputs(batch.sites, b)
        exact_block_sums(problem, plan.exact, batch.X, batch.U, stats.dense, stats.single)
    return stats.result()
