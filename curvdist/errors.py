"""Exception classes of curvdist.

Every error a user can trigger by bad input is one of these, raised early with a message that names the cause,
never a traceback from deep inside torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class CurvdistError(Exception):
    """Base class of all curvdist errors."""


class ProblemError(CurvdistError, ValueError):
    """The problem (model, loss, data, parameter selection) is malformed."""


class DataError(ProblemError):
    """The data are empty, non-finite, or of the wrong shape/type."""


class NonFiniteError(CurvdistError, FloatingPointError):
    """A loss, gradient or curvature product is NaN or infinite."""


class NonDeterministicError(CurvdistError, RuntimeError):
    """Two identical curvature products disagree: the problem is not a fixed function of the parameters."""


class AutodiffError(CurvdistError, RuntimeError):
    """A torch.func transform failed on the model (an op without forward-mode derivative, in-place state update)."""


class ShapeError(CurvdistError, ValueError):
    """A vector does not match the parameter space of an operator."""


class SolverError(CurvdistError, ValueError):
    """A solver was asked for something impossible (k larger than the dimension, a bad budget, ...)."""


class NotPositiveDefiniteError(SolverError):
    """A query that needs a positive-definite operator (log-det) met a non-positive eigenvalue."""


class ReparamError(CurvdistError, ValueError):
    """A reparametrization does not fit the parameters (shape, selection) or is not invertible at the point."""


class MetricError(CurvdistError, ValueError):
    """A metric cannot be built or cannot serve a request (unsupported layer, missing optimizer state, ...)."""


class SingularMetricError(MetricError):
    """The metric (with its damping) is singular, so M⁻¹ does not exist; add damping."""


class ConfigError(CurvdistError, ValueError):
    """A YAML configuration is invalid; the message names the offending key."""


class DependencyError(CurvdistError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


class UnknownNameError(CurvdistError, ValueError):
    """A name (curvature, metric, query, estimator, reparametrization kind...) is not in the catalogue; the message
    lists the valid names (:mod:`curvdist.catalogue`)."""


class MemoryBudgetError(CurvdistError, MemoryError):
    """An allocation would not fit in this machine's available memory; the message names its size, what it is
    for, and the option that avoids it (raised before allocating, instead of an allocator error)."""


def first_line(error: BaseException, typed: bool = False) -> str:
    """The first line of an exception's message (its type's name where the message is empty), for errors that
    report a failure inside torch in one line; ``typed`` prefixes the type's name."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0]}" if typed else text.splitlines()[0]


@contextmanager
def failures_inside_torch(what: str, where: str, requirement: str) -> Iterator[None]:
    """A ``RuntimeError``/``NotImplementedError`` raised inside the block (torch: an op without the derivative a pass
    needs, an in-place update of module state) raised as :class:`AutodiffError` "``what`` failed inside torch
    ``where``: <torch's first line> -- ``requirement``"; curvdist's own errors and other exceptions pass as they
    are."""
    try:
        yield
    except CurvdistError:
        raise
    except (RuntimeError, NotImplementedError) as e:
        raise AutodiffError(f"{what} failed inside torch{where}: {first_line(e)} -- {requirement}") from e
