"""curvdist: reparametrization-aware curvature of neural-network loss landscapes, from a laptop to a cluster.

The Python API::

    import curvdist as cd
    problem = cd.Problem(model, "cross_entropy", (X, y), batch_size=256)
    H = cd.operator(problem, "hessian")
    cd.eigs(H, k=5).value          # top-5 eigenvalues
    cd.trace(H, method="hutchpp", matvecs=150, seed=0)
"""

from .errors import (
    AutodiffError,
    ConfigError,
    CurvdistError,
    DataError,
    MetricError,
    NonDeterministicError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ProblemError,
    ReparamError,
    ShapeError,
    SingularMetricError,
    SolverError,
)
from .operators import CurvatureOperator, operator
from .problem import Problem
from .queries import Result, density, diag, eigs, grad_norm, logdet, trace

__version__ = "0.1.0"

__all__ = [
    "AutodiffError", "ConfigError", "CurvatureOperator", "CurvdistError", "DataError", "MetricError", "ReparamError",
    "SingularMetricError", "NonDeterministicError", "NonFiniteError",
    "NotPositiveDefiniteError", "Problem", "ProblemError", "Result", "ShapeError", "SolverError", "__version__",
    "density", "diag", "eigs", "grad_norm", "logdet", "operator", "trace",
]
