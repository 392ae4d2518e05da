"""Matrix-free curvature operators (Hessian, GGN, Fisher, Monte-Carlo Fisher, empirical Fisher)."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ProblemError
from ..problem.problem import Problem
from .base import CurvatureOperator
from .hessian import Hessian
from .output_space import GGN, EmpiricalFisher, Fisher, FisherMC, OutputSpaceCurvature

OPERATORS: dict[str, type[CurvatureOperator]] = {
    "hessian": Hessian,
    "ggn": GGN,
    "fisher": Fisher,
    "fisher_mc": FisherMC,
    "empirical_fisher": EmpiricalFisher,
}


def operator(problem: Problem, kind: str = "hessian", **options: Any) -> CurvatureOperator:
    """Build the curvature operator ``kind`` of ``problem``.

    Kinds: ``hessian``, ``ggn``, ``fisher``, ``fisher_mc`` (options ``mc_samples``, ``seed``), ``empirical_fisher``.
    Every kind accepts ``check_determinism`` (default True).
    """
    if not isinstance(problem, Problem):
        raise ProblemError(f"operator() needs a curvdist.Problem, got {type(problem).__name__}")
    build = getattr(problem, "build_operator", None)  # problems whose data live elsewhere (Ray workers)
    if build is not None:
        if kind not in OPERATORS:
            raise ProblemError(f"unknown curvature kind {kind!r}; choose one of {sorted(OPERATORS)}")
        return build(kind, **options)
    if kind not in OPERATORS:
        raise ProblemError(f"unknown curvature kind {kind!r}; choose one of {sorted(OPERATORS)}")
    cls = OPERATORS[kind]
    try:
        inspect.signature(cls.__init__).bind(None, problem, **options)
    except TypeError as e:
        raise ProblemError(f"invalid options {sorted(options)} for curvature {kind!r}: {e}") from None
    return cls(problem, **options)


__all__ = [
    "GGN",
    "OPERATORS",
    "CurvatureOperator",
    "EmpiricalFisher",
    "Fisher",
    "FisherMC",
    "Hessian",
    "OutputSpaceCurvature",
    "operator",
]
