"""The curvature section of a config: the Hessian's product mode and compile switch reach the operator."""

from __future__ import annotations

import pytest

import curvdist as cd
from curvdist.queries.session import Coordinates, run_query
from curvdist.queries.specs import CurvatureSpec, EigsQuery, MetricSpec


def test_mode_reaches_the_hessian_and_the_result(mlp_problem: cd.Problem) -> None:
    spec = CurvatureSpec(kind="hessian", mode="forward_over_reverse")
    coords = Coordinates("theta", mlp_problem, seed=0)
    r = run_query(EigsQuery(kind="eigs", k=1), coords, spec, MetricSpec(), seed=0)
    assert r.info["product"]["mode"] == "forward_over_reverse"
    assert r.info["product"]["requested_mode"] == "forward_over_reverse"
    auto = run_query(EigsQuery(kind="eigs", k=1), coords, CurvatureSpec(kind="hessian"), MetricSpec(), seed=0)
    assert auto.info["product"]["requested_mode"] == "auto"
    assert auto.value[0] == pytest.approx(r.value[0], rel=1e-10)


def test_mode_is_for_the_hessian_only() -> None:
    with pytest.raises(cd.ConfigError, match="mode and compile apply to the hessian only"):
        CurvatureSpec(kind="ggn", mode="finite_difference").options(0)
    with pytest.raises(Exception, match="mode"):
        CurvatureSpec(kind="hessian", mode="sideways")
