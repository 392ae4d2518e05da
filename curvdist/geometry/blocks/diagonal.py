"""Exact diagonals of GGN-type matrices from per-sample vector-Jacobian products with ``torch.func``.

For the matrix C = s · Σ_n J_nᵀ (Σ_k U[k, n] U[k, n]ᵀ) J_n (J_n = ∂f_n/∂θ, U from
:func:`~curvdist.operators.output_space.output_factors`):

    diag(C) = s · Σ_n Σ_k (J_nᵀ U[k, n])²        (elementwise square)

— the exact diagonal of the GGN (``ggn``), of the sampled Fisher with the ``fisher_mc`` operator's labels
(``fisher_mc``) or of the empirical Fisher (``empirical``). The per-sample products J_nᵀ u are vectorized with
``vmap`` over the samples of a batch (in chunks) and over k. Unlike layer rules this covers every parameter of
every differentiable model — LayerNorm, Embedding, attention, a model's own parameters — at the price of one
VJP per (sample, k).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vjp, vmap

from ...operators.output_space import output_factors
from ...problem.data import Inputs, batch_len, slice_inputs
from ...problem.problem import Problem
from .exact import as_batch_of_one


def diagonal_sums(problem: Problem, kind: str, mc_samples: int = 1, seed: int = 0, chunk: int = 32) -> Tensor:
    """Σ_n Σ_k (J_nᵀ U[k, n])² as a flat vector (unscaled: multiply by ``problem.scale`` for diag(C))."""
    params = problem.params

    def sample_products(x: Inputs, u: Tensor) -> tuple[Tensor, ...]:
        """J_nᵀ u_k for one sample x (no batch axis) and its K output vectors u (K, *out)."""
        _, pullback = vjp(lambda *p: problem.forward(p, as_batch_of_one(x)).squeeze(0), *params)
        return vmap(pullback)(u)

    acc = torch.zeros(problem.dim, dtype=problem.dtype, device=problem.device)
    for i, (X, y) in enumerate(problem.batches()):
        with torch.no_grad():
            out = problem.forward(params, X)
        U = output_factors(problem, out, y, kind, i, mc_samples, seed).transpose(0, 1)  # (B, K, *out)
        for start in range(0, batch_len(X), chunk):
            grads = vmap(sample_products)(slice_inputs(X, start, start + chunk), U[start:start + chunk])
            acc += torch.cat([g.pow(2).sum(dim=(0, 1)).reshape(-1) for g in grads])
    return acc
