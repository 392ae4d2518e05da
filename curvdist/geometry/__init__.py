"""Geometry: metrics, reparametrizations, transformation rules and the Riemannian Hessian."""

from .metrics import Metric, metric
from .reparam import reparametrize
from .riemannian import RiemannianHessian

__all__ = ["Metric", "RiemannianHessian", "metric", "reparametrize"]
