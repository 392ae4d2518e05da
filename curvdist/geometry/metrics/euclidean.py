"""The Euclidean metric of the current coordinates, M = I (damped: (1 + δ)I)."""

from __future__ import annotations

import math

from torch import Tensor

from .base import Metric


class EuclideanMetric(Metric):
    """M_δ = (1 + δ) I — the metric every curvature library assumes without saying so."""

    kind = "euclidean"
    has_factor = True
    has_inv_sqrt = True

    def apply_undamped(self, v: Tensor) -> Tensor:
        return v

    def apply(self, v: Tensor) -> Tensor:
        self._check(v)
        return v * (1.0 + self.damping)

    def solve(self, v: Tensor) -> Tensor:
        self._check(v)
        return v / (1.0 + self.damping)

    def inv_factor_apply(self, v: Tensor) -> Tensor:
        self._check(v)
        return v / math.sqrt(1.0 + self.damping)

    inv_factor_t_apply = inv_factor_apply

    def logdet(self) -> float:
        return self.dim * math.log1p(self.damping)
