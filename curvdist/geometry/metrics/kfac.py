"""Kronecker-factored curvature metrics: KFAC (Martens & Grosse, ICML 2015) and KFLR (Botev, Ritter & Barber,
ICML 2017), with the weight-sharing approximations KFAC-expand and KFAC-reduce (Eschenhagen, Immer, Turner,
Schneider & Hennig, NeurIPS 2023), from curvdist's own kernels (:mod:`curvdist.geometry.blocks`) or BackPACK
(Dangel, Kunstner & Hennig, ICLR 2020).

The matrix
----------
M is block-diagonal with one block per selected parameter (weights and biases are separate blocks; cross terms
between them and between layers are dropped). For the problem's risk L = s · Σ_n ℓ_n (s = 1/N or 1, N the loss
terms of the whole data set: samples, or non-ignored tokens), a ``Linear`` layer z_n = W a_n + b and B_n ∈ ℝ^{out×K}
with B_n B_nᵀ = (∂f_n/∂z_n)ᵀ Λ_n (∂f_n/∂z_n)  (Λ_n = ∂²ℓ_n/∂f_n²; KFLR), or its Monte-Carlo estimate
(1/S) Σ_k (∂f_n/∂z_n)ᵀ g̃_nk g̃_nkᵀ (∂f_n/∂z_n) with g̃_nk = ∇_f ℓ(f_n, ỹ_nk), ỹ_nk ~ p(y | f_n) (KFAC):

    exact GGN weight block  s · Σ_n (B_n B_nᵀ) ⊗ (a_n a_nᵀ)
    Kronecker approximation s · N · E_n[B_n B_nᵀ] ⊗ E_n[a_n a_nᵀ] = G ⊗ A,
        G = s · Σ_n B_n B_nᵀ   (out × out),     A = (1/N) · Σ_n a_n a_nᵀ   (in × in),
    bias block              G                   (exact for KFLR: the bias block of the GGN).

Weight sharing. A weight applied at T positions per sample — a Linear/Conv1D layer on a sequence, an attention
projection, a Conv2d layer (a_{n,t} the unfolded input patch at output location t, channel-major like
``weight.reshape(out, -1)``), a module called several times — has the GGN block
s · Σ_n (Σ_t B_{n,t} ⊗ a_{n,t})(Σ_t B_{n,t} ⊗ a_{n,t})ᵀ, and two Kronecker approximations:

    expand (default)   G = s · Σ_n Σ_t B_{n,t} B_{n,t}ᵀ,          A = 1/(N·T) · Σ_n Σ_t a_{n,t} a_{n,t}ᵀ
    reduce             G = s · Σ_n (Σ_t B_{n,t})(Σ_t B_{n,t})ᵀ,    A = (1/N) · Σ_n ā_n ā_nᵀ,  ā_n = (1/T) Σ_t a_{n,t}

(N here the samples, N·T the positions; padding positions, ``attention_mask`` 0, are left out of A and of the
count). Expand treats the positions as extra samples; it is exact when every position of every sample has the same
input and no position influences the loss terms of another (e.g. a token-wise layer under a per-token loss).
Reduce is exact for one sample whose inputs are the same at every position. Both are KFAC/KFLR for T = 1, and match
curvlinops' ``KFACLinearOperator(kfac_approx="expand"/"reduce")`` (the tests compare them; curvlinops backpropagates
the columns of each token's Λ factor for all positions at once, which for models that mix positions adds
cross-token terms Σ_{t≠t'} (∂f_t/∂z)ᵀ S_t S_{t'}ᵀ (∂f_{t'}/∂z) that are not in the GGN: KFLR here uses the exact
factor of each sample's block-diagonal Λ_n, so that its bias blocks are the GGN's and KFAC's expectation is KFLR;
KFAC's sampled labels, one per loss term, are backpropagated for all positions at once as curvlinops does).
BackPACK's convolution factors are (bias block) ⊗ (Σ_t a aᵀ/N), neither of the two: convolutions with more than one
output location use the own kernels. The bias block is exact in every case.

Embeddings (weight (V, d)) and GPT-2's ``Conv1D`` (weight (in, out)) store the input side first: their block is
A ⊗ G. An embedding tied to the output head is one parameter with two terms, A_emb ⊗ G_emb + G_head ⊗ A_head
(both (V × V) ⊗ (d × d)); the metric uses their nearest Kronecker product (:func:`nearest_kronecker`). Parameters
without a layer rule (class tokens, positional embeddings, norms of unknown classes) get exact blocks, dense up to
``dense_max`` entries and diagonal beyond.

Vectorization: parameters are flattened row-major, ``W.reshape(-1)`` for W of shape (out, in[, kh, kw]). With
V = W.reshape(out, -1), (G ⊗ A) vec_r(V) = vec_r(G V Aᵀ), and ``torch.kron(G, A)`` is the dense block.

Damping and factors
-------------------
M_δ = M + δI, or M + δR with a damping reference R = blockdiag_p(w_p I) (``damping_weights`` w_p per parameter:
the θ-identity pulled back through a per-tensor scalar Jacobian J = c_p I is c_p² I on block p, see
:mod:`curvdist.geometry.damping`); every block stays Kronecker-with-scalar-damping. Each factor is
eigendecomposed once (G = U_G diag(λ_G) U_Gᵀ, A = U_A diag(λ_A) U_Aᵀ), so a block of M_δ is
(U_G ⊗ U_A) diag(λ_G[o] λ_A[i] + δw_p) (U_G ⊗ U_A)ᵀ and M_δ^p v for p = 1, −1, −½ and log det M_δ are exact.
Eigenvalues of a factor below n·ε·max|λ| (rounding, including slightly negative values) are set to 0; the matrix
the metric represents is the one with those clipped eigenvalues. With δ = 0 a block with a zero eigenvalue makes
M singular (:class:`~curvdist.errors.SingularMetricError`).

Like diagonal metrics, a Kronecker-factored metric is not a tensor under general reparametrizations: recomputing
it in new coordinates agrees with the transformed Jᵀ M J only for Jacobians that are diagonal and Kronecker
structured per layer (per-layer scalings such as the NTK parametrization, per-row/per-column scalings).

Reparametrized problems (``cd.reparametrize``): the ψ model runs the θ network at θ = φ(ψ), so the layers whose
inputs and output gradients KFAC needs are the θ layers. For a Jacobian that is a scalar multiple of the identity
on every parameter tensor (θ_p = c_p ψ_p: ``scale`` by numbers, ``ntk``, compositions of those) the ψ gradient of
a layer is c_p times the θ one, so the ψ factors are exactly (c_p² G_p, A_p), computed from the θ network at
φ(ψ) (the same sampled labels for the same seed). Other Jacobians make the ψ blocks non-Kronecker and are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...catalogue import KFACApproximation, parse
from ...errors import MetricError, ShapeError, SingularMetricError
from ...problem.problem import Problem
from ..blocks.eigencorrection import rotate
from ..blocks.kronecker import DENSE_MAX, STRUCTURED_ABOVE
from ..structured import LowRankFactor, StructuredKronecker, combine, frobenius
from .backpack_metrics import (
    MATRIX_FREE_HINT,
    add_activation_support,
    backpack_pass,
    check_mc_samples,
    owner_path,
    resolve_backend,
    seeded,
)
from .base import Metric

__all__ = ["KFACMetric", "kfac"]


@dataclass
class _Block:
    """One diagonal block of M: ``kron`` (G ⊗ A for a matrix-shaped parameter), a single dense factor, or a
    diagonal (no eigenvectors: ``evecs == ()``, ``evals == (d,)``); or an eigenvalue-corrected Kronecker block
    (U_G ⊗ U_A) diag(E) (U_G ⊗ U_A)ᵀ (``corrected`` = E, flat; an eigenbasis of None is the identity)."""

    name: str
    offset: int
    shape: torch.Size
    evecs: tuple[Any, ...]  # U_G[, U_A] (None: the identity, corrected blocks only); () for a diagonal block
    evals: tuple[Tensor, ...]  # λ_G[, λ_A], clipped at 0; (d,) for a diagonal block
    damping_weight: float = 1.0  # w: the block's damping reference is w·I
    #: a Kronecker block with a structured factor (evecs/evals then hold the dense factor's U, λ only)
    structured: StructuredKronecker | None = None
    #: EKFAC: the corrected eigenvalues in the basis U_G ⊗ U_A (row-major), replacing λ_G ⊗ λ_A
    corrected: Tensor | None = None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def diagonal(self) -> bool:
        return not self.evecs and self.structured is None

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of the undamped block, in the layout of the eigenbasis (row-major (o, i) for G ⊗ A; for a
        structured block the dense factor's index runs fastest)."""
        if self.structured is not None:
            return self.structured.eigenvalues()
        if self.corrected is not None:
            return self.corrected
        if len(self.evals) == 1:
            return self.evals[0]
        return torch.outer(self.evals[0], self.evals[1]).reshape(-1)

    def factor(self, k: int) -> Tensor | LowRankFactor:
        if self.structured is not None:
            S = self.structured
            if k == S.side:
                return S.F
            U, lam = S.U, S.lam
        elif self.diagonal:
            return self.evals[0]
        else:
            U, lam = self.evecs[k], self.evals[k]
            if U is None:  # the identity basis of a corrected block: the factor's diagonal
                return lam
        F = (U * lam) @ U.T
        return 0.5 * (F + F.T)

    @property
    def num_factors(self) -> int:
        return 2 if self.structured is not None else len(self.evals)

    def power(self, v: Tensor, exponent: float, damping: float) -> Tensor:
        """(block + δI)^exponent · v for a flat segment v (exponent −½: the inverse factor W⁻¹)."""
        if self.structured is not None:
            return self.structured.power(v, exponent, damping)
        if self.diagonal:
            return v * (self.evals[0] + damping) ** exponent
        if len(self.evecs) == 1:
            U, = self.evecs
            return U @ ((U.T @ v) * (self.evals[0] + damping) ** exponent)
        UG, UA = self.evecs
        V = v.reshape(self.shape[0], -1)
        W = rotate(V, UG, UA, transpose=True)
        lam = self.eigenvalues.reshape(W.shape) + damping
        return rotate(W * lam**exponent, UG, UA, transpose=False).reshape(-1)

    def inv_factor_t(self, v: Tensor, damping: float) -> Tensor:
        """W⁻ᵀ v (= W⁻¹ v unless the block is structured with a non-constant diagonal)."""
        if self.structured is not None:
            return self.structured.inv_factor_t(v, damping)
        return self.power(v, -0.5, damping)

    def logdet(self, damping: float) -> float:
        if self.structured is not None:
            return self.structured.logdet(damping)
        return float(torch.log((self.eigenvalues + damping).double()).sum())

    def dense(self, damping: float) -> Tensor:
        if self.structured is not None:
            return self.structured.dense(damping)
        if self.diagonal:
            block = torch.diag(self.evals[0])
        elif self.corrected is not None:
            Q = torch.kron(*(torch.eye(n, dtype=self.corrected.dtype, device=self.corrected.device) if U is None
                             else U.contiguous() for U, n in zip(self.evecs, (self.shape[0], self.shape[1:].numel()))))
            block = (Q * self.corrected) @ Q.T
        else:
            block = self.factor(0) if len(self.evecs) == 1 else torch.kron(self.factor(0), self.factor(1))
        return block + damping * torch.eye(block.shape[0], dtype=block.dtype, device=block.device)


def _is_structured(F: Any) -> bool:
    """A Kronecker factor kept structured: a :class:`LowRankFactor` or a 1-d tensor (a diagonal factor)."""
    return isinstance(F, LowRankFactor) or (isinstance(F, Tensor) and F.ndim == 1)


def clip_diagonal(d: Tensor, what: str) -> Tensor:
    """A diagonal block's entries with rounding-level (including slightly negative) values set to 0."""
    if not bool(torch.isfinite(d).all()):
        raise MetricError(f"the diagonal block of {what} contains NaN or inf")
    eps, top = torch.finfo(d.dtype).eps, float(d.abs().max()) if d.numel() else 0.0
    tol = 10 * eps * top
    if d.numel() and float(d.min()) < -max(tol, eps**0.5 * top):
        raise MetricError(f"the diagonal block of {what} has a negative entry ({float(d.min()):.3g})")
    return torch.where(d > tol, d, torch.zeros_like(d))


def eigh_psd(F: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD factor (in float64), rounding-level eigenvalues set to 0."""
    if F.ndim != 2 or F.shape[0] != F.shape[1]:
        raise ShapeError(f"Kronecker factor of {what} must be square, got shape {tuple(F.shape)}")
    if not bool(torch.isfinite(F).all()):
        raise MetricError(f"the Kronecker factor of {what} contains NaN or inf")
    F64 = F.detach().to(torch.float64)
    lam, U = torch.linalg.eigh(0.5 * (F64 + F64.T))
    eps, top = torch.finfo(F.dtype).eps, float(lam.abs().max())
    tol = F.shape[0] * eps * top
    if float(lam.min()) < -max(10 * tol, eps**0.5 * top):
        raise MetricError(f"the Kronecker factor of {what} is not positive semi-definite "
                          f"(eigenvalue {float(lam.min()):.3g})")
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    return lam.to(F.dtype), U.to(F.dtype)


class KFACMetric(Metric):
    """M_δ = blockdiag_p(G_p ⊗ A_p or G_p) + δI, applied, solved and inverse-square-rooted exactly through the
    eigendecompositions of the factors.

    Args:
        names: parameter names, in the order of the flat vectors.
        shapes: their shapes.
        factors: per name, ``(G, A)`` for a parameter of shape (out, *rest) — the block is G ⊗ A in row-major
            vectorization, G (out × out), A (∏rest × ∏rest) — or ``(G,)`` for any parameter (the block is G itself,
            numel × numel; a 1-d G of numel entries is a diagonal block diag(G)).
        damping: δ ≥ 0.
        kind: ``"kfac"`` or ``"kflr"`` (a label).
        eigh: optional precomputed :func:`eigh_psd` results per name, ``[(λ, U), ...]`` in factor order (e.g.
            computed on the Ray actors, one layer each, as in distributed K-FAC).
        damping_weights: optional per-name weights w_p > 0 of the damping reference R = blockdiag(w_p I)
            (block p is damped by δ·w_p; names not given keep w = 1).
        corrections: EKFAC (:mod:`.ekfac`): per name of a two-factor block, the corrected eigenvalues E (the
            parameter's shape, or flat) in the eigenbasis U_G ⊗ U_A of its factors; the block is then
            (U_G ⊗ U_A) diag(E) (U_G ⊗ U_A)ᵀ. A structured factor (above ``structured_above``) or an ``eigh`` entry
            with U = None contributes the identity basis on its side.
    """

    kind = "kfac"
    has_factor = True
    has_inv_sqrt = True
    diagonal_only = True

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], factors: Mapping[str, Sequence[Tensor]],
                 damping: float = 0.0, kind: str = "kfac",
                 eigh: Mapping[str, Sequence[tuple[Tensor, Tensor]]] | None = None,
                 damping_weights: Mapping[str, float] | None = None,
                 corrections: Mapping[str, Tensor] | None = None) -> None:
        names, shapes = list(names), [torch.Size(s) for s in shapes]
        if len(names) != len(shapes) or not names:
            raise ShapeError(f"need one shape per parameter name, got {len(names)} names and {len(shapes)} shapes")
        missing = [n for n in names if n not in factors]
        if missing:
            raise MetricError(f"no Kronecker factors for {missing}")
        weights = dict(damping_weights or {})
        unknown = [n for n in weights if n not in names]
        if unknown:
            raise MetricError(f"damping_weights names {unknown}, which are not among the parameters {names}")
        bad = {n: w for n, w in weights.items() if not (isinstance(w, (int, float)) and 0 < float(w) < float("inf"))}
        if bad:
            raise MetricError(f"damping_weights must be finite positive numbers, got {bad}")
        first = next(iter(factors[names[0]]))
        dim = sum(s.numel() for s in shapes)
        super().__init__(dim, first.dtype, first.device, damping)
        self.kind = kind
        self.blocks: list[_Block] = []
        offset = 0
        for name, shape in zip(names, shapes):
            fs = tuple(factors[name])
            if len(fs) == 2:
                if len(shape) < 2:
                    raise ShapeError(f"{name} of shape {tuple(shape)} cannot have two Kronecker factors")
                expected = [shape[0], shape[1:].numel()]
            elif len(fs) == 1:
                expected = [shape.numel()]
            else:
                raise ShapeError(f"{name}: expected 1 or 2 Kronecker factors, got {len(fs)}")
            diagonal = len(fs) == 1 and fs[0].ndim == 1
            structured = [k for k, F in enumerate(fs) if len(fs) == 2 and _is_structured(F)]
            for k, (F, n) in enumerate(zip(fs, expected)):
                allowed = [(n,), (n, n)] if k in structured else [(n,) if diagonal else (n, n)]
                if tuple(F.shape) not in allowed:
                    raise ShapeError(f"Kronecker factor of {name} has shape {tuple(F.shape)}, expected {(n, n)}"
                                     + (f" or {(n,)} (a diagonal block)" if len(fs) == 1 else ""))
            weight = float(weights.get(name, 1.0))
            if corrections is not None and name in corrections:
                block = self._corrected_block(name, offset, shape, fs, corrections[name], weight, eigh)
            elif structured:
                block = self._structured_block(name, offset, shape, fs, structured, weight, eigh)
            elif diagonal:
                block = _Block(name, offset, shape, (), (clip_diagonal(fs[0].to(self.dtype), name),), weight)
            else:
                eig = ([(lam.to(self.dtype), U.to(self.dtype)) for lam, U in eigh[name]]
                       if eigh is not None and name in eigh and eigh[name]
                       else [eigh_psd(F.to(self.dtype), name) for F in fs])
                block = _Block(name, offset, shape, tuple(U for _, U in eig), tuple(lam for lam, _ in eig), weight)
            if block.structured is not None:
                if self.damping == 0:
                    block.structured.cores(0.0)  # raises SingularMetricError for a singular block
            elif self.damping == 0 and not bool((block.eigenvalues > 0).all()):
                raise SingularMetricError(
                    f"the {self.kind} metric is singular: its block for parameter {name} has a zero eigenvalue "
                    f"(a Kronecker factor is rank-deficient: e.g. an input that is always 0, fewer samples than "
                    f"inputs, or, for the last layer under cross-entropy, the softmax's invariance to adding a "
                    f"constant to all logits); add damping > 0"
                )
            self.blocks.append(block)
            offset += shape.numel()

        #: M_δ^{-1/2} is the factor W⁻¹ unless a structured block has a non-constant diagonal
        self.has_inv_sqrt = all(b.structured is None or b.structured.symmetric for b in self.blocks)

    def _corrected_block(self, name: str, offset: int, shape: torch.Size, fs: tuple[Any, ...], E: Tensor,
                         weight: float, eigh: Mapping[str, Sequence[tuple[Any, Any]]] | None) -> _Block:
        """An eigenvalue-corrected Kronecker block (EKFAC): the factors' eigenbases (identity for a structured
        factor) and the corrected eigenvalues E."""
        if len(fs) != 2:
            raise MetricError(f"an eigenvalue correction for {name} needs a two-factor block, got {len(fs)} factors")
        if tuple(E.shape) not in (tuple(shape), (shape.numel(),), (shape[0], shape[1:].numel())):
            raise ShapeError(f"the corrected eigenvalues of {name} have shape {tuple(E.shape)}, expected "
                             f"{tuple(shape)}")
        given = eigh.get(name) if eigh is not None else None
        evecs, evals = [], []
        for k, F in enumerate(fs):
            if given:
                lam, U = given[k]
            elif _is_structured(F):  # the identity basis; λ: the factor's diagonal (for the record)
                lam = F if isinstance(F, Tensor) else F.diagonal()
                U = None
            else:
                lam, U = eigh_psd(F.to(self.dtype), name)
            evecs.append(None if U is None else U.to(self.dtype))
            evals.append(lam.to(self.dtype))
        return _Block(name, offset, shape, tuple(evecs), tuple(evals), weight,
                      corrected=clip_diagonal(E.detach().reshape(-1).to(self.dtype), name))

    def _structured_block(self, name: str, offset: int, shape: torch.Size, fs: tuple[Any, ...],
                          structured: list[int], weight: float,
                          eigh: Mapping[str, Sequence[tuple[Tensor, Tensor]]] | None) -> _Block:
        """A Kronecker block with one structured factor (:mod:`curvdist.geometry.structured`) and one dense."""
        if len(structured) != 1:
            raise MetricError(f"both Kronecker factors of {name} are structured ({tuple(shape)}); a block with two "
                              f"structured factors is not supported")
        side = structured[0]
        F = fs[side]
        F = (F if isinstance(F, LowRankFactor) else LowRankFactor.from_diagonal(F)).to(self.dtype)
        if not all(bool(torch.isfinite(t).all()) for t in (F.diag, F.rows, F.weights)):
            raise MetricError(f"the structured Kronecker factor of {name} contains NaN or inf")
        given = eigh.get(name) if eigh is not None else None
        lam, U = ((given[0][0].to(self.dtype), given[0][1].to(self.dtype)) if given
                  else eigh_psd(fs[1 - side].to(self.dtype), name))
        kron = StructuredKronecker(F, lam, U, side, name)
        return _Block(name, offset, shape, (U,), (lam,), weight, structured=kron)

    # ------------------------------------------------------------------ helpers
    def _power(self, v: Tensor, exponent: float, damping: float) -> Tensor:
        """(M + damping·R)^exponent v, R = blockdiag(w_p I)."""
        self._check(v)
        return torch.cat([b.power(v[b.offset : b.offset + b.numel], exponent, damping * b.damping_weight)
                          for b in self.blocks])

    def factors(self) -> dict[str, tuple[Tensor, ...]]:
        """The (clipped) Kronecker factors per parameter: ``(G, A)`` or ``(G,)`` (1-d for a diagonal block)."""
        return {b.name: tuple(b.factor(k) for k in range(b.num_factors)) for b in self.blocks}

    # ------------------------------------------------------------------ Metric interface
    def apply_undamped(self, v: Tensor) -> Tensor:
        return self._power(v, 1.0, 0.0)

    def apply(self, v: Tensor) -> Tensor:
        return self._power(v, 1.0, self.damping)

    def solve(self, v: Tensor) -> Tensor:
        return self._power(v, -1.0, self.damping)

    def inv_factor_apply(self, v: Tensor) -> Tensor:
        return self._power(v, -0.5, self.damping)

    def inv_factor_t_apply(self, v: Tensor) -> Tensor:
        self._check(v)
        return torch.cat([b.inv_factor_t(v[b.offset : b.offset + b.numel], self.damping * b.damping_weight)
                          for b in self.blocks])

    def inv_sqrt_apply(self, v: Tensor) -> Tensor:
        if not self.has_inv_sqrt:
            from ...errors import SolverError

            raise SolverError(f"the {self.kind} metric has a structured block with a non-constant diagonal, whose "
                              f"cheap factor W (M = WᵀW) is not the symmetric square root; use inv_factor_apply")
        return self._power(v, -0.5, self.damping)

    def logdet(self) -> float:
        return float(sum(b.logdet(self.damping * b.damping_weight) for b in self.blocks))

    def to_dense(self, max_dim: int = 8192) -> Tensor:
        if self.dim > max_dim:
            from ...errors import SolverError

            raise SolverError(f"to_dense() of a {self.dim}-dimensional metric refused (max_dim={max_dim})")
        return torch.block_diag(*[b.dense(self.damping * b.damping_weight) for b in self.blocks])


    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What determines M_δ, as plain values and tensors (``torch.load(weights_only=True)`` reads it back): per
        block the eigendecompositions of its (clipped) factors and its damping weight, ``{"type": "kronecker",
        "kind", "damping", "names", "shapes", "evecs": [[U_G, U_A] or [U_G], ...], "evals": [[λ_G, λ_A] or [λ_G],
        ...], "damping_weights": [w_p, ...], "structured": {name: {"side", "diag", "rows", "weights"}}}`` (a
        structured block keeps its dense factor's eigendecomposition in evecs/evals and its structured factor
        F = diag(d) + Bᵀ diag(w) B under "structured"; an EKFAC block its corrected eigenvalues under
        "corrected", with None for an identity eigenbasis)."""
        structured = {b.name: {"side": b.structured.side, "diag": b.structured.F.diag, "rows": b.structured.F.rows,
                               "weights": b.structured.F.weights}
                      for b in self.blocks if b.structured is not None}
        corrected = {b.name: b.corrected for b in self.blocks if b.corrected is not None}
        return {"type": "kronecker", "kind": self.kind, "damping": self.damping,
                "names": [b.name for b in self.blocks], "shapes": [list(b.shape) for b in self.blocks],
                "evecs": [list(b.evecs) for b in self.blocks], "evals": [list(b.evals) for b in self.blocks],
                "damping_weights": [float(getattr(b, "damping_weight", 1.0)) for b in self.blocks],
                "structured": structured, "corrected": corrected}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> KFACMetric:
        """The very metric whose :meth:`state_dict` ``state`` is: built from the saved eigendecompositions (no
        eigendecomposition, nothing recomputed from data); the factors are F = U diag(λ) Uᵀ."""
        if state.get("type") != "kronecker":
            raise MetricError(f"not the state of a Kronecker-factored metric (type {state.get('type')!r})")
        names = [str(n) for n in state["names"]]
        eigh = {n: list(zip(lams, Us)) for n, lams, Us in zip(names, state["evals"], state["evecs"], strict=True)}
        factors = {n: tuple(lam if U is None else 0.5 * ((U * lam) @ U.T + ((U * lam) @ U.T).T) for lam, U in pairs)
                   for n, pairs in eigh.items()}
        for n, lams, Us in zip(names, state["evals"], state["evecs"]):
            if not Us:  # a diagonal block
                factors[n] = (lams[0],)
        for n, st in (state.get("structured") or {}).items():
            F = LowRankFactor(st["diag"], st["rows"], st["weights"])
            factors[n] = (F, factors[n][0]) if int(st["side"]) == 0 else (factors[n][0], F)
        weights = {n: float(w) for n, w in zip(names, state.get("damping_weights") or [], strict=False) if w != 1.0}
        extra: dict[str, Any] = {"damping_weights": weights} if weights else {}
        if state.get("corrected"):
            extra["corrections"] = dict(state["corrected"])
        return cls(names, [torch.Size(s) for s in state["shapes"]], factors, damping=float(state["damping"]),
                   kind=str(state["kind"]), eigh=eigh, **extra)

def _kfac_layer_check(path: str, module: nn.Module) -> str | None:
    if type(module) not in (nn.Linear, nn.Conv2d):
        return "Kronecker factors are implemented for Linear and Conv2d layers only"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not supported by BackPACK's Kronecker factors"
    return None


def kfac(problem: Problem, damping: float = 0.0, mc_samples: int = 1, seed: int = 0,
         exact: bool = False, backend: str = "auto", damping_weights: Mapping[str, float] | None = None,
         kfac_approx: str = "expand", dense_max: int = DENSE_MAX, structured_above: int = STRUCTURED_ABOVE
         ) -> KFACMetric:
    """The Kronecker-factored GGN/Fisher metric of the problem's selected parameters (see the module docstring).

    ``exact=False``: KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) — the output-side factor
    G from ``mc_samples`` labels per loss term drawn from the model's predictive distribution, reproducible for
    ``seed`` without touching the caller's random state; kind ``"kfac"``. ``exact=True``: KFLR (Botev, Ritter &
    Barber 2017) — G from the exact loss Hessian (deterministic); kind ``"kflr"``. Statistics are accumulated over
    all batches as sums and normalized once, so the result does not depend on the batching.

    ``kfac_approx``: ``"expand"`` (default) or ``"reduce"``, the weight-sharing approximation (Eschenhagen et al.
    2023) for weights applied at several positions per sample: Linear/Conv1D layers on sequences, attention
    projections, Conv2d; irrelevant (both are KFAC) for weights applied once per sample. ``dense_max``: single-factor
    blocks (biases, norm parameters, parameters without a layer rule) with more entries are exact diagonals.
    ``structured_above``: Kronecker factors of a larger dimension — an embedding's token side, a language-model
    head's vocabulary side — are kept structured (a diagonal, or a diagonal plus one low-rank row per token and
    sampled label: :mod:`curvdist.geometry.structured`), in memory linear in the vocabulary; every metric operation
    stays structured. A factor whose rows outnumber its dimension is densified, or refused with a
    :class:`~curvdist.errors.MemoryBudgetError` where that does not fit.

    ``backend="torch"``: curvdist's own kernels (:mod:`curvdist.geometry.blocks`) — any model and any curvdist
    loss (also the language-model losses and user :class:`~curvdist.problem.losses.Loss` subclasses; KFLR needs the
    loss's ``output_hessian_sqrt``): Kronecker blocks for ``Linear`` (any leading dimensions), GPT-2's ``Conv1D``,
    ``Conv2d``, ``Embedding`` (also tied to the output head) and the projections of any attention module, exact
    blocks for LayerNorm/RMSNorm/BatchNorm (eval) parameters, biases and every other parameter (class tokens,
    positional embeddings, …); subclasses of these modules are covered. ``backend="backpack"``: BackPACK's
    ``KFAC``/``KFLR`` (Dangel, Kunstner & Hennig 2020) — ``Linear`` layers on 2-d inputs and ``Conv2d`` layers with
    one output location, in an ``nn.Sequential`` BackPACK can backpropagate through (Linear, Conv2d, pooling,
    Flatten, Dropout, ReLU, Tanh, Sigmoid, and the ELU/SELU/LeakyReLU/Softplus/GELU/SiLU rules added here), with
    the cross-entropy or MSE loss; where weights are shared (T > 1) BackPACK's factors are neither expand nor reduce
    and are refused. ``backend="auto"`` (default): for KFLR BackPACK where it applies (the two agree there), else the
    own kernels; for KFAC always the own kernels, whose Monte-Carlo labels are keyed by (seed, global sample index,
    position) and so do not depend on how the data are batched or split (BackPACK draws its own from the global
    random state: ``backend="backpack"`` keeps those, split-dependent).

    A problem made by ``cd.reparametrize`` with θ_p = c_p ψ_p on every tensor (``scale`` by numbers, ``ntk``) gets
    the factors (c_p² G_p, A_p) of the θ network at θ = φ(ψ) (see the module docstring). ``damping_weights``: the
    damping reference R = blockdiag(w_p I) (:class:`KFACMetric`).

    Raises:
        MetricError: a selected parameter cannot be given a block (the message lists them and suggests a
            matrix-free metric), BackPACK cannot compute the factors (``backend="backpack"``), or the problem is
            reparametrized with a Jacobian that is not a scalar multiple of the identity on every tensor.
        SingularMetricError: damping is 0 and a block is singular.
    """
    kind = "kflr" if exact else "kfac"
    options = {"kfac_approx": kfac_approx, "dense_max": dense_max, "structured_above": structured_above}
    scalar = _per_tensor_scales(problem, kind)
    if scalar is None:
        G, A = kfac_sums(problem, mc_samples, seed, exact, backend, **options)
    else:
        theta, c = scalar
        G_t, A_t = kfac_sums(theta, mc_samples, seed, exact, backend, **options)
        G, A = {}, {}
        for n, t in zip(problem.param_names, theta.param_names):
            G[n], A[n] = scale_output_side(G_t[t], A_t[t], c[n] ** 2)
    return kfac_from_sums(problem.param_names, problem.shapes, G, A, problem.scale, problem.num_samples, damping,
                          kind, damping_weights=damping_weights)


def _per_tensor_scales(problem: Problem, kind: str) -> tuple[Problem, dict[str, float]] | None:
    """For a problem made by ``cd.reparametrize``: the θ problem at θ = φ(ψ) (on a copy of the θ network, the
    user's model is not touched) and c_p per ψ parameter name, where J = c_p I on every tensor; None for a problem
    that is not reparametrized. Raises MetricError for other Jacobians."""
    from ..reparam.reparametrize import not_scalar_per_tensor, psi_jacobian

    found = psi_jacobian(problem, f"the {kind} metric of a reparametrized problem")
    if found is None:
        return None
    model, diag = found
    r, theta = model.reparam, model.theta_problem
    why = not_scalar_per_tensor(r, diag)
    if why is not None:
        raise MetricError(
            f"the {kind} metric cannot be computed in the coordinates of the {r.kind} reparametrization: {why}, "
            f"so the ψ curvature blocks are not Kronecker-factored. Use metric 'pullback' with of='{kind}' "
            f"(Jᵀ M_θ J, a tensor), a diagonal metric (for a diagonal Jacobian) or 'fisher'/'ggn'"
        )
    c = {n: float(d.reshape(())) for n, d in zip(problem.param_names, diag)}
    net = copy.deepcopy(theta.model)
    named = dict(net.named_parameters())
    with torch.no_grad():
        for name, t in zip(r.theta_names, r.forward(tuple(p.detach() for p in problem.params))):
            named[name].copy_(t)
    at = Problem(net, theta.loss, theta.data, params=list(theta.param_names), reduction=theta.reduction)
    return at, c


def scale_output_side(G: Any, A: Any, factor: float) -> tuple[Any, Any]:
    """The statistics of one parameter (layout of :func:`kfac_sums`) with the output side multiplied by
    ``factor``, i.e. the block multiplied by ``factor``."""
    if not isinstance(A, list):
        return G * factor, A

    def scaled(entry: Any) -> Any:
        return entry if isinstance(entry, tuple) else entry * factor

    return [scaled(e) for e in G], [scaled(e) for e in A]


# ---------------------------------------------------------------------- where BackPACK's factors apply
def _backpack_shapes_fit(problem: Problem) -> bool:
    """One forward pass on the first batch: every selected Linear sees a 2-d input, every selected Conv2d has one
    output location and every owner is called once — where BackPACK's factors are the (T = 1) KFAC factors."""
    from ...problem.data import batch_len

    model = problem.model
    modules = dict(model.named_modules())
    owners = {owner_path(n) for n in problem.param_names}
    seen: dict[str, list[bool]] = {}
    handles = []
    for path in owners:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any, path: str = path) -> None:
            ok = (args[0].ndim == 2) if isinstance(m, nn.Linear) else (out[0, 0].numel() == 1)
            seen.setdefault(path, []).append(bool(ok))
        handles.append(modules[path].register_forward_hook(hook))
    try:
        for X, _ in problem.batches():
            if not isinstance(X, Tensor) or batch_len(X) == 0:
                return False
            with torch.no_grad():
                model(X)
            break
    finally:
        for h in handles:
            h.remove()
    return all(len(v) == 1 and v[0] for v in seen.values()) and set(seen) == owners


def kfac_backend(problem: Problem, backend: str, exact: bool) -> str:
    """``backpack`` or ``torch`` for :func:`kfac_sums`: ``auto`` takes the own kernels for KFAC (sampled labels
    keyed by the global sample index, the same on any split of the data) and, for KFLR, BackPACK where it applies — built-in
    cross-entropy/MSE loss, a model BackPACK can backpropagate through, selected parameters in Linear layers on
    2-d inputs and Conv2d layers with one output location, each called once — and the own kernels elsewhere."""
    from backpack.extensions import KFAC, KFLR

    if backend == "auto" and not exact:  # sampled labels keyed by the global sample index: the own kernels
        return "torch"
    probe = (lambda: add_activation_support(KFLR())) if exact else (lambda: add_activation_support(KFAC()))
    chosen = resolve_backend(problem, backend, probe, True, _kfac_layer_check)
    if backend == "auto" and chosen == "backpack" and not _backpack_shapes_fit(problem):
        return "torch"
    return chosen


def kfac_sums(problem: Problem, mc_samples: int = 1, seed: int = 0, exact: bool = False, backend: str = "auto",
              kfac_approx: str = "expand", dense_max: int = DENSE_MAX, structured_above: int = STRUCTURED_ABOVE,
              statistic: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unnormalized Kronecker statistics summed over the problem's samples — sums, so data shards can be added
    before normalizing (:func:`normalized_factors`). Per parameter:

    * single-factor block (bias, norm parameter, parameter without a layer rule): ``G[name]`` = Σ_n Σ_k g gᵀ (or
      its diagonal, 1-d, above ``dense_max`` entries), ``A[name] = None``;
    * Kronecker block: ``G[name]``, ``A[name]`` lists with one entry per term (one term, or one per orientation for
      a weight tied across orientations): the term's first and second factor in the parameter's layout, each an
      output-side sum Σ b bᵀ (a tensor) or an input-side ``(Σ a aᵀ, C)`` (see
      :mod:`curvdist.geometry.blocks.kronecker` for expand and reduce).

    ``backend``, ``kfac_approx``, ``dense_max``, ``structured_above``: see :func:`kfac`. ``statistic``: the
    output-space vectors of the own kernels — ``ggn``, ``fisher_mc`` or ``empirical`` (observed labels) —
    overriding ``exact`` (BackPACK offers only the first two)."""
    check_mc_samples(mc_samples)
    parse(KFACApproximation, kfac_approx, "kfac_approx")
    for key, value in (("dense_max", dense_max), ("structured_above", structured_above)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MetricError(f"{key} must be a non-negative int, got {value!r}")
    if statistic is not None:
        if backend == "backpack":
            raise MetricError(f"the {statistic!r} Kronecker statistic comes from curvdist's own kernels; use "
                              f"backend 'torch' or 'auto'")
        from ..blocks.kronecker import kfac_sums_probes

        return kfac_sums_probes(problem, mc_samples, seed, kfac_approx=kfac_approx, dense_max=dense_max,
                                kind=statistic, structured_above=structured_above)
    wide = any(max(s[0], s[1:].numel()) > structured_above for s in problem.shapes if len(s) >= 2)
    if kfac_backend(problem, "torch" if wide and backend == "auto" else backend, exact) == "torch":
        from ..blocks.kronecker import kfac_sums_probes

        return kfac_sums_probes(problem, mc_samples, seed, exact, kfac_approx, dense_max,
                                structured_above=structured_above)
    return _backpack_sums(problem, mc_samples, seed, exact, dense_max)


def _backpack_sums(problem: Problem, mc_samples: int, seed: int, exact: bool, dense_max: int
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    from backpack.extensions import KFAC, KFLR

    kind = "kflr" if exact else "kfac"
    G: dict[str, Any] = {n: None for n in problem.param_names}
    A: dict[str, Any] = {n: None for n in problem.param_names}
    numel = dict(zip(problem.param_names, (s.numel() for s in problem.shapes)))

    def add(name: str, value: list[Tensor], batch: int, out_shape: torch.Size) -> None:
        spatial = out_shape[2:].numel() if len(out_shape) > 2 else 1  # |T| for convolutions, 1 for Linear
        g = value[0].detach()
        if len(value) == 2:  # weight: [G_batch (Σ over the batch), A_batch (mean over the batch)]
            if spatial != 1:
                raise MetricError(
                    f"BackPACK's {kind} factors of the convolution with {name} ({spatial} output locations) are "
                    f"(bias block) ⊗ (Σ_t a aᵀ/N), neither KFAC-expand nor KFAC-reduce; use backend 'torch' or "
                    f"'auto'")
            a = value[1].detach() * batch
            if G[name] is None:
                G[name], A[name] = [g], [(a, batch)]
            else:
                G[name] = [G[name][0] + g]
                A[name] = [(A[name][0][0] + a, A[name][0][1] + batch)]
            return
        if len(value) != 1:
            raise MetricError(f"unexpected BackPACK {kind} result for {name}: {len(value)} factors")
        if numel[name] > dense_max:
            g = g.diagonal()
        G[name] = g if G[name] is None else G[name] + g

    if exact:
        backpack_pass(problem, lambda: add_activation_support(KFLR()), kind, add, metric_name=kind,
                      second_order=True, allowed=_kfac_layer_check)
    else:
        with seeded(seed, problem.device):
            backpack_pass(problem, lambda: add_activation_support(KFAC(mc_samples=mc_samples)), kind, add,
                          metric_name=kind, second_order=True, allowed=_kfac_layer_check)
    for name in problem.param_names:
        if G[name] is None:  # pragma: no cover - backpack_pass checks every parameter got a result
            raise MetricError(f"no {kind} factors for {name}; {MATRIX_FREE_HINT}")
    return G, A


# ---------------------------------------------------------------------- normalization
def _normalized(entry: Any, scale: float) -> Tensor:
    """An output-side sum times s, or an input-side (sum, C) divided by C."""
    if isinstance(entry, tuple):
        total, count = entry
        return total / max(float(count), 1.0)
    return entry * scale


def nearest_kronecker(terms: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The Kronecker product F ⊗ H nearest in Frobenius norm to Σ_i F_i ⊗ H_i (Van Loan & Pitsianis 1993).

    Rearranged, Σ_i F_i ⊗ H_i is R = Σ_i vec(F_i) vec(H_i)ᵀ = U Wᵀ, and the nearest Kronecker product is its top
    singular triplet σ u vᵀ. With the Gram matrices G_U = UᵀU and G_W = WᵀW (m × m, m terms): u = U α and v = W β
    for the top eigenvector z of G_U^½ G_W G_U^½ (eigenvalue σ²), α = G_U^{-½} z and β = G_U α / σ. So
    F = Σ α_i F_i and H = σ Σ β_i H_i: combinations of the terms' factors (PSD for PSD terms, whose Gram entries
    tr(F_i F_j) ≥ 0 make the top singular vectors non-negative).

    Factors may be structured (diagonal, or diagonal plus low rank: :mod:`curvdist.geometry.structured`); the Gram
    entries and the combination then stay structured, so a tied embedding/head at a real vocabulary never forms
    V × V. Tied embedding and head: the terms are A_emb ⊗ G_emb (A_emb: token counts, diagonal) and G_head ⊗ A_head;
    their nearest Kronecker product is the block of the one parameter (the exact GGN's cross terms between the two
    uses are dropped, as between any two layers)."""
    Fs = [t[0] for t in terms]
    Hs = [t[1] for t in terms]
    m = len(terms)
    gram_u = torch.tensor([[frobenius(Fs[i], Fs[j]) for j in range(m)] for i in range(m)], dtype=torch.float64)
    gram_w = torch.tensor([[frobenius(Hs[i], Hs[j]) for j in range(m)] for i in range(m)], dtype=torch.float64)
    mu, Q = torch.linalg.eigh(gram_u)
    keep = mu > mu.max() * m * torch.finfo(torch.float64).eps
    if not bool(keep.any()):
        return combine([0.0] * m, Fs), combine([0.0] * m, Hs)  # type: ignore[return-value]
    Qk, root = Q[:, keep], mu[keep].sqrt()
    S = (root[:, None] * (Qk.T @ gram_w @ Qk)) * root[None, :]
    lam, Z = torch.linalg.eigh(0.5 * (S + S.T))
    sigma = float(lam[-1].clamp_min(0).sqrt())
    alpha = Qk @ (Z[:, -1] / root)
    beta = gram_u @ alpha / max(sigma, torch.finfo(torch.float64).tiny)
    if float(alpha.sum()) < 0:
        alpha, beta = -alpha, -beta
    F = combine([float(a) for a in alpha], Fs)
    H = combine([float(b) for b in beta], Hs) * sigma
    return F, H  # type: ignore[return-value]


def normalized_terms(names: Sequence[str], G: Mapping[str, Any], A: Mapping[str, Any], scale: float,
                     num_samples: int) -> dict[str, list[tuple[Any, ...]]]:
    """Per parameter its normalized terms from summed statistics (layout of :func:`kfac_sums`): ``[(G·s,)]`` for a
    single-factor block, one ``(first, second)`` pair per orientation for a Kronecker block (output-side sums times
    s, input-side sums divided by their count C). Terms add over data (e.g. a moving average of them stays a valid
    block); :func:`factors_from_terms` forms the factors. (Statistics of the former layout — G and A both tensors —
    are normalized as G·s and A/N.)"""
    terms: dict[str, list[tuple[Any, ...]]] = {}
    for name in names:
        g, a = G[name], A[name]
        if a is None:
            terms[name] = [(g * scale,)]
        elif isinstance(a, list):
            terms[name] = [(_normalized(f, scale), _normalized(h, scale)) for f, h in zip(g, a)]
        else:
            terms[name] = [(g * scale, a / num_samples)]
    return terms


def factors_from_terms(terms: Mapping[str, Sequence[tuple[Any, ...]]]) -> dict[str, tuple[Tensor, ...]]:
    """The factors of each block: its one term, or the :func:`nearest_kronecker` product of its terms."""
    return {name: tuple(ts[0]) if len(ts) == 1 else nearest_kronecker(ts)  # type: ignore[arg-type]
            for name, ts in terms.items()}


def normalized_factors(names: Sequence[str], G: Mapping[str, Any], A: Mapping[str, Any], scale: float,
                       num_samples: int) -> dict[str, tuple[Tensor, ...]]:
    """Factors from summed statistics (layout of :func:`kfac_sums`): output-side sums times s, input-side sums
    divided by their count C; a weight with several terms gets their :func:`nearest_kronecker`
    (:func:`normalized_terms`, :func:`factors_from_terms`)."""
    return factors_from_terms(normalized_terms(names, G, A, scale, num_samples))


def kfac_from_sums(names: Sequence[str], shapes: Sequence[torch.Size], G: Mapping[str, Any], A: Mapping[str, Any],
                   scale: float, num_samples: int, damping: float = 0.0, kind: str = "kfac",
                   eigh: Mapping[str, Sequence[tuple[Tensor, Tensor]]] | None = None,
                   damping_weights: Mapping[str, float] | None = None) -> KFACMetric:
    """The metric from summed statistics (:func:`normalized_factors`); ``eigh``: optional precomputed
    eigendecompositions of those normalized factors, ``damping_weights``: per-block weights of the damping
    reference (see :class:`KFACMetric`)."""
    return KFACMetric(names, shapes, normalized_factors(names, G, A, scale, num_samples), damping=damping,
                      kind=kind, eigh=eigh, damping_weights=damping_weights)
