"""Structured Kronecker factors: a diagonal plus a weighted low-rank term, and the damped Kronecker blocks built on
them, with every metric operation in memory linear in the factor's dimension n (never n × n).

Where they come from (DESIGN §8). A factor over a vocabulary of V tokens is cheap to keep structured:

* the input factor of an ``Embedding`` is diagonal (one-hot inputs): A = diag(token counts)/C;
* the output-side factor of a language-model head over T tokens is a sum of T rank-one terms
  (KFAC: G = Σ_t g̃_t g̃_tᵀ, sampled output gradients), or, for an embedding tied to the head, the nearest Kronecker
  product of the two uses (:func:`curvdist.geometry.metrics.kfac.nearest_kronecker`), a diagonal plus rank T.

The factor
----------
:class:`LowRankFactor` is F = diag(d) + Bᵀ diag(w) B with d ∈ ℝⁿ, B ∈ ℝ^{r×n} (its rows b_j) and weights
w ∈ ℝʳ (any sign: a difference of terms, e.g. diag(Σp) − Σ ppᵀ, is representable). Sums of factors stack their rows;
n × n is formed only by :meth:`LowRankFactor.dense`, for tests and small n.

The damped block
----------------
A parameter whose block is F ⊗ H (F structured, n × n; H dense, m × m; or H ⊗ F) with damping e > 0 is, in the
eigenbasis H = U_H diag(λ) U_Hᵀ, the direct sum over i of the n × n blocks

    M_i = λ_i F + e·I = E_i^{½} (I + Z_i C_i Z_iᵀ) E_i^{½},    E_i = diag(λ_i d + e),  Z_i = E_i^{-½} Bᵀ,
                                                                 C_i = λ_i diag(w).

With K_i = Z_iᵀZ_i = B E_i⁻¹ Bᵀ = V_K diag(κ) V_Kᵀ (r × r; κ ≈ 0 dropped) and the small eigenproblem
diag(κ^½) V_Kᵀ C_i V_K diag(κ^½) = P diag(θ) Pᵀ, the columns of Q_i = Z_i R_i, R_i = V_K diag(κ^{-½}) P, are
orthonormal and I + Z_i C_i Z_iᵀ = I + Q_i diag(θ) Q_iᵀ. Every function of it is I + Q_i diag(f(1 + θ) − 1) Q_iᵀ, so

    M_i⁻¹ = E_i^{-½} (I + Q_i diag((1+θ)⁻¹ − 1) Q_iᵀ) E_i^{-½}                       (Woodbury),
    W_i   = (I + Q_i diag((1+θ)^{½} − 1) Q_iᵀ) E_i^{½},   M_i = W_iᵀ W_i           (a factor),
    log det M_i = Σ_v log(λ_i d_v + e) + Σ_j log(1 + θ_j)                          (determinant lemma),

each applied in O(n·r) per column and set up in O(n·r² + r³) per distinct E_i (once when d is constant: then
E_i = (λ_i d₀ + e) I, W_i is the symmetric square root and M^{-½} is available). The cores R_i, θ_i are kept, never
Q_i. Eigenvalues of F (for the block's spectrum λ_i·μ_j): exact from the r × r Gram matrix when d is constant, dense
for n ≤ ``dense_eig_max``, refused beyond (a :class:`~curvdist.errors.MetricError` naming the size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import MetricError, ShapeError, SingularMetricError
from ..resources import check_allocation

#: eigenvalues of a structured factor with a non-constant diagonal are computed densely up to this dimension
DENSE_EIG_MAX = 8192


@dataclass(frozen=True)
class LowRankFactor:
    """F = diag(d) + Bᵀ diag(w) B ∈ ℝ^{n×n} (see the module docstring): ``diag`` d (n,), ``rows`` B (r, n),
    ``weights`` w (r,)."""

    diag: Tensor
    rows: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        n = self.diag.shape[0] if self.diag.ndim == 1 else -1
        if n < 0 or self.rows.ndim != 2 or self.rows.shape[1] != n or self.weights.shape != (self.rows.shape[0],):
            raise ShapeError(f"a low-rank factor needs d (n,), B (r, n), w (r,); got {tuple(self.diag.shape)}, "
                             f"{tuple(self.rows.shape)}, {tuple(self.weights.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_rows(cls, rows: Tensor, weights: Tensor | None = None) -> LowRankFactor:
        """Σ_j w_j b_j b_jᵀ (w = 1 unless given)."""
        w = torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device) if weights is None else weights
        return cls(torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device), rows, w.to(rows.dtype))

    @classmethod
    def from_diagonal(cls, d: Tensor) -> LowRankFactor:
        """diag(d)."""
        return cls(d, d.new_zeros(0, d.shape[0]), d.new_zeros(0))

    # ------------------------------------------------------------------ tensor-like
    @property
    def n(self) -> int:
        return int(self.diag.shape[0])

    @property
    def rank(self) -> int:
        """r, the number of rows of the low-rank term."""
        return int(self.rows.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, self.n))

    ndim = 2

    @property
    def dtype(self) -> torch.dtype:
        return self.diag.dtype

    @property
    def device(self) -> torch.device:
        return self.diag.device

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> LowRankFactor:
        """The factor with ``fn`` applied to d, B and w (``.to``, ``.detach``: see ``reducers.tree_map``)."""
        return LowRankFactor(fn(self.diag), fn(self.rows), fn(self.weights))

    def reduce_with(self, total: Callable[[Tensor], Tensor], gather: Callable[[Tensor], Tensor]) -> LowRankFactor:
        """The sum of this factor over shards, given a sum of tensors over the shards (``total``, for d) and a
        concatenation of their rows in shard order (``gather``, for B and w): what a process group's reducer
        does with it (``all_reduce`` and ``all_gather``)."""
        return LowRankFactor(total(self.diag.clone()), gather(self.rows), gather(self.weights))

    def to(self, *args: object, **kwargs: object) -> LowRankFactor:
        return self.map_tensors(lambda t: t.to(*args, **kwargs))  # type: ignore[arg-type]

    def __add__(self, other: object) -> LowRankFactor:
        if isinstance(other, (int, float)) and other == 0:
            return self
        if not isinstance(other, LowRankFactor) or other.n != self.n:
            return NotImplemented
        return LowRankFactor(self.diag + other.diag, torch.cat([self.rows, other.rows]),
                             torch.cat([self.weights, other.weights]))

    __radd__ = __add__

    def __mul__(self, c: object) -> LowRankFactor:
        if not isinstance(c, (int, float)):
            return NotImplemented
        return LowRankFactor(self.diag * c, self.rows, self.weights * c)

    __rmul__ = __mul__

    def __truediv__(self, c: object) -> LowRankFactor:
        if not isinstance(c, (int, float)):
            return NotImplemented
        return self * (1.0 / c)

    # ------------------------------------------------------------------ linear algebra
    def matmul(self, X: Tensor) -> Tensor:
        """F X for X of shape (n,) or (n, m)."""
        low = self.rows.T @ (self.weights.reshape(-1, *([1] * (X.ndim - 1))) * (self.rows @ X))
        return (self.diag if X.ndim == 1 else self.diag[:, None]) * X + low

    def dense(self) -> Tensor:
        """The n × n matrix (small n only)."""
        check_allocation(self.n**2 * self.diag.element_size(), f"a dense {self.n} × {self.n} Kronecker factor",
                         "keep it structured (LowRankFactor)")
        return torch.diag(self.diag) + (self.rows.T * self.weights) @ self.rows

    def diagonal(self) -> Tensor:
        """The diagonal of F: d + Σ_j w_j b_j² (entrywise)."""
        return self.diag + (self.weights[:, None] * self.rows**2).sum(0)

    def constant_diagonal(self) -> float | None:
        """d₀ if d = d₀·1, else None."""
        if self.n == 0:
            return 0.0
        first = self.diag[0]
        return float(first) if bool((self.diag == first).all()) else None

    def gram(self) -> Tensor:
        """B Bᵀ (r × r)."""
        return self.rows @ self.rows.T

    def eigvalsh(self, dense_eig_max: int = DENSE_EIG_MAX) -> Tensor:
        """All n eigenvalues of F, ascending: exact from the r × r problem when d is constant (d₀ + the eigenvalues
        of Bᵀ diag(w) B, which has at most r non-zero ones) or without a low-rank term (d itself), dense up to
        ``dense_eig_max``, refused beyond."""
        if self.rank == 0:
            return torch.sort(self.diag).values
        d0 = self.constant_diagonal()
        if d0 is not None:
            kappa, VK = torch.linalg.eigh(self.gram().double())
            keep = kappa > _drop_tol(kappa, self.rank, self.dtype)
            root = kappa.clamp_min(0).sqrt() * keep
            core = root[:, None] * (VK.T @ (self.weights.double()[:, None] * VK)) * root[None, :]
            theta = torch.linalg.eigvalsh(0.5 * (core + core.T))
            nonzero = theta[theta.abs() > 0]
            vals = torch.cat([nonzero, theta.new_zeros(self.n - nonzero.numel())]) + d0
            return torch.sort(vals).values.to(self.dtype)
        if self.n > dense_eig_max:
            raise MetricError(
                f"the eigenvalues of a {self.n}-dimensional structured Kronecker factor with a non-constant diagonal "
                f"would need its dense {self.n} × {self.n} form; solve, inverse factor and log-det stay structured "
                f"(raise dense_eig_max={dense_eig_max} to force the dense route)")
        F = self.dense().double()
        return torch.linalg.eigvalsh(0.5 * (F + F.T)).to(self.dtype)


def _drop_tol(kappa: Tensor, r: int, dtype: torch.dtype) -> float:
    """Eigenvalues of a Gram matrix below this are rounding (relative to the largest, in the working precision)."""
    top = float(kappa.abs().max()) if kappa.numel() else 0.0
    return max(r, 1) * torch.finfo(dtype).eps * top


def frobenius(a: Tensor | LowRankFactor, b: Tensor | LowRankFactor) -> float:
    """⟨a, b⟩_F = tr(aᵀb) for dense matrices, 1-d tensors (diagonal matrices) and low-rank factors."""
    dense = [isinstance(x, Tensor) and x.ndim == 2 for x in (a, b)]
    if any(dense) and not all(dense):
        return frobenius(as_dense(a), as_dense(b))
    if isinstance(a, LowRankFactor) or isinstance(b, LowRankFactor):
        fa, fb = as_structured(a), as_structured(b)
        dd = float((fa.diag * fb.diag).sum())
        da = float(((fb.rows**2) @ fa.diag * fb.weights).sum())  # tr(diag(d_a) Bbᵀ W_b B_b)
        db = float(((fa.rows**2) @ fb.diag * fa.weights).sum())
        cross = fa.rows @ fb.rows.T  # (r_a, r_b)
        low = float((fa.weights[:, None] * cross**2 * fb.weights[None, :]).sum())
        return dd + da + db + low
    if a.ndim == 1 and b.ndim == 1:
        return float((a * b).sum())
    if a.ndim == 1 or b.ndim == 1:
        return float((a.diagonal() * b).sum() if b.ndim == 1 else (a * b.diagonal()).sum())
    return float((a * b).sum())


def as_structured(a: Tensor | LowRankFactor) -> LowRankFactor:
    """A 1-d tensor (a diagonal) or a factor as a :class:`LowRankFactor`; a dense matrix is refused."""
    if isinstance(a, LowRankFactor):
        return a
    if a.ndim == 1:
        return LowRankFactor.from_diagonal(a)
    raise ShapeError(f"a dense {tuple(a.shape)} factor cannot be combined with structured ones; keep both dense or "
                     f"both structured (the same structured_above)")


def as_dense(a: Tensor | LowRankFactor) -> Tensor:
    """The n × n matrix of a dense matrix, a 1-d tensor (a diagonal) or a low-rank factor."""
    if isinstance(a, LowRankFactor):
        return a.dense()
    return torch.diag(a) if a.ndim == 1 else a


def combine(coefficients: list[float], factors: list[Tensor | LowRankFactor]) -> Tensor | LowRankFactor:
    """Σ_i c_i F_i: dense if any F_i is a dense matrix, a 1-d diagonal if all are, else a :class:`LowRankFactor`."""
    if all(isinstance(f, Tensor) and f.ndim == 2 for f in factors) or all(
            isinstance(f, Tensor) and f.ndim == 1 for f in factors):
        return sum(float(c) * f for c, f in zip(coefficients, factors))  # type: ignore[return-value]
    if any(isinstance(f, Tensor) and f.ndim == 2 for f in factors):
        return sum(float(c) * as_dense(f) for c, f in zip(coefficients, factors))  # type: ignore[return-value]
    out = as_structured(factors[0]) * float(coefficients[0])
    for c, f in zip(coefficients[1:], factors[1:]):
        out = out + as_structured(f) * float(c)
    return out


class StructuredKronecker:
    """The block F ⊗ H (``side == 0``) or H ⊗ F (``side == 1``) of a parameter, F a :class:`LowRankFactor`
    (n × n) and H dense (m × m, given by its eigendecomposition λ_H, U_H), with the damped powers of the module
    docstring. Vectors are the parameter's row-major flattening: (F ⊗ H) vec(X) = vec(F X Hᵀ) for X (n, m)."""

    def __init__(self, F: LowRankFactor, lam: Tensor, U: Tensor, side: int, what: str) -> None:
        self.F, self.lam, self.U, self.side, self.what = F, lam, U, side, what
        self._cores: dict[float, tuple[Tensor, Tensor]] = {}
        #: W is the symmetric square root (E_i a multiple of I, or no low-rank term)
        self.symmetric = F.rank == 0 or F.constant_diagonal() is not None

    @property
    def n(self) -> int:
        return self.F.n

    @property
    def m(self) -> int:
        return int(self.lam.shape[0])

    def _layout(self, v: Tensor) -> Tensor:
        """v as X (n, m) in H's eigenbasis."""
        X = v.reshape(self.m, self.n).T if self.side == 1 else v.reshape(self.n, self.m)
        return X @ self.U

    def _unlayout(self, Y: Tensor) -> Tensor:
        X = Y @ self.U.T
        return (X.T if self.side == 1 else X).reshape(-1)

    def _E(self, damping: float) -> Tensor:
        """E (n, m): column i is λ_i d + e."""
        return self.F.diag[:, None] * self.lam[None, :] + damping

    def cores(self, damping: float) -> tuple[Tensor, Tensor]:
        """(R (m, r, r), θ (m, r)) for damping e; see the module docstring. Raises SingularMetricError where a
        block λ_i F + e I is singular (or its diagonal part E_i is: the Woodbury route needs E_i > 0)."""
        if damping in self._cores:
            return self._cores[damping]
        F, r, m = self.F, self.F.rank, self.m
        d = F.diag.double()
        lam = self.lam.double()
        if bool((d[None, :] * lam[:, None] + damping <= 0).any()) if F.n * m else False:
            raise SingularMetricError(
                f"the structured Kronecker block of {self.what} is singular (or has a singular diagonal part: a "
                f"factor eigenvalue or a diagonal entry is 0, e.g. a token that never occurs); add damping > 0")
        check_allocation(2 * m * r * r * 8, f"the {m} × {r} × {r} Woodbury cores of {self.what}",
                         "use fewer tokens in the metric's batches (the low-rank term has one row per token and "
                         "sampled label)")
        B = F.rows.double()
        w = F.weights.double()
        R = torch.zeros(m, r, r, dtype=torch.float64, device=B.device)
        theta = torch.zeros(m, r, dtype=torch.float64, device=B.device)
        d0 = F.constant_diagonal()
        shared = None if d0 is None else torch.linalg.eigh(B @ B.T)
        for i in range(m):
            if r == 0:
                break
            if shared is not None:
                e_i = float(lam[i]) * d0 + damping  # type: ignore[operator]
                kappa, VK = shared[0] / e_i, shared[1]
            else:
                Ei = d * lam[i] + damping
                kappa, VK = torch.linalg.eigh((B / Ei) @ B.T)
            keep = kappa > _drop_tol(kappa, r, self.F.dtype)
            root = torch.where(keep, kappa.clamp_min(0).sqrt(), torch.zeros_like(kappa))
            inv_root = torch.where(keep, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(kappa))
            core = root[:, None] * (VK.T @ ((lam[i] * w)[:, None] * VK)) * root[None, :]
            th, P = torch.linalg.eigh(0.5 * (core + core.T))
            R[i] = (VK * inv_root[None, :]) @ P
            theta[i] = th
        if r and bool((1 + theta <= 1e3 * torch.finfo(self.F.dtype).eps).any()):
            raise SingularMetricError(f"the structured Kronecker block of {self.what} is singular (λ_i F + δI has "
                                      f"a non-positive eigenvalue); add damping > 0")
        self._cores[damping] = (R, theta)
        return R, theta

    def _qgq(self, u: Tensor, Es: Tensor, R: Tensor, g: Tensor) -> Tensor:
        """Q_i diag(g_i) Q_iᵀ u_i for every column u_i of u (n, m), Q_i = E_i^{-½} Bᵀ R_i (never formed)."""
        B = self.F.rows.to(u.dtype)
        R = R.to(u.dtype)
        c = B @ (u / Es)  # (r, m)
        c = torch.einsum("irs,ri->si", R, c) * g.T.to(u.dtype)
        c = torch.einsum("irs,si->ri", R, c)
        return (B.T @ c) / Es

    def power(self, v: Tensor, exponent: float, damping: float) -> Tensor:
        """(block + e I)^exponent v for exponent 1, −1 or −½ (−½: the factor W⁻¹ of the module docstring, the
        symmetric inverse square root when d is constant)."""
        Y = self._layout(v)
        if exponent == 1:
            return self._unlayout(self.F.matmul(Y) * self.lam[None, :].to(Y.dtype) + damping * Y)
        return self._unlayout(self._inverse(Y, exponent, damping, transpose=False))

    def inv_factor_t(self, v: Tensor, damping: float) -> Tensor:
        """W⁻ᵀ v for the factor W of the module docstring (= W⁻¹ v when d is constant)."""
        return self._unlayout(self._inverse(self._layout(v), -0.5, damping, transpose=True))

    def _inverse(self, Y: Tensor, exponent: float, damping: float, transpose: bool) -> Tensor:
        R, theta = self.cores(damping)
        Es = self._E(damping).to(Y.dtype).sqrt()
        if exponent == -1:  # E^{-½} (I + Q g Qᵀ) E^{-½}
            u = Y / Es
            return (u + self._qgq(u, Es, R, 1 / (1 + theta) - 1)) / Es
        if exponent != -0.5:
            raise MetricError(f"structured Kronecker blocks offer powers 1, -1 and -1/2, not {exponent}")
        g = (1 + theta).rsqrt() - 1
        if transpose:  # W⁻ᵀ = (I + Q g Qᵀ) E^{-½}
            u = Y / Es
            return u + self._qgq(u, Es, R, g)
        return (Y + self._qgq(Y, Es, R, g)) / Es  # W⁻¹ = E^{-½} (I + Q g Qᵀ)

    def logdet(self, damping: float) -> float:
        """log det(block + e I), structured (no n × n matrix)."""
        _, theta = self.cores(damping)
        d = self.F.diag.double()
        diag_part = sum(float(torch.log(d * float(lam_i) + damping).sum()) for lam_i in self.lam.double())
        return diag_part + float(torch.log1p(theta).sum())

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of the undamped block, λ_i·μ_j (n·m of them; μ from :meth:`LowRankFactor.eigvalsh`)."""
        mu = self.F.eigvalsh()
        return torch.outer(mu, self.lam.to(mu.dtype)).reshape(-1)

    def dense(self, damping: float) -> Tensor:
        H = (self.U * self.lam) @ self.U.T
        F = self.F.dense()
        block = torch.kron(F, H) if self.side == 0 else torch.kron(H, F)
        return block + damping * torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
