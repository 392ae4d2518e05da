"""Query results: frozen records that serialize to JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch


def to_jsonable(x: Any) -> Any:
    """Tensors and arrays to (nested) lists, numpy scalars to Python numbers, non-finite floats to strings."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    if isinstance(x, np.ndarray):
        return [to_jsonable(v) for v in x.tolist()] if x.ndim else to_jsonable(x.item())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return to_jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    return x


@dataclass(frozen=True)
class Result:
    """One query's answer.

    ``value`` is a float (trace, log-det, grad_norm), a list of floats (eigenvalues), a tensor (diagonal) or a dict
    (density grid). ``stderr`` is the standard error of stochastic estimators (None for deterministic ones).
    ``matvecs`` counts curvature-vector products, ``seconds`` is wall time. ``info`` holds method details
    (residuals, iterations, budget...). ``vectors`` (eigenvectors) is kept in memory only, not serialized.
    """

    query: str
    value: Any
    stderr: Any = None
    matvecs: int = 0
    seconds: float = 0.0
    converged: bool = True
    seed: int | None = None
    dtype: str = ""
    curvature: str = ""
    metric: str = "euclidean"
    coordinates: str = "theta"
    backend: str = "local"
    info: dict[str, Any] = field(default_factory=dict)
    vectors: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """All fields but ``vectors``, as JSON-compatible Python objects."""
        return {f.name: to_jsonable(getattr(self, f.name)) for f in fields(self) if f.name != "vectors"}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)
