"""curvdist: reparametrization-aware curvature of neural-network loss landscapes, from a laptop to a cluster.

The Python API::

    import curvdist as cd
    problem = cd.Problem(model, "cross_entropy", (X, y), batch_size=256)
    H = cd.operator(problem, "hessian")
    cd.eigs(H, k=5).value          # top-5 eigenvalues
    cd.trace(H, method="hutchpp", matvecs=150, seed=0)
"""

from . import catalogue, optim
from .distributed.backend import RayBackend, ray_backend
from .errors import (
    AutodiffError,
    ConfigError,
    CurvdistError,
    DataError,
    DependencyError,
    MetricError,
    NonDeterministicError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ProblemError,
    ReparamError,
    ShapeError,
    SingularMetricError,
    SolverError,
    UnknownNameError,
)
from .geometry import Metric, RiemannianHessian, metric, reparam, reparametrize
from .operators import CurvatureOperator, operator
from .problem import InProcessReducer, Problem, ProblemSpec, ProcessGroupReducer, ShardedProblem, ShardReducer
from .queries import Result, block_spectra, density, diag, eigs, evidence, flatness, grad_norm, logdet, trace
from .runtime import set_threads, threads

__version__ = "0.1.0"


def riemannian_hessian(problem: Problem, method: str = "autodiff") -> RiemannianHessian:
    """The Riemannian Hessian Jᵀ H_θ J of a problem made by ``reparametrize`` (pull-back metric)."""
    return RiemannianHessian(problem, method=method)

__all__ = [
    "AutodiffError", "ConfigError", "CurvatureOperator", "CurvdistError", "DataError", "DependencyError", "MetricError", "ReparamError",
    "SingularMetricError", "NonDeterministicError", "NonFiniteError",
    "NotPositiveDefiniteError", "Problem", "ProblemError", "Result", "ShapeError", "SolverError", "__version__",
    "Metric", "RiemannianHessian", "block_spectra", "density", "diag", "eigs", "evidence", "flatness", "grad_norm", "logdet", "metric", "operator",
    "optim", "reparam", "reparametrize", "riemannian_hessian", "trace",
    "InProcessReducer", "ProblemSpec", "ProcessGroupReducer", "RayBackend", "ShardReducer", "ShardedProblem",
    "UnknownNameError", "catalogue", "ray_backend", "set_threads", "threads",
]
