"""Every option name of curvdist, defined once: curvature kinds, metric kinds, query kinds, estimator methods and
reparametrization kinds, as ``str`` enums.

The factories (:func:`curvdist.operator`, :func:`curvdist.metric`, the query functions, ``cd.reparam``), the YAML
schema and the DeepSpeed config section all derive their choices from here, so adding a kind is a one-place change
here plus its implementation. :func:`parse` turns a user's string into a member or raises one
:class:`~curvdist.errors.UnknownNameError` listing the valid names.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import UnknownNameError


class Name(str, Enum):
    """A catalogue name: compares equal to its string and prints as it."""

    def __str__(self) -> str:
        return str(self.value)


class Curvature(Name):
    """Curvature matrices C (operators)."""

    HESSIAN = "hessian"
    GGN = "ggn"
    FISHER = "fisher"
    FISHER_MC = "fisher_mc"
    EMPIRICAL_FISHER = "empirical_fisher"


class LossKind(Name):
    """Per-sample losses ℓ with exact output-space Hessians."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    CAUSAL_LM = "causal_lm"
    TOKEN_CROSS_ENTROPY = "token_cross_entropy"


class Reduction(Name):
    """L = s·Σ_n ℓ_n with s = 1/N (mean) or 1 (sum)."""

    MEAN = "mean"
    SUM = "sum"


class MetricKind(Name):
    """Metrics M on parameter space."""

    EUCLIDEAN = "euclidean"
    FISHER = "fisher"
    GGN = "ggn"
    FISHER_MC = "fisher_mc"
    EMPIRICAL_FISHER = "empirical_fisher"
    DIAG_GGN = "diag_ggn"
    DIAG_FISHER_MC = "diag_fisher_mc"
    EMPIRICAL_FISHER_DIAG = "empirical_fisher_diag"
    KFAC = "kfac"
    KFLR = "kflr"
    EKFAC = "ekfac"
    ADAM = "adam"
    PULLBACK = "pullback"


#: metric families
CURVATURE_METRICS = (MetricKind.FISHER, MetricKind.GGN, MetricKind.FISHER_MC, MetricKind.EMPIRICAL_FISHER)
DIAGONAL_METRICS = (MetricKind.DIAG_GGN, MetricKind.DIAG_FISHER_MC, MetricKind.EMPIRICAL_FISHER_DIAG)
KRONECKER_METRICS = (MetricKind.KFAC, MetricKind.KFLR)
#: the θ metrics a pull-back may carry to ψ
PULLBACK_OF = (MetricKind.EUCLIDEAN, MetricKind.FISHER, MetricKind.GGN, MetricKind.DIAG_GGN, MetricKind.KFAC,
               MetricKind.KFLR, MetricKind.EKFAC)


class QueryKind(Name):
    EIGS = "eigs"
    TRACE = "trace"
    DIAG = "diag"
    LOGDET = "logdet"
    DENSITY = "density"
    GRAD_NORM = "grad_norm"
    FLATNESS = "flatness"
    BLOCK_SPECTRA = "block_spectra"
    EVIDENCE = "evidence"


class TraceMethod(Name):
    """Trace estimators: Hutchinson (1989); Hutch++ (Meyer et al. 2021); XTrace (Epperly et al. 2024); exact."""

    HUTCHINSON = "hutchinson"
    HUTCHPP = "hutchpp"
    XTRACE = "xtrace"
    EXACT = "exact"


class LogdetMethod(Name):
    """Log-determinant methods: stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017); exact (dense)."""

    SLQ = "slq"
    EXACT = "exact"


class DiagMethod(Name):
    """Diagonal estimators: Hutchinson (Bekas et al. 2007); XDiag (Epperly et al. 2024)."""

    HUTCHINSON = "hutchinson"
    XDIAG = "xdiag"


class Which(Name):
    """Which end of the spectrum eigs returns."""

    LARGEST = "largest"
    SMALLEST = "smallest"
    MAGNITUDE = "magnitude"


class ReparamKind(Name):
    SCALE = "scale"
    EXP = "exp"
    SOFTPLUS = "softplus"
    NTK = "ntk"
    WEIGHT_NORM = "weight_norm"
    LINEAR = "linear"
    COMPOSE = "compose"


class Grouping(Name):
    """How block_spectra groups the parameters into blocks (or pass an explicit mapping)."""

    LAYER = "layer"
    PARAMETER = "parameter"
    BLOCK = "block"


class SolveMethod(Name):
    """How a curvature metric (fisher, ggn, ...) is applied and solved: dense Cholesky up to a size, or CG."""

    AUTO = "auto"
    DENSE = "dense"
    CG = "cg"


class DampingReference(Name):
    """In ψ coordinates: damp with δ·I_θ pulled back to δ·JᵀJ (a tensor) or with δ·I_ψ."""

    PULLBACK = "pullback"
    IDENTITY = "identity"


E = TypeVar("E", bound=Name)


def names(catalogue: type[Name] | tuple[Name, ...]) -> list[str]:
    """The valid names of a catalogue (or a family of its members), in their defined order."""
    return [str(m.value) for m in catalogue]


def parse(catalogue: type[E], value: object, what: str, allowed: tuple[E, ...] | None = None) -> E:
    """``value`` as a member of ``catalogue`` (restricted to ``allowed`` when given); anything else raises
    :class:`UnknownNameError` ``unknown <what> '<value>'; choose one of: a, b, c``."""
    choices = allowed if allowed is not None else tuple(catalogue)
    if isinstance(value, str):
        for m in choices:
            if m.value == value:
                return m
    raise UnknownNameError(f"unknown {what} {value!r}; choose one of: {', '.join(names(choices))}")


__all__ = ["CURVATURE_METRICS", "DIAGONAL_METRICS", "KRONECKER_METRICS", "PULLBACK_OF", "Curvature", "DampingReference",
           "DiagMethod", "Grouping", "LogdetMethod", "LossKind", "MetricKind", "Name", "QueryKind", "Reduction", "ReparamKind", "SolveMethod", "TraceMethod", "Which", "names", "parse"]


class HVPMode(Name):
    """How the Hessian-vector product is computed (:mod:`curvdist.operators.hvp_modes`): ``auto`` times the exact
    modes on the model at construction and keeps the fastest; ``finite_difference`` is for engines without
    second derivatives."""

    AUTO = "auto"
    FORWARD_OVER_REVERSE = "forward_over_reverse"
    REVERSE_OVER_REVERSE = "reverse_over_reverse"
    FINITE_DIFFERENCE = "finite_difference"


__all__ += ["HVPMode"]


class KFACApproximation(Name):
    """How KFAC/KFLR treat a weight shared over positions (tokens, output pixels, repeated calls): the expand and
    reduce approximations of Eschenhagen et al. (NeurIPS 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


__all__ += ["KFACApproximation"]
