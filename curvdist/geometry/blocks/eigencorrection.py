"""Eigenvalue corrections of Kronecker-factored blocks: EKFAC (George, Laurent, Bouthillier, Ballas & Vincent,
NeurIPS 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis").

A Kronecker block F₁ ⊗ F₂ of a weight (its two factors in the parameter's layout,
:mod:`curvdist.geometry.metrics.kfac`) has the eigenbasis Q = Q₁ ⊗ Q₂ (Fᵢ = Qᵢ diag(λᵢ) Qᵢᵀ) and the eigenvalues
λ₁ ⊗ λ₂. EKFAC keeps the basis and replaces the eigenvalues by the diagonal of the curvature block C_W in it:

    E[i, j] = (Qᵀ C_W Q)_{(i,j),(i,j)} = s · Σ_n Σ_k (Q₁ᵀ W^k_n Q₂)[i, j]²,

W^k_n = ∂(U[k, n]ᵀ f_n)/∂W the gradient of sample n for the output-space vector k
(:func:`~curvdist.operators.output_space.output_factors`: Σ_k U[k, n] U[k, n]ᵀ = Λ_n exactly for the type-2 GGN,
sampled labels / √S for the Monte-Carlo Fisher, the observed labels for the empirical Fisher), summed over all
positions and all uses of the weight (a weight tied across orientations has one per-sample gradient). For the
type-2 statistic E is exactly diag(Qᵀ GGN_W Q), whatever factor of Λ_n is used; of all matrices with eigenbasis Q
it is the one nearest to GGN_W in Frobenius norm (George et al. 2018, §3). The Monte-Carlo labels are those of the
Kronecker factors (keyed by seed and global sample index), so factors and correction see the same draws.

A factor above ``structured_above`` (a vocabulary side, kept structured by the Kronecker statistics) contributes the
identity basis on its side: the exact eigenbasis when that factor is diagonal (an embedding's token counts), and
otherwise the rule Shampoo/SOAP implementations apply to dimensions above their ``max_precond_dim``. E is then still
the exact diagonal of C_W in the basis used, in memory linear in the vocabulary.

Cost per output vector: the per-sample gradients of each weight (B × its size) and their rotation,
B·(n₁²n₂ + n₁n₂²) operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ...errors import MetricError
from ...problem.problem import Problem
from .kronecker import probe_passes, site_gradients
from .probes import Site


def rotate(V: Tensor, Q1: Tensor | None, Q2: Tensor | None, transpose: bool = True) -> Tensor:
    """Q₁ᵀ V Q₂ (``transpose``) or Q₁ V Q₂ᵀ over the last two axes of V (leading axes batch), a basis of None being
    the identity."""
    if Q1 is not None:
        V = torch.matmul(Q1.T if transpose else Q1, V)
    if Q2 is not None:
        V = torch.matmul(V, Q2 if transpose else Q2.T)
    return V


def rotated_squares(g: Tensor, Q1: Tensor | None, Q2: Tensor | None) -> Tensor:
    """Σ_n (Q₁ᵀ g_n Q₂)² for per-sample gradients g (n, *shape) of a weight, in its (shape[0], rest) layout, in
    g's dtype."""
    Q1, Q2 = (None if Q is None else Q.to(g.dtype) for Q in (Q1, Q2))
    return rotate(g.reshape(g.shape[0], g.shape[1], -1), Q1, Q2).square().sum(0)


class EigenCorrection:
    """Σ_n Σ_k (Q₁ᵀ W^k_n Q₂)² per weight, accumulated site by site (see the module docstring).

    Args:
        bases: per weight its eigenbases (Q₁, Q₂) in the parameter's layout, None for the identity.
        shapes: the weights' shapes.
    """

    def __init__(self, bases: Mapping[str, tuple[Tensor | None, Tensor | None]],
                 shapes: Mapping[str, torch.Size]) -> None:
        self.bases = dict(bases)
        self.shapes = {n: torch.Size(shapes[n]) for n in self.bases}
        self.sums: dict[str, Tensor] = {}

    def add(self, sites: Sequence[Site], grads: Sequence[Tensor]) -> None:
        """The squared rotated per-sample gradients of one output vector (``grads[i]``: the probe gradient of
        ``sites[i]``), one weight at a time (memory: one weight's per-sample gradients)."""
        used = {name for s in sites for name in s.params.values()}
        for name, (Q1, Q2) in self.bases.items():
            if name not in used:
                continue
            g = site_gradients(sites, grads, {name: self.shapes[name]}, per_sample=True)[name]
            R = rotated_squares(g, Q1, Q2)
            self.sums[name] = R if name not in self.sums else self.sums[name] + R

    def result(self) -> dict[str, Tensor]:
        """The unscaled sums, in each weight's (n₁, n₂) layout."""
        missing = sorted(set(self.shapes) - set(self.sums))
        if missing:
            raise MetricError(f"no per-sample gradients reached {missing}: no site uses them")
        return dict(self.sums)


def eigencorrection_sums(problem: Problem, bases: Mapping[str, tuple[Tensor | None, Tensor | None]], kind: str,
                         mc_samples: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """Σ_n Σ_k (Q₁ᵀ W^k_n Q₂)² over the problem's samples for the weights in ``bases`` (unscaled: multiply by the
    problem's scale s), with the output-space vectors of the statistic ``kind`` (``ggn``, ``fisher_mc``,
    ``empirical``) and the labels of ``seed`` — sums, so data shards add."""
    acc = EigenCorrection(bases, dict(zip(problem.param_names, problem.shapes)))
    for batch, _ in probe_passes(problem, kind, mc_samples, seed):
        for b in batch.gradients():
            acc.add(batch.sites, b)
    return acc.result()
