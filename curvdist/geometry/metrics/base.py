"""Metrics: symmetric positive-definite matrices M on the parameter space, with damping.

Every metric represents M_δ = M + δ·R, where R is the damping reference (the identity of the current coordinates
unless another metric is given: in ψ = φ⁻¹(θ) coordinates the θ-identity is pulled back to JᵀJ so that the damped
metric is a tensor). Vectors are flat tensors of length ``dim``.

Subclasses implement :meth:`apply_undamped` and whichever of the optional capabilities they offer cheaply:

* ``solve``                      v ↦ M_δ⁻¹ v
* ``inv_factor_apply``           v ↦ W⁻¹ v,  for a factor M_δ = WᵀW (``has_factor``)
* ``inv_factor_t_apply``         v ↦ W⁻ᵀ v
* ``logdet``                     log det M_δ

Queries use the factor to form the symmetric operator S = W⁻ᵀ C W⁻¹, which has the eigenvalues of M_δ⁻¹C. For a
symmetric square root (diagonal, Kronecker, dense Cholesky is not symmetric but is a factor) W⁻¹ = W⁻ᵀ = M_δ^{-1/2}
and :meth:`inv_sqrt_apply` is offered too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ...errors import MetricError, ShapeError, SolverError
from ...finite import all_finite


class Metric(ABC):
    """M_δ = M + δ·R on ℝ^dim."""

    kind: str = "metric"
    #: W⁻¹ and W⁻ᵀ are cheap (M_δ = WᵀW)
    has_factor: bool = False
    #: the factor is the symmetric square root, so inv_sqrt_apply is available
    has_inv_sqrt: bool = False
    #: the metric transforms as a tensor only under reparametrizations with a diagonal Jacobian
    diagonal_only: bool = False

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str, damping: float = 0.0,
                 damping_metric: Metric | None = None) -> None:
        if not damping >= 0:
            raise MetricError(f"damping must be ≥ 0, got {damping!r}")
        if damping_metric is not None and damping_metric.dim != dim:
            raise ShapeError(f"damping metric has dimension {damping_metric.dim}, expected {dim}")
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.damping = float(damping)
        self.damping_metric = damping_metric

    # ------------------------------------------------------------------ required
    @abstractmethod
    def apply_undamped(self, v: Tensor) -> Tensor:
        """M v without the damping term."""

    # ------------------------------------------------------------------ derived
    def apply(self, v: Tensor) -> Tensor:
        """M_δ v = M v + δ R v."""
        self._check(v)
        out = self.apply_undamped(v)
        if self.damping:
            ref = v if self.damping_metric is None else self.damping_metric.apply(v)
            out = out + self.damping * ref
        return out

    def solve(self, v: Tensor) -> Tensor:
        """M_δ⁻¹ v (default: W⁻¹ W⁻ᵀ v through the factor)."""
        if not self.has_factor:
            raise SolverError(f"the {self.kind} metric offers no solve")
        return self.inv_factor_apply(self.inv_factor_t_apply(v))

    def inv_factor_apply(self, v: Tensor) -> Tensor:
        """W⁻¹ v for a factor M_δ = WᵀW."""
        raise SolverError(f"the {self.kind} metric has no cheap factor; use its solve (CG) instead")

    def inv_factor_t_apply(self, v: Tensor) -> Tensor:
        """W⁻ᵀ v for a factor M_δ = WᵀW."""
        raise SolverError(f"the {self.kind} metric has no cheap factor; use its solve (CG) instead")

    def inv_sqrt_apply(self, v: Tensor) -> Tensor:
        """M_δ^{-1/2} v (symmetric square root), where the metric offers it cheaply."""
        if not self.has_inv_sqrt:
            raise SolverError(f"the {self.kind} metric has no cheap inverse square root")
        return self.inv_factor_apply(v)

    def logdet(self) -> float:
        """log det M_δ."""
        raise SolverError(f"the {self.kind} metric offers no log-determinant")

    def to_dense(self, max_dim: int = 8192) -> Tensor:
        """The dim×dim matrix M_δ (tiny models only)."""
        if self.dim > max_dim:
            raise SolverError(f"to_dense() of a {self.dim}-dimensional metric refused (max_dim={max_dim})")
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.apply(eye[i]) for i in range(self.dim)], dim=1)

    def _check(self, v: Tensor) -> None:
        if v.ndim != 1 or v.numel() != self.dim:
            raise ShapeError(f"{self.kind} metric acts on flat vectors of length {self.dim}, got {tuple(v.shape)}")

    def describe(self) -> str:
        return self.kind if not self.damping else f"{self.kind}+{self.damping:g}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, damping={self.damping:g})"


class DiagonalMetric(Metric):
    """M_δ = diag(d) + δ·diag(r) for a vector d ≥ 0 and the damping reference's diagonal r (default r = 1, i.e.
    δI; refused when an entry of d + δr is ≤ 0).

    ``damping_diagonal`` r: the diagonal of a diagonal damping reference, e.g. r = diag(JᵀJ) = J_ii² for the
    θ-identity pulled back through a reparametrization with a diagonal Jacobian (see
    :func:`curvdist.geometry.damping.pulled_back_damping`), which keeps the damped metric diagonal *and* a tensor.
    """

    kind = "diagonal"
    has_factor = True
    has_inv_sqrt = True
    diagonal_only = True

    def __init__(self, diagonal: Tensor, damping: float = 0.0, kind: str | None = None,
                 names: list[str] | None = None, damping_diagonal: Tensor | None = None) -> None:
        super().__init__(diagonal.numel(), diagonal.dtype, diagonal.device, damping)
        if kind is not None:
            self.kind = kind
        self.diagonal = diagonal.reshape(-1)
        if not all_finite(self.diagonal):
            raise MetricError(f"the {self.kind} metric's diagonal contains NaN or inf")
        self.damping_diagonal: Tensor | None = None
        if damping_diagonal is None:
            self._d = self.diagonal + self.damping
        else:
            r = damping_diagonal.detach().reshape(-1).to(dtype=self.dtype, device=self.device)
            if r.numel() != self.dim:
                raise ShapeError(f"damping_diagonal has {r.numel()} entries, the {self.kind} metric {self.dim}")
            if not all_finite(r) or not bool((r >= 0).all()):
                raise MetricError(f"the {self.kind} metric's damping diagonal must be finite and ≥ 0")
            self.damping_diagonal = r
            self._d = self.diagonal + self.damping * r
        if not bool((self._d > 0).all()):
            from ...errors import SingularMetricError

            i = int(torch.argmin(self._d))
            where = f" (entry {i}" + (f", parameter {names[i]}" if names else "") + ")"
            raise SingularMetricError(
                f"the {self.kind} metric is singular: diagonal entry {float(self._d[i]):.3g} ≤ 0{where}; "
                f"add damping > 0"
            )

    def apply_undamped(self, v: Tensor) -> Tensor:
        return self.diagonal * v

    def apply(self, v: Tensor) -> Tensor:
        self._check(v)
        return self._d * v

    def solve(self, v: Tensor) -> Tensor:
        self._check(v)
        return v / self._d

    def inv_factor_apply(self, v: Tensor) -> Tensor:
        self._check(v)
        return v / self._d.sqrt()

    inv_factor_t_apply = inv_factor_apply

    def logdet(self) -> float:
        return float(torch.log(self._d.double()).sum())

    def to_dense(self, max_dim: int = 8192) -> Tensor:
        return torch.diag(self._d)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What determines M_δ = diag(d) + δ·diag(r), as plain values and tensors (``torch.load(weights_only=True)``
        reads it back): ``{"type": "diagonal", "kind", "damping", "diagonal": d, "damping_diagonal": r or None}``."""
        return {"type": "diagonal", "kind": self.kind, "damping": self.damping, "diagonal": self.diagonal,
                "damping_diagonal": getattr(self, "damping_diagonal", None)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DiagonalMetric:
        """The very metric whose :meth:`state_dict` ``state`` is (nothing is recomputed from data)."""
        if state.get("type") != "diagonal":
            raise MetricError(f"not the state of a diagonal metric (type {state.get('type')!r})")
        r = state.get("damping_diagonal")
        extra = {} if r is None else {"damping_diagonal": r}
        return cls(state["diagonal"], float(state["damping"]), kind=str(state["kind"]), **extra)
