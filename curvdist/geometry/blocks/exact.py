"""Exact curvature blocks of single parameters from per-sample vector-Jacobian products (``torch.func``).

For a parameter p and the output-space factors U of a batch (:func:`~curvdist.operators.output_space.output_factors`,
Σ_k U[k, n] U[k, n]ᵀ = Λ_n for the GGN), the per-sample products g_{n,k} = J_{n,p}ᵀ U[k, n] (J_{n,p} = ∂f_n/∂p)
give the block of C = s · Σ_n J_nᵀ Λ_n J_n on p exactly:

    dense block      Σ_n Σ_k g_{n,k} g_{n,k}ᵀ        (p.numel() × p.numel())
    its diagonal     Σ_n Σ_k g_{n,k} ⊙ g_{n,k}

(unscaled: the metric multiplies by s). This covers any parameter of any differentiable model — a class token, a
positional embedding added to every sample, the weight of a Hugging Face ``RMSNorm`` or of a grouped convolution —
at the price of one VJP per (sample, k), vectorized with ``vmap`` over the samples of a batch (in chunks) and
over k. The per-sample products are checked against the chunk's total (one VJP of the chunk per k) and computed
sample by sample where they disagree or ``vmap`` fails — a batching rule that mixes the two levels (PReLU's, in
torch 2.13) would otherwise give wrong blocks silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
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

    def pullback_of(x: Inputs) -> Callable[[Tensor], tuple[Tensor, ...]]:
        """The VJP of f(x; θ) w.r.t. the parameters ``names`` (x a batch), the others held at their values."""
        def f(*q: Tensor) -> Tensor:
            full = list(params)
            for i, t in zip(index, q):
                full[i] = t
            return problem.forward(tuple(full), x)

        return vjp(f, *sub)[1]

    def sample_products(x: Inputs, u: Tensor) -> tuple[Tensor, ...]:
        """J_nᵀ u_k for one sample x (no batch axis) and its K output vectors u (K, *out)."""
        return vmap(pullback_of(as_batch_of_one(x)))(u.unsqueeze(1))

    def one_level(x: Inputs, u: Tensor) -> tuple[Tensor, ...]:
        """The same with ``vmap`` over k only, sample by sample."""
        rows = [vmap(pullback_of(slice_inputs(x, n, n + 1)))(u[n:n + 1].transpose(0, 1)) for n in range(u.shape[0])]
        return tuple(torch.stack(g) for g in zip(*rows))

    def consistent(x: Inputs, u: Tensor, grads: tuple[Tensor, ...]) -> bool:
        """Σ_n J_nᵀ u_{n,k} = (J of the whole chunk)ᵀ u_k: catches batching rules that mix the two vmap levels
        (torch 2.13 returns wrong PReLU products when the samples and k are both vmapped)."""
        total = vmap(pullback_of(x))(u.transpose(0, 1))
        for g, t in zip(grads, total):
            tol = torch.finfo(t.dtype).eps ** 0.5 * max(float(t.norm()), 1e-30)
            if float((g.sum(0) - t).norm()) > tol:
                return False
        return True

    Un = U.transpose(0, 1)  # (B, K, *out)
    for start in range(0, batch_len(X), chunk):
        x, u = slice_inputs(X, start, start + chunk), Un[start:start + chunk]
        try:
            grads = vmap(sample_products)(x, u)  # each (b, K, *shape)
            ok = consistent(x, u, grads)
        except RuntimeError:
            ok = False
        if not ok:
            grads = one_level(x, u)
        for name, g in zip(names, grads):
            flat = g.reshape(-1, g[0, 0].numel())
            value = flat.T @ flat if dense[name] else flat.pow(2).sum(0)
            acc[name] = value if acc.get(name) is None else acc[name] + value  # type: ignore[operator]
