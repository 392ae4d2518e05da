"""Matrix-free curvature operators (Hessian, GGN, Fisher, Monte-Carlo Fisher, empirical Fisher)."""

from __future__ import annotations

import inspect
from typing import Any

from ..catalogue import Curvature, parse
from ..errors import ProblemError
from ..problem.base import BaseProblem, StagedProblem
from ..problem.problem import Problem
from ..problem.sharded import ShardedProblem
from .base import CurvatureOperator
from .hessian import Hessian
from .output_space import GGN, EmpiricalFisher, Fisher, FisherMC, OutputSpaceCurvature
from .sharded import ShardedOperator

OPERATORS: dict[str, type[CurvatureOperator]] = {
    Curvature.HESSIAN.value: Hessian,
    Curvature.GGN.value: GGN,
    Curvature.FISHER.value: Fisher,
    Curvature.FISHER_MC.value: FisherMC,
    Curvature.EMPIRICAL_FISHER.value: EmpiricalFisher,
}


def operator(problem: BaseProblem | StagedProblem, kind: str = "hessian", **options: Any) -> Any:
    """Build the curvature operator ``kind`` of ``problem``.

    Kinds (:class:`curvdist.catalogue.Curvature`): ``hessian``, ``ggn``, ``fisher``, ``fisher_mc`` (options
    ``mc_samples``, ``seed``), ``empirical_fisher``. Every kind accepts ``check_determinism`` (default True). A
    sharded problem gets the :class:`ShardedOperator` of the kind (shard products summed by its reducer), a staged
    (pipeline) problem its own operator.
    """
    if not isinstance(problem, (BaseProblem, StagedProblem)):
        raise ProblemError(f"operator() needs a curvdist.Problem, got {type(problem).__name__}")
    kind = parse(Curvature, kind, "curvature kind").value
    if isinstance(problem, StagedProblem):
        return problem.curvature_operator(kind, **options)
    cls = OPERATORS[kind]
    try:
        inspect.signature(cls.__init__).bind(None, problem, **options)
    except TypeError as e:
        raise ProblemError(f"invalid options {sorted(options)} for curvature {kind!r}: {e}") from None
    if isinstance(problem, ShardedProblem):
        return ShardedOperator(problem, kind, **options)
    assert isinstance(problem, Problem)
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
    "ShardedOperator",
    "operator",
]
