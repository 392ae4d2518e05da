"""The vector-space interface the solvers speak.

Solvers never touch vector storage: they call these few methods and keep only scalars (float64 numpy) on the
coordinator. A local implementation holds flat torch tensors; the distributed backend holds shards on actors.
Random vectors are a function of an integer seed alone (not of the layout), so a sharded space reproduces the
local numbers exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..errors import SolverError

Vector = Any
LinearMap = Callable[[Vector], Vector]

PROBE_KINDS = ("rademacher", "gaussian")


@runtime_checkable
class VectorSpace(Protocol):
    """ℝ^d with the Euclidean inner product, as seen by a solver."""

    dim: int

    def dot(self, x: Vector, y: Vector) -> float: ...
    def axpy(self, a: float, x: Vector, y: Vector) -> Vector: ...  # a·x + y
    def scale(self, a: float, x: Vector) -> Vector: ...
    def norm(self, x: Vector) -> float: ...
    def zeros(self) -> Vector: ...
    def random(self, seed: int, kind: str = "rademacher") -> Vector: ...
    def mul(self, x: Vector, y: Vector) -> Vector: ...  # elementwise x ⊙ y (diagonal estimators)
    def dots(self, xs: Sequence[Vector], y: Vector) -> np.ndarray: ...  # [x_iᵀ y]_i
    def lincomb(self, coeffs: np.ndarray, xs: Sequence[Vector]) -> Vector: ...  # Σ_i c_i x_i
    def to_tensor(self, x: Vector) -> Tensor: ...  # gather into one flat tensor
    def from_tensor(self, t: Tensor) -> Vector: ...  # scatter a flat tensor (checkpoint restore)


def random_flat(dim: int, seed: int, kind: str, dtype: torch.dtype) -> Tensor:
    """The layout-independent random vector of a seed, generated on the CPU in float64 and then cast.

    ``rademacher``: entries ±1 with probability ½; ``gaussian``: standard normal entries.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "rademacher":
        v = torch.randint(0, 2, (dim,), generator=g, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    elif kind == "gaussian":
        v = torch.randn(dim, generator=g, dtype=torch.float64)
    else:
        raise SolverError(f"unknown probe kind {kind!r}; choose one of {PROBE_KINDS}")
    return v.to(dtype)


def probe_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from one user seed (numpy SeedSequence)."""
    state = np.random.SeedSequence(int(seed)).generate_state(count, dtype=np.uint64)
    return [int(s >> np.uint64(1)) for s in state]


class TorchSpace:
    """Flat torch tensors on one device. Inner products are accumulated in float64."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)

    def dot(self, x: Tensor, y: Tensor) -> float:
        return float(torch.dot(x.double(), y.double()))

    def axpy(self, a: float, x: Tensor, y: Tensor) -> Tensor:
        return torch.add(y, x, alpha=float(a))

    def scale(self, a: float, x: Tensor) -> Tensor:
        return x * float(a)

    def norm(self, x: Tensor) -> float:
        return float(torch.linalg.vector_norm(x.double()))

    def zeros(self) -> Tensor:
        return torch.zeros(self.dim, dtype=self.dtype, device=self.device)

    def random(self, seed: int, kind: str = "rademacher") -> Tensor:
        return random_flat(self.dim, seed, kind, self.dtype).to(self.device)

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        return x * y

    def dots(self, xs: Sequence[Tensor], y: Tensor) -> np.ndarray:
        if not xs:
            return np.zeros(0)
        return (torch.stack(list(xs)).double() @ y.double()).cpu().numpy()

    def lincomb(self, coeffs: np.ndarray, xs: Sequence[Tensor]) -> Tensor:
        if len(xs) == 0:
            return self.zeros()
        c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64), device=self.device)
        return (c @ torch.stack(list(xs)).double()).to(self.dtype)

    def to_tensor(self, x: Tensor) -> Tensor:
        return x

    def from_tensor(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.dtype)
