"""Exact curvature blocks of single parameters from per-sample vector-Jacobian products (``torch.func``).

For a parameter p and the output-space factors U of a batch (:func:`~curvdist.operators.output_space.output_factors`,
Σ_k U[k, n] U[k, n]ᵀ = Λ_n for the GGN), the per-sample products g_{n,k} = J_{n,p}ᵀ U[k, n] (J_{n,p} = ∂f_n/∂p)
give the block of C = s · Σ_n J_nᵀ Λ_n J_n on p exactly:

    dense block      Σ_n Σ_k g_{n,k} g_{n,k}ᵀ        (p.numel() × p.numel())
    its diagonal     Σ_n Σ_k g_{n,k} ⊙ g_{n,k}

(unscaled: the metric multiplies by s). This covers any parameter of any differentiable model — a class token, a
positional embedding added to every sample, the weight of a Hugging Face ``RMSNorm`` or of a grouped convolution —
at the price of one VJP per (sample, k), vectorized with ``vmap`` over the samples of a batch (in chunks) and
over k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor
from torch.func import vjp, vmap

from ...problem.data import Inputs, batch_len, slice_inputs
from ...problem.problem import Problem


def as_batch_of_one(x: Inputs) -> Inputs:
    """A sample (no batch axis, as ``vmap`` passes it) as a batch of one."""
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    return {k: v.unsqueeze(0) for k, v in x.items()}


def exact_block_sums(problem: Problem, names: Sequence[str], X: Inputs, U: Tensor, dense: Mapping[str, bool],
                     acc: dict[str, Tensor | None], chunk: int = 16) -> None:
    """Add Σ_{n,k} g gᵀ (``dense[name]``) or Σ_{n,k} g ⊙ g (flat) of one batch to ``acc[name]`` for the parameters
    ``names`` (a subset of the problem's), the other parameters held at their values. U: (K, B, *out)."""
    if not names:
        return
    index = [problem.param_names.index(n) for n in names]
    params = list(problem.params)
    sub = tuple(params[i] for i in index)

    def sample_products(x: Inputs, u: Tensor) -> tuple[Tensor, ...]:
        """J_nᵀ u_k w.r.t. the parameters ``names`` for one sample x and its K output vectors u (K, *out)."""
        def f(*q: Tensor) -> Tensor:
            full = list(params)
            for i, t in zip(index, q):
                full[i] = t
            return problem.forward(tuple(full), as_batch_of_one(x)).squeeze(0)

        _, pullback = vjp(f, *sub)
        return vmap(pullback)(u)

    Un = U.transpose(0, 1)  # (B, K, *out)
    for start in range(0, batch_len(X), chunk):
        stop = start + chunk
        grads = vmap(sample_products)(slice_inputs(X, start, stop), Un[start:stop])  # each (b, K, *shape)
        for name, g in zip(names, grads):
            flat = g.reshape(-1, g[0, 0].numel())
            value = flat.T @ flat if dense[name] else flat.pow(2).sum(0)
            acc[name] = value if acc.get(name) is None else acc[name] + value  # type: ignore[operator]
