"""Metric statistics as per-shard sums → metric, once for every place the samples live.

Each shard computes the undamped, unscaled sums of its own samples (:func:`diagonal_sum`: Σ_n of a diagonal
statistic; :func:`kronecker_sums`: G = Σ_n B_n B_nᵀ and A = Σ_n a_n a_nᵀ with the count A averages over — the
layout of :func:`~curvdist.geometry.metrics.kfac.kfac_sums`); the problem's
:class:`~curvdist.problem.reducers.ShardReducer` adds them in shard order; the metric is then formed from the global
sums with the global scale s and sample count N:

    diagonal:   M = s · Σ_shards d_shard,
    Kronecker:  G ← s · Σ_shards G_shard,  A ← Σ_shards A_shard / Σ_shards C_shard,  per layer G ⊗ A,

and the Kronecker factors are eigendecomposed where the reducer spreads the layers (Ray workers by cost, as
distributed K-FAC does: Osawa et al. 2019; Pauloski et al. 2020), or here. Sampled statistics (``diag_fisher_mc``,
``kfac``) draw each sample's labels from a key of (seed, global sample index, position): every shard draws what one
process on all samples draws (a shard's problem knows its ``sample_offset``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...errors import MetricError
from ...problem.reducers import Shard, tree_map
from ...problem.sharded import ShardedProblem
from .base import DiagonalMetric
from .kfac import KFACMetric, eigh_psd, normalized_factors


def diagonal_sum(shard: Shard, kind: str, options: dict[str, Any]) -> Tensor:
    """Σ_{n∈shard} of the diagonal statistic ``kind`` (diag_ggn, diag_fisher_mc, empirical_fisher_diag), flat."""
    from .backpack_metrics import raw_diagonal

    return raw_diagonal(shard.problem, kind, **options).detach()


def kronecker_sums(shard: Shard, exact: bool, options: dict[str, Any]
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
    """The shard's Kronecker sums G, A (None for biases), see :func:`~curvdist.geometry.metrics.kfac.kfac_sums`."""
    from .kfac import kfac_sums

    G, A = kfac_sums(shard.problem, exact=exact, **options)
    return tree_map(lambda t: t.detach(), G), tree_map(lambda t: t.detach(), A)


def factor_eigh(factors: dict[str, list[Tensor]]) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """Eigendecompositions of the given layers' Kronecker factors (one worker's share of the layers); none for a
    diagonal block."""
    return {n: [eigh_psd(F, n) for F in fs if isinstance(F, Tensor) and F.ndim == 2] for n, fs in factors.items()}


def reduced_diagonal(problem: ShardedProblem, kind: str, options: dict[str, Any]) -> Tensor:
    """Σ_shards d_shard (unscaled), on the problem's device in its dtype."""
    return problem.reducer.sum(diagonal_sum, kind, dict(options)).to(problem.device, problem.dtype)


def diagonal_metric(problem: ShardedProblem, kind: str, damping: float, damping_diagonal: Tensor | None = None,
                    **options: Any) -> DiagonalMetric:
    """The damped diagonal metric s · Σ_shards d_shard + δ·diag(r) of a sharded problem (r = ``damping_diagonal``,
    default 1: see :mod:`curvdist.geometry.damping`)."""
    return DiagonalMetric(reduced_diagonal(problem, kind, options) * problem.scale, damping, kind=kind,
                          damping_diagonal=damping_diagonal)


def reduced_kronecker(problem: ShardedProblem, exact: bool, options: dict[str, Any]
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
    """(Σ_shards G_shard, Σ_shards A_shard) per parameter, in the problem's dtype."""
    G, A = problem.reducer.sum(kronecker_sums, exact, dict(options))

    def to(t: Tensor) -> Tensor:
        return t.to(device=problem.device, dtype=problem.dtype)

    return ({n: tree_map(to, G[n]) for n in problem.param_names}, {n: tree_map(to, A[n]) for n in problem.param_names})


def kronecker_from_sums(problem: ShardedProblem, G: dict[str, Tensor], A: dict[str, Tensor | None], damping: float,
                        kind: str, damping_weights: dict[str, float] | None = None) -> KFACMetric:
    """KFAC/KFLR from the reduced sums: normalized with the global s and N, factors eigendecomposed by the reducer
    (layers spread over the shards by cost n³)."""
    factors = normalized_factors(problem.param_names, G, A, problem.scale, problem.num_samples)
    costs = {n: float(sum(f.shape[0] ** 3 for f in fs if isinstance(f, Tensor) and f.ndim == 2))
             for n, fs in factors.items()}
    eigh = problem.reducer.map(factor_eigh, {n: list(fs) for n, fs in factors.items()}, costs)
    eigh = tree_map(lambda t: t.to(problem.device), eigh)
    return KFACMetric(problem.param_names, problem.shapes, factors, damping=damping, kind=kind, eigh=eigh,
                      damping_weights=damping_weights)


def kronecker_metric(problem: ShardedProblem, damping: float, exact: bool,
                     damping_weights: dict[str, float] | None = None, **options: Any) -> KFACMetric:
    """The damped KFAC (``exact=False``) or KFLR metric of a sharded problem (per-block damping weights: see
    :mod:`curvdist.geometry.damping`)."""
    G, A = reduced_kronecker(problem, exact, options)
    return kronecker_from_sums(problem, G, A, damping, "kflr" if exact else "kfac", damping_weights)


def eigencorrection_shard_sums(shard: Shard, bases: dict[str, tuple[Tensor | None, Tensor | None]], statistic: str,
                               options: dict[str, Any]) -> dict[str, Tensor]:
    """The shard's EKFAC sums Σ_{n∈shard} Σ_k (Q₁ᵀ W^k_n Q₂)² in the given bases
    (:func:`~curvdist.geometry.blocks.eigencorrection.eigencorrection_sums`)."""
    from ..blocks.eigencorrection import eigencorrection_sums

    sums = eigencorrection_sums(shard.problem, bases, statistic, options.get("mc_samples", 1), options.get("seed", 0))
    return {n: t.detach() for n, t in sums.items()}


def ekfac_metric(problem: ShardedProblem, damping: float, fisher_type: str = "mc",
                 damping_weights: dict[str, float] | None = None, backend: str = "auto", **options: Any) -> KFACMetric:
    """EKFAC of a sharded problem: Kronecker sums reduced over the shards, the factors eigendecomposed by the
    reducer (layers spread by cost), then the bases sent to the shards for a second pass whose corrected-eigenvalue
    sums are reduced in turn (:mod:`.ekfac`)."""
    from .ekfac import ekfac_bases, ekfac_from_corrections, statistic_of

    statistic = statistic_of(fisher_type, options.get("mc_samples", 1))
    if backend not in ("auto", "torch"):
        raise MetricError(f"the ekfac metric is computed by curvdist's own kernels (backend 'auto' or 'torch'), "
                          f"got {backend!r}")
    G, A = reduced_kronecker(problem, False, dict(options, statistic=statistic, backend="torch"))
    factors = normalized_factors(problem.param_names, G, A, problem.scale, problem.num_samples)
    two = {n: list(fs) for n, fs in factors.items() if len(fs) == 2}
    costs = {n: float(sum(f.shape[0] ** 3 for f in fs if isinstance(f, Tensor) and f.ndim == 2))
             for n, fs in two.items()}
    bases = problem.reducer.map(ekfac_bases, two, costs)
    bases = tree_map(lambda t: t.to(problem.device), bases)
    sums = problem.reducer.sum(eigencorrection_shard_sums, {n: (p[0][1], p[1][1]) for n, p in bases.items()},
                               statistic, {k: options[k] for k in ("mc_samples", "seed") if k in options})
    corrections = {n: t.to(problem.device, problem.dtype) * problem.scale for n, t in sums.items()}
    return ekfac_from_corrections(list(problem.param_names), list(problem.shapes), factors, bases, corrections,
                                  damping, damping_weights)
