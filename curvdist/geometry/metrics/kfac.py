"""Kronecker-factored curvature metrics: KFAC (Martens & Grosse, ICML 2015) and KFLR (Botev, Ritter & Barber,
ICML 2017), with the Kronecker factors from BackPACK (Dangel, Kunstner & Hennig, ICLR 2020).

The matrix
----------
M is block-diagonal with one block per selected parameter (weights and biases are separate blocks; cross terms
between them and between layers are dropped). For the problem's risk L = s · Σ_n ℓ_n (s = 1/N or 1, N the size of
the whole data set), a ``Linear`` layer z_n = W a_n + b and B_n ∈ ℝ^{out×C} with
B_n B_nᵀ = (∂f_n/∂z_n)ᵀ Λ_n (∂f_n/∂z_n)  (Λ_n = ∂²ℓ_n/∂f_n²; KFLR), or its Monte-Carlo estimate
(1/S) Σ_k (∂f_n/∂z_n)ᵀ g̃_nk g̃_nkᵀ (∂f_n/∂z_n) with g̃_nk = ∇_f ℓ(f_n, ỹ_nk), ỹ_nk ~ p(y | f_n) (KFAC):

    exact GGN weight block  s · Σ_n (B_n B_nᵀ) ⊗ (a_n a_nᵀ)
    Kronecker approximation s · N · E_n[B_n B_nᵀ] ⊗ E_n[a_n a_nᵀ] = G ⊗ A,
        G = s · Σ_n B_n B_nᵀ   (out × out),     A = (1/N) · Σ_n a_n a_nᵀ   (in × in),
    bias block              G                   (exact for KFLR: the bias block of the GGN).

For a ``Conv2d`` layer (Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
ICML 2016) a_{n,t} is the unfolded input patch (in·kh·kw, channel-major like ``weight.reshape(out, -1)``) at
output location t ∈ T, B_{n,t} the factor of the output location, and

    A = (1/N) · Σ_n Σ_t a_{n,t} a_{n,t}ᵀ,     G = (s/|T|) · Σ_n (Σ_t B_{n,t})(Σ_t B_{n,t})ᵀ,   bias block |T|·G,

which is the KFC approximation Ω ⊗ Γ. (BackPACK's weight factors correspond to |T|·G ⊗ A, |T| times KFC; its own
docstring flags the discrepancy. Under both limits KFC is built for, spatially uncorrelated or spatially constant
output derivatives, |T|·G ⊗ A overestimates the GGN block by the factor |T|, so the factor is divided out here.)

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

from ...errors import MetricError, ShapeError, SingularMetricError
from ...problem.problem import Problem
from .backpack_metrics import (
    MATRIX_FREE_HINT,
    add_activation_support,
    backpack_pass,
    check_mc_samples,
    loss_module,
    resolve_backend,
    seeded,
)
from .base import Metric

__all__ = ["KFACMetric", "kfac"]


@dataclass
class _Block:
    """One diagonal block of M: ``kron`` (G ⊗ A for a matrix-shaped parameter) or a single factor."""

    name: str
    offset: int
    shape: torch.Size
    evecs: tuple[Tensor, ...]  # U_G[, U_A]
    evals: tuple[Tensor, ...]  # λ_G[, λ_A], clipped at 0
    damping_weight: float = 1.0  # w: the block's damping reference is w·I

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of the undamped block, in the layout of the eigenbasis (row-major (o, i) for G ⊗ A)."""
        if len(self.evals) == 1:
            return self.evals[0]
        return torch.outer(self.evals[0], self.evals[1]).reshape(-1)

    def factor(self, k: int) -> Tensor:
        U, lam = self.evecs[k], self.evals[k]
        F = (U * lam) @ U.T
        return 0.5 * (F + F.T)

    def power(self, v: Tensor, exponent: float, damping: float) -> Tensor:
        """(block + δI)^exponent · v for a flat segment v."""
        if len(self.evecs) == 1:
            U, = self.evecs
            return U @ ((U.T @ v) * (self.evals[0] + damping) ** exponent)
        UG, UA = self.evecs
        V = v.reshape(UG.shape[0], UA.shape[0])
        W = UG.T @ V @ UA
        lam = torch.outer(self.evals[0], self.evals[1]) + damping
        return (UG @ (W * lam**exponent) @ UA.T).reshape(-1)

    def dense(self, damping: float) -> Tensor:
        block = self.factor(0) if len(self.evecs) == 1 else torch.kron(self.factor(0), self.factor(1))
        return block + damping * torch.eye(block.shape[0], dtype=block.dtype, device=block.device)


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
            numel × numel).
        damping: δ ≥ 0.
        kind: ``"kfac"`` or ``"kflr"`` (a label).
        eigh: optional precomputed :func:`eigh_psd` results per name, ``[(λ, U), ...]`` in factor order (e.g.
            computed on the Ray actors, one layer each, as in distributed K-FAC).
        damping_weights: optional per-name weights w_p > 0 of the damping reference R = blockdiag(w_p I)
            (block p is damped by δ·w_p; names not given keep w = 1).
    """

    kind = "kfac"
    has_factor = True
    has_inv_sqrt = True
    diagonal_only = True

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], factors: Mapping[str, Sequence[Tensor]],
                 damping: float = 0.0, kind: str = "kfac",
                 eigh: Mapping[str, Sequence[tuple[Tensor, Tensor]]] | None = None,
                 damping_weights: Mapping[str, float] | None = None) -> None:
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
            for F, n in zip(fs, expected):
                if tuple(F.shape) != (n, n):
                    raise ShapeError(f"Kronecker factor of {name} has shape {tuple(F.shape)}, expected {(n, n)}")
            eig = ([(lam.to(self.dtype), U.to(self.dtype)) for lam, U in eigh[name]] if eigh is not None and name in eigh
                   else [eigh_psd(F.to(self.dtype), name) for F in fs])
            block = _Block(name, offset, shape, tuple(U for _, U in eig), tuple(lam for lam, _ in eig),
                           float(weights.get(name, 1.0)))
            if self.damping == 0 and not bool((block.eigenvalues > 0).all()):
                raise SingularMetricError(
                    f"the {self.kind} metric is singular: its block for parameter {name} has a zero eigenvalue "
                    f"(a Kronecker factor is rank-deficient: e.g. an input that is always 0, fewer samples than "
                    f"inputs, or, for the last layer under cross-entropy, the softmax's invariance to adding a "
                    f"constant to all logits); add damping > 0"
                )
            self.blocks.append(block)
            offset += shape.numel()

    # ------------------------------------------------------------------ helpers
    def _power(self, v: Tensor, exponent: float, damping: float) -> Tensor:
        """(M + damping·R)^exponent v, R = blockdiag(w_p I)."""
        self._check(v)
        return torch.cat([b.power(v[b.offset : b.offset + b.numel], exponent, damping * b.damping_weight)
                          for b in self.blocks])

    def factors(self) -> dict[str, tuple[Tensor, ...]]:
        """The (clipped) Kronecker factors per parameter: ``(G, A)`` or ``(G,)``."""
        return {b.name: tuple(b.factor(k) for k in range(len(b.evecs))) for b in self.blocks}

    # ------------------------------------------------------------------ Metric interface
    def apply_undamped(self, v: Tensor) -> Tensor:
        return self._power(v, 1.0, 0.0)

    def apply(self, v: Tensor) -> Tensor:
        return self._power(v, 1.0, self.damping)

    def solve(self, v: Tensor) -> Tensor:
        return self._power(v, -1.0, self.damping)

    def inv_factor_apply(self, v: Tensor) -> Tensor:
        return self._power(v, -0.5, self.damping)

    inv_factor_t_apply = inv_factor_apply

    def inv_sqrt_apply(self, v: Tensor) -> Tensor:
        return self._power(v, -0.5, self.damping)

    def logdet(self) -> float:
        return float(sum(torch.log((b.eigenvalues + self.damping * b.damping_weight).double()).sum()
                         for b in self.blocks))

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
        ...], "damping_weights": [w_p, ...]}``."""
        return {"type": "kronecker", "kind": self.kind, "damping": self.damping,
                "names": [b.name for b in self.blocks], "shapes": [list(b.shape) for b in self.blocks],
                "evecs": [list(b.evecs) for b in self.blocks], "evals": [list(b.evals) for b in self.blocks],
                "damping_weights": [float(getattr(b, "damping_weight", 1.0)) for b in self.blocks]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> KFACMetric:
        """The very metric whose :meth:`state_dict` ``state`` is: built from the saved eigendecompositions (no
        eigendecomposition, nothing recomputed from data); the factors are F = U diag(λ) Uᵀ."""
        if state.get("type") != "kronecker":
            raise MetricError(f"not the state of a Kronecker-factored metric (type {state.get('type')!r})")
        names = [str(n) for n in state["names"]]
        eigh = {n: list(zip(lams, Us)) for n, lams, Us in zip(names, state["evals"], state["evecs"], strict=True)}
        factors = {n: tuple(0.5 * ((U * lam) @ U.T + ((U * lam) @ U.T).T) for lam, U in pairs)
                   for n, pairs in eigh.items()}
        weights = {n: float(w) for n, w in zip(names, state.get("damping_weights") or [], strict=False) if w != 1.0}
        extra: dict[str, Any] = {"damping_weights": weights} if weights else {}
        return cls(names, [torch.Size(s) for s in state["shapes"]], factors, damping=float(state["damping"]),
                   kind=str(state["kind"]), eigh=eigh, **extra)

def _kfac_layer_check(path: str, module: nn.Module) -> str | None:
    if type(module) not in (nn.Linear, nn.Conv2d):
        return "Kronecker factors are implemented for Linear and Conv2d layers only"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not supported by BackPACK's Kronecker factors"
    return None


def kfac(problem: Problem, damping: float = 0.0, mc_samples: int = 1, seed: int = 0,
         exact: bool = False, backend: str = "auto", damping_weights: Mapping[str, float] | None = None
         ) -> KFACMetric:
    """The Kronecker-factored GGN/Fisher metric of the problem's selected parameters (see the module docstring).

    ``exact=False``: KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) — the output-side factor
    G from ``mc_samples`` labels per sample drawn from the model's predictive distribution (BackPACK ``KFAC``),
    reproducible for ``seed`` without touching the caller's random state; kind ``"kfac"``.
    ``exact=True``: KFLR (Botev, Ritter & Barber 2017) — G from the exact loss Hessian (BackPACK ``KFLR``,
    deterministic); kind ``"kflr"``. Factors from BackPACK (Dangel, Kunstner & Hennig 2020), accumulated over all
    batches with a sum-reduction loss and scaled as above, so the result does not depend on the batching.

    ``backend="backpack"``: every selected parameter must belong to a ``Linear`` (2-d input) or ``Conv2d``
    (groups = 1, zero padding) layer of an ``nn.Sequential`` whose layers BackPACK can backpropagate curvature
    through (Linear, Conv2d, pooling, Flatten, Dropout, ReLU, Tanh, Sigmoid, and the ELU/SELU/LeakyReLU/Softplus/
    GELU/SiLU rules added here). ``backend="torch"``: curvdist's own kernels (:mod:`curvdist.geometry.blocks`) —
    any model whose selected parameters belong to Linear (any leading dimensions), Conv2d, Embedding, LayerNorm,
    BatchNorm (eval) or self-attention ``MultiheadAttention`` layers; LayerNorm/BatchNorm parameters get their exact
    (single-factor) block; sampled labels are those of the ``fisher_mc`` operator with the same seed.
    ``backend="auto"`` (default): BackPACK where it applies, else the own kernels. Weights and biases are
    independent blocks, so either may be selected alone.

    A problem made by ``cd.reparametrize`` with θ_p = c_p ψ_p on every tensor (``scale`` by numbers, ``ntk``) gets
    the factors (c_p² G_p, A_p) of the θ network at θ = φ(ψ) (see the module docstring). ``damping_weights``: the
    damping reference R = blockdiag(w_p I) (:class:`KFACMetric`).

    Raises:
        MetricError: a selected parameter's layer is not supported (the message lists all uncovered parameters and
            suggests a matrix-free metric), BackPACK cannot backpropagate through the model, or the problem is
            reparametrized with a Jacobian that is not a scalar multiple of the identity on every tensor.
        SingularMetricError: damping is 0 and a block is singular.
    """
    kind = "kflr" if exact else "kfac"
    scalar = _per_tensor_scales(problem, kind)
    if scalar is None:
        G, A = kfac_sums(problem, mc_samples, seed, exact, backend)
    else:
        theta, c = scalar
        G_t, A_t = kfac_sums(theta, mc_samples, seed, exact, backend)
        G = {n: G_t[t] * c[n] ** 2 for n, t in zip(problem.param_names, theta.param_names)}
        A = {n: A_t[t] for n, t in zip(problem.param_names, theta.param_names)}
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


def kfac_sums(problem: Problem, mc_samples: int = 1, seed: int = 0, exact: bool = False, backend: str = "auto"
              ) -> tuple[dict[str, Tensor], dict[str, Tensor | None]]:
    """Unnormalized Kronecker statistics summed over the problem's samples: G[name] = Σ_n B_n B_nᵀ (conv: /|T|)
    and A[name] = Σ_n a_n a_nᵀ (None for biases) — sums, so data shards can be added before normalizing.
    ``backend``: see :func:`kfac`."""
    from backpack.extensions import KFAC, KFLR

    check_mc_samples(mc_samples)
    kind = "kflr" if exact else "kfac"
    probe = (lambda: add_activation_support(KFLR())) if exact else (lambda: add_activation_support(KFAC()))
    if resolve_backend(problem, backend, probe, True, _kfac_layer_check) == "torch":
        from ..blocks.kronecker import kfac_sums_probes

        loss_module(problem)
        return kfac_sums_probes(problem, mc_samples, seed, exact)
    savefield = kind
    G: dict[str, Tensor | None] = {n: None for n in problem.param_names}
    A: dict[str, Tensor | None] = {n: None for n in problem.param_names}

    def add(name: str, value: list[Tensor], batch: int, out_shape: torch.Size) -> None:
        spatial = out_shape[2:].numel() if len(out_shape) > 2 else 1  # |T| for convolutions, 1 for Linear
        g = value[0].detach()
        if len(value) == 2:  # weight: [G_batch (Σ over the batch), A_batch (mean over the batch)]
            g = g / spatial
            a = value[1].detach() * batch
            A[name] = a if A[name] is None else A[name] + a
        elif len(value) != 1:
            raise MetricError(f"unexpected BackPACK {kind} result for {name}: {len(value)} factors")
        G[name] = g if G[name] is None else G[name] + g

    if exact:
        backpack_pass(problem, lambda: add_activation_support(KFLR()), savefield, add, metric_name=kind,
                      second_order=True, allowed=_kfac_layer_check)
    else:
        with seeded(seed, problem.device):
            backpack_pass(problem, lambda: add_activation_support(KFAC(mc_samples=mc_samples)), savefield, add,
                          metric_name=kind, second_order=True, allowed=_kfac_layer_check)
    for name in problem.param_names:
        if G[name] is None:  # pragma: no cover - backpack_pass checks every parameter got a result
            raise MetricError(f"no {kind} factors for {name}; {MATRIX_FREE_HINT}")
    return G, A  # type: ignore[return-value]


def normalized_factors(names: Sequence[str], G: Mapping[str, Tensor], A: Mapping[str, Tensor | None],
                       scale: float, num_samples: int) -> dict[str, tuple[Tensor, ...]]:
    """Factors from summed statistics: G ← s·G, A ← A/N (the conventions of :func:`kfac`)."""
    factors: dict[str, tuple[Tensor, ...]] = {}
    for name in names:
        g = G[name] * scale
        a = A[name]
        factors[name] = (g,) if a is None else (g, a / num_samples)
    return factors


def kfac_from_sums(names: Sequence[str], shapes: Sequence[torch.Size], G: Mapping[str, Tensor],
                   A: Mapping[str, Tensor | None], scale: float, num_samples: int, damping: float = 0.0,
                   kind: str = "kfac", eigh: Mapping[str, Sequence[tuple[Tensor, Tensor]]] | None = None,
                   damping_weights: Mapping[str, float] | None = None) -> KFACMetric:
    """The metric from summed statistics: G ← s·G, A ← A/N (the conventions of :func:`kfac`); ``eigh``: optional
    precomputed eigendecompositions of those normalized factors, ``damping_weights``: per-block weights of the
    damping reference (see :class:`KFACMetric`)."""
    return KFACMetric(names, shapes, normalized_factors(names, G, A, scale, num_samples), damping=damping,
                      kind=kind, eigh=eigh, damping_weights=damping_weights)
