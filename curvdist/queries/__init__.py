"""Queries on curvature operators and their results."""

from .api import density, diag, eigs, flatness, grad_norm, logdet, trace
from .result import Result

__all__ = ["Result", "density", "diag", "eigs", "flatness", "grad_norm", "logdet", "trace"]
