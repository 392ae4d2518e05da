"""Eigenvalue-corrected Kronecker-factored metric: EKFAC (George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS
2018), the basis of SOAP (Vyas et al. 2024).

The matrix
----------
M is block-diagonal over the selected parameters, like KFAC (:mod:`.kfac`). A weight's block keeps the eigenbasis
Q = Q_G ⊗ Q_A of its Kronecker factors G ⊗ A (expand or reduce, Eschenhagen et al. 2023) and takes as eigenvalues
the diagonal of the curvature block in that basis:

    M_W = Q diag(E) Qᵀ,    E[i, j] = s · Σ_n Σ_k (Q_Gᵀ W^k_n Q_A)[i, j]²

(:mod:`curvdist.geometry.blocks.eigencorrection`; W^k_n the per-sample gradient for output vector k). Every other
block (biases, norm parameters, parameters without a layer rule) is its exact block, as in KFAC, which is its own
eigenvalue correction. ``fisher_type`` chooses the curvature, as in curvlinops' ``EKFACLinearOperator``:

==============  =====================================================================================  ============
``type2``       the GGN: E = diag(Qᵀ GGN_W Q) exactly (the output-space factor of each Λ_n)             deterministic
``mc``          the Fisher, ``mc_samples`` labels per loss term drawn from the model's predictive        sampled
                distribution (default; the labels of the ``kfac`` metric with the same ``seed``)
``empirical``   the empirical Fisher (observed labels)                                                  data-defined
==============  =====================================================================================  ============

For a weight applied once per sample EKFAC's diagonal in the KFAC eigenbasis is at least as close to the true
block (Frobenius) as KFAC's λ_G ⊗ λ_A (George et al. 2018, §3.1); for weights shared over positions the correction
uses the per-sample gradient summed over the positions (both weight-sharing approximations), as curvlinops does.

A factor above ``structured_above`` (a vocabulary) contributes the identity basis on its side
(:mod:`curvdist.geometry.blocks.eigencorrection`): exact for an untied embedding, whose token factor is diagonal;
for a language-model head or a tied embedding the block is diagonal in the vocabulary index, as in SOAP/Shampoo's
``max_precond_dim`` rule. Memory stays linear in the vocabulary.

Damping and operations: M_δ = M + δR with R = blockdiag(w_p I) (``damping_weights``); in the orthonormal basis Q
every power of a block is elementwise, so apply, solve, M^{-1/2} (symmetric) and log det are exact. Reparametrized
problems: under θ_p = c_p ψ_p on every tensor the ψ block is c_p² times the θ block (same basis, E scaled), as for
KFAC; other Jacobians are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ...errors import MetricError
from ...problem.problem import Problem
from ..blocks.kronecker import DENSE_MAX, STRUCTURED_ABOVE
from .kfac import KFACMetric, _is_structured, _per_tensor_scales, eigh_psd, kfac_sums, normalized_factors

__all__ = ["FISHER_TYPES", "ekfac", "ekfac_bases", "ekfac_from_corrections"]

#: EKFAC's curvature → the output-space statistic of the own kernels
FISHER_TYPES = {"type2": "ggn", "mc": "fisher_mc", "empirical": "empirical"}


def statistic_of(fisher_type: str, mc_samples: int) -> str:
    """The statistic of ``fisher_type`` (:data:`FISHER_TYPES`); ``mc_samples`` other than 1 only for ``mc``."""
    if fisher_type not in FISHER_TYPES:
        raise MetricError(f"unknown fisher_type {fisher_type!r} of the ekfac metric; choose one of "
                          f"{', '.join(sorted(FISHER_TYPES))}")
    if fisher_type != "mc" and mc_samples != 1:
        raise MetricError(f"mc_samples={mc_samples!r} applies to fisher_type 'mc' only (got {fisher_type!r})")
    return FISHER_TYPES[fisher_type]


def ekfac_bases(factors: Mapping[str, tuple[Any, ...]]) -> dict[str, list[tuple[Tensor, Tensor | None]]]:
    """Per two-factor block the eigendecompositions [(λ_G, Q_G), (λ_A, Q_A)] of its factors, Q = None (identity)
    for a structured factor (λ then its diagonal)."""
    bases: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
    for name, fs in factors.items():
        if len(fs) != 2:
            continue
        pairs: list[tuple[Tensor, Tensor | None]] = []
        for F in fs:
            if _is_structured(F):
                pairs.append((F if isinstance(F, Tensor) else F.diagonal(), None))
            else:
                pairs.append(eigh_psd(F, name))
        bases[name] = pairs
    return bases


def ekfac_from_corrections(names: list[str], shapes: list[torch.Size], factors: Mapping[str, tuple[Any, ...]],
                           bases: Mapping[str, list[tuple[Tensor, Tensor | None]]], corrections: Mapping[str, Tensor],
                           damping: float, damping_weights: Mapping[str, float] | None = None) -> KFACMetric:
    """The EKFAC metric from normalized factors (single-factor blocks), the bases of the two-factor blocks and
    their scaled corrected eigenvalues."""
    return KFACMetric(names, shapes, factors, damping=damping, kind="ekfac", eigh=bases,  # type: ignore[arg-type]
                      damping_weights=damping_weights, corrections=corrections)


def ekfac(problem: Problem, damping: float = 0.0, fisher_type: str = "mc", mc_samples: int = 1, seed: int = 0,
          kfac_approx: str = "expand", dense_max: int = DENSE_MAX, structured_above: int = STRUCTURED_ABOVE,
          damping_weights: Mapping[str, float] | None = None, backend: str = "auto") -> KFACMetric:
    """The EKFAC metric of the problem's selected parameters (see the module docstring): Kronecker factors and
    their eigenbases as for ``kfac``, then a second pass over the data for the corrected eigenvalues.

    ``fisher_type``: ``"type2"``, ``"mc"`` (default) or ``"empirical"``; ``mc_samples``, ``seed``: the sampled
    labels (``mc`` only); ``kfac_approx``, ``dense_max``, ``structured_above``, ``damping_weights``: as for
    :func:`~curvdist.geometry.metrics.kfac.kfac`. Computed by curvdist's own kernels (``backend`` ``auto`` or
    ``torch``: the correction needs per-sample gradients, which BackPACK's Kronecker extensions do not give).

    Raises:
        MetricError: an unknown ``fisher_type``, ``mc_samples`` ≠ 1 with a deterministic type, ``backend``
            ``backpack``, a parameter without a block (as for kfac), a reparametrization whose Jacobian is not
            c·I on every tensor.
        SingularMetricError: damping 0 and a corrected eigenvalue is 0.
    """
    from ..blocks.eigencorrection import eigencorrection_sums

    statistic = statistic_of(fisher_type, mc_samples)
    if backend not in ("auto", "torch"):
        raise MetricError(f"the ekfac metric is computed by curvdist's own kernels (backend 'auto' or 'torch'), "
                          f"got {backend!r}: its eigenvalue correction needs per-sample gradients")
    scalar = _per_tensor_scales(problem, "ekfac")
    theta, c = (problem, None) if scalar is None else scalar
    G, A = kfac_sums(theta, mc_samples, seed, backend="torch", kfac_approx=kfac_approx, dense_max=dense_max,
                     structured_above=structured_above, statistic=statistic)
    factors_t = normalized_factors(theta.param_names, G, A, problem.scale, problem.num_samples)
    bases_t = ekfac_bases(factors_t)
    sums = eigencorrection_sums(theta, {n: (p[0][1], p[1][1]) for n, p in bases_t.items()}, statistic,
                                mc_samples, seed)
    rename = dict(zip(theta.param_names, problem.param_names))
    factor = {t: 1.0 if c is None else c[rename[t]] ** 2 for t in theta.param_names}
    factors = {rename[t]: tuple(f * factor[t] if k == 0 else f for k, f in enumerate(fs))
               for t, fs in factors_t.items()}
    bases = {rename[t]: pairs for t, pairs in bases_t.items()}
    corrections = {rename[t]: E * (problem.scale * factor[t]) for t, E in sums.items()}
    return ekfac_from_corrections(list(problem.param_names), list(problem.shapes), factors, bases, corrections,
                                  damping, damping_weights)
