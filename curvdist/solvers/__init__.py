"""Solvers that see vectors only through a :class:`VectorSpace`: Lanczos, trace, diagonal, SLQ."""

from .diag import DIAG_METHODS, DiagEstimate, hutchinson_diag, xdiag
from .lanczos import EigenPairs, Krylov, eigsh, lanczos, lanczos_lockstep
from .orth import orthonormalize
from .restart import eigsh_restarted
from .slq import Quadrature, density, logdet, quadrature, spectral_sum
from .space import BlockMap, TorchSpace, VectorSpace, probe_seeds, random_flat
from .trace import TRACE_METHODS, Estimate, hutchinson, hutchpp, xtrace

__all__ = [
    "DIAG_METHODS", "TRACE_METHODS", "BlockMap", "DiagEstimate", "EigenPairs", "Estimate", "Krylov", "Quadrature",
    "TorchSpace", "VectorSpace", "density", "eigsh", "eigsh_restarted", "hutchinson", "hutchinson_diag", "hutchpp",
    "lanczos", "lanczos_lockstep", "logdet", "orthonormalize", "probe_seeds", "quadrature", "random_flat",
    "spectral_sum", "xdiag", "xtrace",
]
