"""Queries on curvature operators and their results."""

from .api import density, diag, eigs, flatness, grad_norm, logdet, trace
from .blocks import block_spectra
from .evidence import evidence
from .result import Result

__all__ = ["Result", "block_spectra", "density", "diag", "eigs", "evidence", "flatness", "grad_norm", "logdet", "trace"]
