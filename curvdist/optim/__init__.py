"""Optimizers that precondition with curvdist metrics."""

from .riemannian_sgd import RiemannianSGD

__all__ = ["RiemannianSGD"]
