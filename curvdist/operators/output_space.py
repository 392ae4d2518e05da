"""Curvature matrices of the form  C = s · Σ_n J_nᵀ Λ_n J_n,  J_n = ∂f(x_n; θ)/∂θ.

They differ only in the output-space matrix Λ_n:

==================  ============================================================  ============================
kind                Λ_n                                                           reference
==================  ============================================================  ============================
``ggn``             ∂²ℓ(f_n, y_n)/∂f_n²  (exact loss Hessian)                     Schraudolph 2002
``fisher``          E_{ŷ~p(·|f_n)}[∇_f ℓ(f_n, ŷ) ∇_f ℓ(f_n, ŷ)ᵀ] (type-2 Fisher)    Martens 2020, §9
``fisher_mc``       (1/S) Σ_s ∇_f ℓ(f_n, ŷ_s) ∇_f ℓ(f_n, ŷ_s)ᵀ, ŷ_s ~ p(·|f_n)    Martens & Grosse 2015
``empirical_fisher`` ∇_f ℓ(f_n, y_n) ∇_f ℓ(f_n, y_n)ᵀ (true labels)              Kunstner et al. 2019
==================  ============================================================  ============================

A product is one JVP (J v), the output-space product, and one VJP (Jᵀ u) per batch; no per-sample gradient
is ever materialized. For the built-in losses (exponential families in their natural parameter) the type-2
Fisher equals the GGN, and :class:`Fisher` is computed as such.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from ..errors import ProblemError
from ..problem.problem import Params, Problem
from ..problem.sampling import SampleKeys
from .base import CurvatureOperator


class OutputSpaceCurvature(CurvatureOperator):
    """C v = s · Σ_n J_nᵀ Λ_n J_n v; subclasses give Λ_n through :meth:`output_apply`.

    A block C V = s · Σ_n J_nᵀ Λ_n J_n [v₁ … v_k] (:meth:`~CurvatureOperator.apply_block`,
    :meth:`~CurvatureOperator.matmat_params`) is :meth:`batch_matvec` under ``torch.func.vmap`` over the k
    directions: per batch the forward pass runs once (unbatched) and carries k stacked tangents (J V), Λ acts on
    each column, and one backward pulls the k stacked cotangents Λ J V back (Jᵀ Λ J V).
    """

    fresh_parts = True  # the pullback's results are new tensors

    def output_apply(self, out: Tensor, y: Tensor, u: Tensor, ctx: Any) -> Tensor:
        """Λ_n u_n for every sample of the batch (u has the shape of the output)."""
        raise NotImplementedError

    def batch_matvec(self, params: Params, v: Params, X: Tensor, y: Tensor, ctx: Any) -> Params:
        def f(p: Params) -> Tensor:
            return self.problem.forward(p, X)

        out, Jv = jvp(f, (params,), (v,))
        _, pullback = vjp(f, params)
        return pullback(self.output_apply(out.detach(), y, Jv, ctx))[0]


def _rank_one_apply(G: Tensor, u: Tensor, event_ndim: int = 1) -> Tensor:
    """(1/S) Σ_s g_s (g_sᵀ u) per event, for G of shape (S, B, ...) and u of shape (B, ...); an event is a sample
    (``event_ndim=1``) or a (sample, position) pair (``event_ndim=2``, the tokens of language-model losses)."""
    lead = 1 + event_ndim
    coef = (G * u.unsqueeze(0)).flatten(lead).sum(-1)  # (S, B[, T])
    return (G * coef.view(*coef.shape, *([1] * (G.ndim - lead)))).mean(0)


class GGN(OutputSpaceCurvature):
    """Generalized Gauss-Newton  G = s · Σ_n J_nᵀ (∂²ℓ/∂f²) J_n  (Schraudolph 2002)."""

    kind = "ggn"

    def output_apply(self, out: Tensor, y: Tensor, u: Tensor, ctx: Any) -> Tensor:
        return self.problem.loss.output_hessian_apply(out, y, u)


class Fisher(GGN):
    """Exact (type-2) Fisher  F = s · Σ_n J_nᵀ E_{ŷ~p(·|f_n)}[∇_f ℓ ∇_f ℓᵀ] J_n.

    For cross-entropy and MSE the expectation equals the loss Hessian ∂²ℓ/∂f² (exponential families in their
    natural parameter), so F = GGN exactly; computed in closed form, no sampling.
    """

    kind = "fisher"


def output_factors(problem: Problem, out: Tensor, y: Tensor, kind: str, first_sample: int = 0,
                   mc_samples: int = 1, seed: int = 0, per_event: bool = False) -> Tensor:
    """U of shape (K, *out.shape) with Σ_k U[k, n] U[k, n]ᵀ the output-space matrix of ``kind`` for sample n:

    * ``"ggn"``: Λ_n = ∂²ℓ_n/∂f_n² exactly (U = columns of a symmetric factor, K = output dimension);
    * ``"fisher_mc"``: (1/S) Σ_s g_ns g_nsᵀ at labels ŷ_ns ~ p(·|f_n) drawn as :class:`FisherMC` draws them
      (keyed by ``seed`` and the global sample index, ``first_sample`` the batch's first);
    * ``"empirical"``: g_n g_nᵀ at the true labels.

    For a loss whose samples are sums of independent events (the tokens of a sequence, ``loss.event_ndim = 2``)
    the matrices are per event (per token: one sampled or observed gradient per token, Λ block-diagonal over the
    positions); ``per_event=True`` returns the event factors (K columns covering all positions at once: what
    per-position Kronecker statistics need), ``per_event=False`` the exact factor of each sample's block-diagonal
    matrix (:func:`per_sample_factors`, K·T columns).
    """
    out = out.detach()
    loss = problem.loss
    if kind == "ggn":
        U = loss.output_hessian_sqrt(out, y)
    elif kind == "fisher_mc":
        targets = loss.draw_targets(out, SampleKeys(seed, first_sample), mc_samples, y)
        U = _output_grads(problem, out, targets) / math.sqrt(mc_samples)
    elif kind == "empirical":
        U = _output_grads(problem, out, y.unsqueeze(0))
    else:
        raise ProblemError(f"unknown output-space factor kind {kind!r}; choose 'ggn', 'fisher_mc' or 'empirical'")
    return U if per_event else per_sample_factors(U, loss.event_ndim)


def per_sample_factors(U: Tensor, event_ndim: int) -> Tensor:
    """Turn event factors U (K, B, T, ...) — Σ_k U[k, n, t] U[k, n, t]ᵀ the matrix of event (n, t) — into factors of
    the samples' block-diagonal matrices: W[(k, s), n, t] = δ_{st} U[k, n, t], shape (K·T, B, T, ...), so that
    Σ_j W[j, n] W[j, n]ᵀ = blockdiag_t(Σ_k U[k, n, t] U[k, n, t]ᵀ) exactly. Identity for ``event_ndim == 1``."""
    if event_ndim == 1:
        return U
    if event_ndim != 2:
        raise ProblemError(f"losses with event_ndim={event_ndim} are not supported (1 or 2)")
    K, B, T = U.shape[:3]
    eye = torch.eye(T, dtype=U.dtype, device=U.device).view(1, T, 1, T, *([1] * (U.ndim - 3)))
    return (U.unsqueeze(1) * eye).reshape(K * T, B, T, *U.shape[3:])


def _output_grads(problem: Problem, out: Tensor, targets: Tensor) -> Tensor:
    """∇_f ℓ(f_n, t_n) for every sample; vectorized over a leading axis of ``targets``."""

    def g(t: Tensor) -> Tensor:
        return grad(lambda o: problem.loss.per_sample(o, t).sum())(out)

    return vmap(g)(targets)


class FisherMC(OutputSpaceCurvature):
    """Monte-Carlo Fisher  F̂ = s · Σ_n J_nᵀ [(1/S) Σ_s g_ns g_nsᵀ] J_n,  g_ns = ∇_f ℓ(f_n, ŷ_ns),  ŷ_ns ~ p(·|f_n).

    The labels are functions of (``seed``, global sample index, position, draw) (:mod:`curvdist.problem.sampling`),
    so the operator is one fixed matrix across products (as Lanczos needs), reproducible, and the same however the
    data are batched or split over shards, ranks and stages. E[F̂] = F; the error decays as 1/√S.
    """

    kind = "fisher_mc"

    def __init__(self, problem: Problem, mc_samples: int = 1, seed: int = 0, check_determinism: bool = True):
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ProblemError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.mc_samples = mc_samples
        self.seed = int(seed)
        super().__init__(problem, check_determinism)

    def sampled_targets(self, out: Tensor, batch_index: int, y: Tensor | None = None) -> Tensor:
        """The S sampled targets of one batch, shape (S, *target_shape), keyed by (seed, global sample index,
        position, draw) (:mod:`curvdist.problem.sampling`). ``y``: the batch's labels (losses with ignored
        positions sample only where a label is kept)."""
        keys = SampleKeys(self.seed, self.problem.first_sample(batch_index))
        return self.problem.loss.draw_targets(out, keys, self.mc_samples, y)

    def batch_context(self, params: Params, X: Tensor, y: Tensor, batch_index: int) -> Tensor:
        """Output gradients at the sampled labels, shape (S, B, ...)."""
        with torch.no_grad():
            out = self.problem.forward(params, X)
        return _output_grads(self.problem, out, self.sampled_targets(out, batch_index, y))

    def output_apply(self, out: Tensor, y: Tensor, u: Tensor, ctx: Tensor) -> Tensor:
        return _rank_one_apply(ctx, u, self.problem.loss.event_ndim)


class EmpiricalFisher(OutputSpaceCurvature):
    """Empirical Fisher  F_emp = s · Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ = s · Σ_n J_nᵀ g_n g_nᵀ J_n, g_n = ∇_f ℓ(f_n, y_n).

    Not a curvature approximation in general (Kunstner, Hennig, Balles 2019); offered because it is widely used.
    """

    kind = "empirical_fisher"

    def batch_context(self, params: Params, X: Tensor, y: Tensor, batch_index: int) -> Tensor:
        """Output gradients at the true labels, shape (1, B, ...)."""
        with torch.no_grad():
            out = self.problem.forward(params, X)
        return _output_grads(self.problem, out, y.unsqueeze(0))

    def output_apply(self, out: Tensor, y: Tensor, u: Tensor, ctx: Tensor) -> Tensor:
        return _rank_one_apply(ctx, u, self.problem.loss.event_ndim)
