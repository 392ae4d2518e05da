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

from ...errors import MetricError
from ...operators.output_space import output_factors
from ...problem.data import Inputs, batch_len, slice_inputs
from ...problem.problem import Problem
from .exact import as_batch_of_one

#: default memory budget of one vectorized chunk of per-sample products (bytes)
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


def chunk_sizes(dim: int, itemsize: int, samples: int, columns: int, memory_budget: int) -> tuple[int, int]:
    """(samples per chunk, factor columns per chunk) so that the chunk's per-sample products — samples × columns
    vectors of length ``dim``, plus their squares — fit in ``memory_budget`` bytes (at least one product)."""
    vectors = max(1, memory_budget // (2 * dim * itemsize))
    k = max(1, min(columns, vectors))
    return max(1, min(samples, vectors // k)), k


def _allocation_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def diagonal_sums(problem: Problem, kind: str, mc_samples: int = 1, seed: int = 0,
                  memory_budget: int | None = None) -> Tensor:
    """Σ_n Σ_k (J_nᵀ U[k, n])² as a flat vector (unscaled: multiply by ``problem.scale`` for diag(C)).

    The per-sample products are vectorized in chunks of samples × factor columns whose results fit in
    ``memory_budget`` bytes (default 2 GiB: :func:`chunk_sizes`); an allocation failure is a
    :class:`~curvdist.errors.MetricError` that names the budget to lower."""
    params = problem.params
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise MetricError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")

    def sample_products(x: Inputs, u: Tensor) -> tuple[Tensor, ...]:
        """J_nᵀ u_k for one sample x (no batch axis) and its K output vectors u (K, *out)."""
        _, pullback = vjp(lambda *p: problem.forward(p, as_batch_of_one(x)).squeeze(0), *params)
        return vmap(pullback)(u)

    acc = torch.zeros(problem.dim, dtype=problem.dtype, device=problem.device)
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    try:
        for i, (X, y) in enumerate(problem.batches()):
            with torch.no_grad():
                out = problem.forward(params, X)
            U = output_factors(problem, out, y, kind, problem.first_sample(i), mc_samples,
                               seed).transpose(0, 1)  # (B, K, *out)
            b, k = chunk_sizes(problem.dim, itemsize, batch_len(X), U.shape[1], budget)
            for start in range(0, batch_len(X), b):
                x = slice_inputs(X, start, start + b)
                for k0 in range(0, U.shape[1], k):
                    grads = vmap(sample_products)(x, U[start:start + b, k0:k0 + k])  # each (b, k, *shape)
                    acc += torch.cat([g.pow(2).sum(dim=(0, 1)).reshape(-1) for g in grads])
    except (RuntimeError, MemoryError) as e:
        if not _allocation_failure(e):
            raise
        raise MetricError(f"the exact {kind} diagonal ran out of memory with memory_budget={budget} bytes for "
                          f"{problem.dim} parameters; pass a smaller memory_budget (metric option, e.g. "
                          f"memory_budget={max(budget // 4, 1)}) or a smaller batch/micro_batch_size") from None
    return acc
