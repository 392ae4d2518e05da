"""Kronecker-factor statistics from curvdist's own kernels (module probes, :mod:`.probes`), for every layer type
the probes cover, including those BackPACK lacks (LayerNorm, Embedding, attention, BatchNorm in eval mode, layers
inside models that are not an ``nn.Sequential``).

Per batch, with U[k, n] the output-space factor columns of :func:`~curvdist.operators.output_space.output_factors`
(Σ_k U U ᵀ = Λ_n for KFLR, sampled gradients/√S for KFAC), b^k_{n,t} = (∂f_n/∂z_{n,t})ᵀ U[k, n] the output
gradient at position t of a site and a_{n,t} its input features, the statistics summed over all samples are

    weight of a Linear/Conv2d site   G = (1/T) Σ_{n,k} (Σ_t b^k_{n,t})(Σ_t b^k_{n,t})ᵀ,   A = Σ_{n,t} a_{n,t} a_{n,t}ᵀ
    its bias                         G_b = Σ_{n,k} (Σ_t b^k_{n,t})(Σ_t b^k_{n,t})ᵀ      (the exact bias block)
    Embedding weight (V × d)         first factor Σ_{n,t} e_{i_{n,t}} e_{i_{n,t}}ᵀ (token counts), second G as above
    LayerNorm/BatchNorm weight, bias the exact block Σ_{n,k} g^k_n g^k_nᵀ of the per-sample gradients
                                     g_w = Σ_t b ⊙ x̂,  g_b = Σ_t b

— the conventions of :mod:`curvdist.geometry.metrics.kfac` (KFC for weight sharing, Grosse & Martens 2016; for
T = 1 exactly KFAC/KFLR, Martens & Grosse 2015, Botev et al. 2017), so that BackPACK's factors and these agree on
the layers both support. For embeddings the vocabulary factor comes first because the weight is stored (V, d);
the normalization s·G ⊗ A/N is the same matrix whichever factor carries which scalar.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import MetricError
from ...operators.output_space import output_factors
from ...problem.autodiff import differentiable_kernels
from ...problem.problem import Problem
from .probes import Site, check_calls, instrumented_copy


def _add(acc: dict[str, Tensor | None], name: str | None, value: Tensor) -> None:
    if name is None:
        return
    acc[name] = value if acc.get(name) is None else acc[name] + value  # type: ignore[operator]


def input_stats(site: Site, A: dict[str, Tensor | None], first: dict[str, Tensor | None]) -> None:
    """The input-side factor sums of one site for one batch (independent of the output vectors)."""
    weight = site.params.get("weight")
    if weight is None:
        return
    if site.kind == "linear":
        a = site.inputs.reshape(-1, site.inputs.shape[-1])
        _add(A, weight, a.T @ a)
    elif site.kind == "embedding":
        idx = site.inputs.reshape(-1)
        if site.extra["padding_idx"] is not None:
            idx = idx[idx != site.extra["padding_idx"]]
        counts = torch.bincount(idx, minlength=site.extra["vocab"]).to(site.probe.dtype)
        _add(first, weight, torch.diag(counts))


def output_stats(site: Site, b: Tensor, G: dict[str, Tensor | None]) -> None:
    """The output-side sums of one site for one output vector (b: (B, T, out))."""
    weight, bias = site.params.get("weight"), site.params.get("bias")
    if site.kind == "norm":
        xhat = site.inputs
        for name, g in ((weight, (b * xhat).sum(1)), (bias, b.sum(1))):
            if name is not None:
                _add(G, name, g.T @ g)
        return
    bs = b.sum(1)  # (B, out)
    outer = bs.T @ bs
    if weight is not None:
        _add(G, weight, outer / site.positions)
    _add(G, bias, outer)


def kfac_sums_probes(problem: Problem, mc_samples: int = 1, seed: int = 0, exact: bool = False
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
    """Summed Kronecker statistics (G, A) with the layout of :func:`~curvdist.geometry.metrics.kfac.kfac_sums`:
    ``G[name]`` is the first factor, ``A[name]`` the second (None for a single-factor block); see the module
    docstring. Sampled labels (``exact=False``) are those of the ``fisher_mc`` operator with the same seed."""
    names = list(problem.param_names)
    twin, rec = instrumented_copy(problem.model, names)
    kind = "ggn" if exact else "fisher_mc"
    G: dict[str, Tensor | None] = {}
    A: dict[str, Tensor | None] = {}
    first: dict[str, Tensor | None] = {}
    for i, (X, y) in enumerate(problem.batches()):
        rec.sites.clear()
        rec.calls.clear()
        with torch.enable_grad(), differentiable_kernels():
            out = twin(X)
            check_calls(rec, names, X.shape[0])
            U = output_factors(problem, out, y, kind, i, mc_samples, seed)
            probes = [s.probe for s in rec.sites]
            for k in range(U.shape[0]):
                grads = torch.autograd.grad(out, probes, U[k], retain_graph=k < U.shape[0] - 1, allow_unused=True)
                for site, b in zip(rec.sites, grads):
                    output_stats(site, torch.zeros_like(site.probe) if b is None else b, G)
        for site in rec.sites:
            input_stats(site, A, first)
    return assemble(names, G, A, first)


def assemble(names: list[str], G: dict[str, Tensor | None], A: dict[str, Tensor | None],
             first: dict[str, Tensor | None]) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
    """The (first factor, second factor) sums per parameter from the accumulated output-side (G), input-side (A)
    and embedding-count (first) statistics."""
    out_G: dict[str, Tensor] = {}
    out_A: dict[str, Tensor | None] = {}
    for name in names:
        if name in first:  # embedding: (token counts, output factor)
            out_G[name], out_A[name] = first[name], G[name]  # type: ignore[assignment]
        else:
            if G.get(name) is None:  # pragma: no cover - check_calls guarantees a site
                raise MetricError(f"no Kronecker statistics for {name}")
            out_G[name], out_A[name] = G[name], A.get(name)  # type: ignore[assignment]
    return out_G, out_A
