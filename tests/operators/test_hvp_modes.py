"""The Hessian-vector product modes (forward-over-reverse, reverse-over-reverse, finite differences, auto, compile)
against the dense float64 Hessian from plain autograd (tests/dense.py).

Tolerances. The exact modes are checked to 1e-10 relative. The central difference has error
(ε²/6)‖D³(∇L)[v,v,v]‖ + O(u‖∇L‖/ε) with ε = h·max(1,‖θ‖)/‖v‖ and h = u^{1/3} ≈ 4.8e-6 in float64, i.e. a relative
error of about u^{2/3} ≈ 2.3e-11 times a constant of the problem (measured on these cases: 1e-11 to 1e-10 for a
matvec, up to 7e-9 for the unit columns of to_dense); it is checked to 1e-6 relative, two decades above the worst
seen and far below the 1e-2 an O(h) or wrongly scaled step would give.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import curvdist as cd
from curvdist.catalogue import HVPMode
from curvdist.errors import ProblemError, UnknownNameError
from curvdist.operators.hessian import Hessian, clear_mode_cache
from curvdist.zoo.resnet import calibrate_batchnorm, resnet18
from tests import dense
from tests.cases import CASES, make_problem

EXACT = ["forward_over_reverse", "reverse_over_reverse"]
MODES = [*EXACT, "finite_difference"]
FD_RTOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _truth(name: str) -> tuple[cd.Problem, Tensor]:
    case = CASES[name]()
    model = case.model()
    return make_problem(case, "mean", model), dense.dense_hessian(model, case.loss, case.X, case.y, "mean")


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _vector(d: int, seed: int = 1) -> Tensor:
    return torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", [*MODES, "auto"])
@pytest.mark.parametrize("name", ["mlp", "mlp_mse", "cnn_bn"])
def test_every_mode_equals_the_dense_hessian(name: str, mode: str) -> None:
    problem, H = _truth(name)
    op = cd.operator(problem, "hessian", mode=mode)
    assert op.mode != HVPMode.AUTO and op.requested_mode == mode
    v = _vector(problem.dim)
    tol = FD_RTOL if op.mode == HVPMode.FINITE_DIFFERENCE else 1e-10
    assert _rel(op.matvec(v), H @ v) < tol
    if op.mode != HVPMode.FINITE_DIFFERENCE:  # its block path is checked against its matvec below
        assert _rel(op.to_dense(), H) < tol  # the block (matmat) path


def _transformer() -> tuple[cd.Problem, Tensor, tuple[Tensor, ...]]:
    case = CASES["transformer"]()
    problem = make_problem(case)
    V = torch.stack([_vector(problem.dim, s) for s in range(3)])
    return problem, V, tuple(t.reshape(3, *s) for t, s in
                             zip(torch.split(V, [s.numel() for s in problem.shapes], 1), problem.shapes))


def test_matmat_equals_repeated_matvec_and_the_modes_agree_on_attention() -> None:
    """The transformer case (attention on the math kernel, GELU, LayerNorm): every mode's block product equals its
    repeated single product, and the modes agree with each other (its dense Hessian is checked against plain
    autograd in test_operators.py)."""
    problem, V, stacked = _transformer()
    products = {}
    for mode in MODES:
        op = cd.operator(problem, "hessian", mode=mode, check_determinism=False)
        block = torch.cat([t.reshape(3, -1) for t in op.matmat_params(stacked)], 1)
        single = torch.stack([op.matvec(V[i]) for i in range(3)])
        # finite differences: each vector has its own step; the batched and single differences round
        # differently, amplified by 1/ε, so they agree to about u/h
        assert _rel(block, single) < (1e-8 if mode == "finite_difference" else 1e-12), mode
        products[mode] = single
    ref = products["reverse_over_reverse"]
    assert _rel(products["forward_over_reverse"], ref) < 1e-10
    assert _rel(products["finite_difference"], ref) < FD_RTOL


def test_auto_picks_an_exact_mode_records_timings_and_caches_the_choice() -> None:
    case = CASES["mlp"]()
    problem = make_problem(case)
    op = cd.operator(problem, "hessian")
    assert isinstance(op, Hessian) and op.requested_mode == HVPMode.AUTO
    assert op.mode in EXACT and op.mode_source == "measured" and not op.compiled
    assert set(op.mode_timings) == set(EXACT)
    assert all(0 < t < math.inf for t in op.mode_timings.values())
    assert op.mode_timings[op.mode.value] == min(op.mode_timings.values())
    info = op.product_info()
    assert info["mode"] == op.mode.value and info["mode_timings_s"] == op.mode_timings
    assert "fd_step" not in info
    # every later operator of the same model reuses the measurement (same product, bit for bit)
    again = cd.operator(make_problem(case, "sum", problem.model), "hessian")
    assert again.mode_source == "cached" and again.mode == op.mode and again.mode_timings == op.mode_timings
    clear_mode_cache()
    assert cd.operator(problem, "hessian").mode_source == "measured"


def test_local_and_sharded_products_agree_bit_for_bit_under_auto() -> None:
    local = make_problem(CASES["mlp"]())
    sharded = cd.ShardedProblem.in_process(local)
    v = _vector(local.dim)
    assert torch.equal(cd.operator(local, "hessian") @ v, cd.operator(sharded, "hessian") @ v)


def test_bad_options_raise() -> None:
    problem, _ = _truth("mlp")
    with pytest.raises(UnknownNameError, match="forward_over_reverse"):
        cd.operator(problem, "hessian", mode="newton")
    with pytest.raises(UnknownNameError):
        Hessian(problem, mode=3)  # type: ignore[arg-type]
    with pytest.raises(ProblemError, match="fd_step"):
        cd.operator(problem, "hessian", mode="finite_difference", fd_step=-1e-3)
    with pytest.raises(ProblemError, match="compile"):
        cd.operator(problem, "hessian", compile=1)


def test_finite_difference_records_its_step_and_error_estimate() -> None:
    problem, H = _truth("mlp")
    v = _vector(problem.dim)
    op = cd.operator(problem, "hessian", mode="finite_difference")
    info = op.product_info()
    assert info["fd_step"] == pytest.approx(2.0 ** (-53 / 3))  # u^{1/3} of float64
    assert 0 < info["fd_error_estimate"] < 1e-8
    coarse = cd.operator(problem, "hessian", mode="finite_difference", fd_step=1e-2)
    err = _rel(coarse.matvec(v), H @ v)
    assert 1e-8 < err < 1e-2  # the step is used: a coarse step is visibly less accurate, still O(h²)
    assert err / 3 < coarse.fd_error_estimate < 3 * err  # the Richardson estimate (first batch) tracks the error


# ------------------------------------------------------------------ models that lack a derivative


class _Cube(torch.autograd.Function):
    """x³ with a hand-written backward (3x²·g, itself differentiable) and no forward-mode rule (no jvp, no
    setup_context): reverse-over-reverse works, forward-over-reverse does not."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)  # type: ignore[attr-defined]
        return x**3

    @staticmethod
    def backward(ctx: object, g: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return 3 * x**2 * g


class _CubeOnce(_Cube):
    """The same with a backward that cannot be differentiated again: only finite differences work."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: object, g: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return 3 * x**2 * g


class _CubeNet(nn.Module):
    def __init__(self, cube: type[torch.autograd.Function] | None) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)
        self.cube = cube

    def forward(self, x: Tensor) -> Tensor:
        h = 0.5 * self.a(x)
        return self.b(self.cube.apply(h) if self.cube is not None else h**3)


def _cube_data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64)


def _cube_problem(cube: type[torch.autograd.Function]) -> cd.Problem:
    return cd.Problem(_CubeNet(cube).double().eval(), "mse", _cube_data(), batch_size=4)


def _cube_truth() -> Tensor:
    """The dense Hessian of the same network with x³ written in torch ops (same weights: seeded)."""
    return dense.dense_hessian(_CubeNet(None).double().eval(), "mse", *_cube_data(), "mean")


def test_a_model_without_forward_mode_ad_gets_reverse_over_reverse() -> None:
    problem = _cube_problem(_Cube)
    op = cd.operator(problem, "hessian")
    assert op.mode == HVPMode.REVERSE_OVER_REVERSE
    assert "forward_over_reverse" in op.mode_failures and set(op.mode_timings) == {"reverse_over_reverse"}
    H = _cube_truth()
    v = _vector(problem.dim)
    assert _rel(op.matvec(v), H @ v) < 1e-10
    assert _rel(op.to_dense(), H) < 1e-10  # block products fall back from vmap to one graph and k backwards


def test_a_model_without_second_derivatives_falls_back_to_finite_differences() -> None:
    problem = _cube_problem(_CubeOnce)
    with pytest.warns(RuntimeWarning, match="finite differences"):
        op = cd.operator(problem, "hessian")
    assert op.mode == HVPMode.FINITE_DIFFERENCE and set(op.mode_failures) == set(EXACT)
    v = _vector(problem.dim)
    assert _rel(op.matvec(v), _cube_truth() @ v) < FD_RTOL


# ------------------------------------------------------------------ torch.compile


def test_compiled_products_equal_the_dense_hessian() -> None:
    """The dynamo-traced torch.func products (backend "eager": graph capture without code generation, which
    keeps the test fast; the benchmark measures inductor)."""
    problem, H = _truth("mlp")
    v = _vector(problem.dim)
    op = cd.operator(problem, "hessian", mode="reverse_over_reverse", compile="eager")
    assert op.compiled and op.product_info()["compiled"]
    assert _rel(op.matvec(v), H @ v) < 1e-10
    small, H_small = _truth("mlp_mse")
    auto = cd.operator(small, "hessian", compile="eager")  # the compiled kernels compete in the timing
    assert set(auto.mode_timings) == {*EXACT, *(m + "+compile" for m in EXACT)}
    w = _vector(small.dim)
    assert _rel(auto.matvec(w), H_small @ w) < 1e-10


def test_a_failing_compiler_warns_and_falls_back_to_the_eager_product() -> None:
    problem, H = _truth("mlp")
    with pytest.warns(RuntimeWarning, match="torch.compile of the reverse_over_reverse"):
        op = cd.operator(problem, "hessian", mode="reverse_over_reverse", compile="no_such_backend")
    assert not op.compiled and "reverse_over_reverse+compile" in op.mode_failures
    v = _vector(problem.dim)
    assert _rel(op.matvec(v), H @ v) < 1e-10


# ------------------------------------------------------------------ ResNet-18 from the zoo


def test_resnet18_has_the_standard_parameter_counts() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(resnet18()) == 11_689_512
    assert count(resnet18(num_classes=10)) == 11_181_642
    assert not resnet18().training  # eval mode: curvdist refuses BatchNorm in train mode


def test_the_exact_modes_agree_on_a_narrow_resnet() -> None:
    """(Finite differences are not compared here: a step across a ReLU or max-pool kink sees the jump of the
    gradient, so on this network the difference can be far from the almost-everywhere Hessian.)"""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 2])
    model = calibrate_batchnorm(resnet18(num_classes=3, width=2, dtype="float64"), [X])
    problem = cd.Problem(model, "cross_entropy", (X, y))
    v = _vector(problem.dim)
    products = {m: cd.operator(problem, "hessian", mode=m, check_determinism=False).matvec(v) for m in EXACT}
    assert _rel(products["forward_over_reverse"], products["reverse_over_reverse"]) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact mode works: auto neither warns nor uses finite differences
        assert cd.operator(problem, "hessian").mode in EXACT


# ------------------------------------------------------------------ products through a kept gradient graph


def _one_batch(name: str) -> tuple[cd.Problem, nn.Module, Tensor, Tensor, str]:
    case = CASES[name]()
    model = case.model()
    return cd.Problem(model, case.loss, (case.X, case.y)), model, case.X, case.y, case.loss


def test_a_kept_gradient_graph_follows_every_in_place_change() -> None:
    """One batch: reverse-over-reverse keeps the graph of ∇ℓ and runs only the second backward per product; a step
    of the parameters (set_params) or a changed buffer (BatchNorm statistics) rebuilds it."""
    problem, model, X, y, loss = _one_batch("cnn_bn")
    op = cd.operator(problem, "hessian", mode="reverse_over_reverse")
    assert op.reuse_graph and op.product_info()["reuse_graph"]
    v = _vector(problem.dim)
    truth = lambda: dense.dense_hessian(model, loss, X, y, "mean")
    assert _rel(op.matvec(v), truth() @ v) < 1e-10
    assert _rel(op.matvec(v), truth() @ v) < 1e-10  # through the kept graph
    problem.set_params(tuple(p + 0.3 * torch.randn_like(p) for p in problem.params))
    assert _rel(op.matvec(v), truth() @ v) < 1e-10
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_var.mul_(2.0)
    assert _rel(op.matvec(v), truth() @ v) < 1e-10
    op.release_graph()
    assert _rel(op.to_dense(), truth()) < 1e-10
    auto = cd.operator(problem, "hessian")  # auto times reverse-over-reverse through the kept graph
    assert auto.reuse_graph == (auto.mode == HVPMode.REVERSE_OVER_REVERSE)
    assert _rel(auto.matvec(v), truth() @ v) < 1e-10


def test_a_kept_gradient_graph_holds_no_gradient_values() -> None:
    """The kept graph of ∇ℓ is its graph nodes (where each entry of ∇ℓ was made), not ∇ℓ's values: no tensor with
    a parameter's shape and a graph is alive once it is built (a gradient's worth of memory), and the products
    through it equal the dense Hessian's."""
    import gc

    from curvdist.operators.hvp_modes import gradient_graph, through_graph

    problem, model, X, y, loss = _one_batch("mlp")
    shapes = {tuple(p.shape) for p in problem.params}

    def with_graph() -> dict[int, Tensor]:  # plain tensors with a parameter's shape and a graph (not other tests')
        gc.collect()
        return {id(t): t for t in gc.get_objects() if type(t) is Tensor and t.grad_fn is not None
                and tuple(t.shape) in shapes}

    before = with_graph()
    leaves, edges = gradient_graph(problem.batch_loss, problem.params, X, y)
    alive = [t for i, t in with_graph().items() if i not in before]
    assert alive == [] and all(isinstance(e, torch.autograd.graph.GradientEdge) for e in edges)
    v = _vector(problem.dim)
    hv = torch.cat([t.reshape(-1) for t in through_graph((leaves, edges), problem.unflatten(v))])
    truth = dense.dense_hessian(model, loss, X, y, "sum")  # the batch's loss is the sum of its terms
    assert _rel(hv, truth @ v) < 1e-10
    assert _rel(torch.cat([t.reshape(-1) for t in through_graph((leaves, edges), problem.unflatten(v))]),
                truth @ v) < 1e-10  # the graph stays for the next product


def test_graph_reuse_is_for_one_batch_unless_asked_and_never_skips_the_determinism_check() -> None:
    problem, H = _truth("mlp")  # three batches
    v = _vector(problem.dim)
    assert not cd.operator(problem, "hessian", mode="reverse_over_reverse").reuse_graph
    every = cd.operator(problem, "hessian", mode="reverse_over_reverse", reuse_graph=True)
    assert every.reuse_graph and _rel(every.matvec(v), H @ v) < 1e-10 and _rel(every.matvec(v), H @ v) < 1e-10
    assert not cd.operator(problem, "hessian", mode="finite_difference").reuse_graph
    with pytest.raises(ProblemError, match="reuse_graph"):
        cd.operator(problem, "hessian", mode="forward_over_reverse", reuse_graph=True)
    # a random forward pass is caught although the products would then share one graph
    case = CASES["mlp"]()
    noisy = nn.Sequential(case.model(), nn.Dropout(0.5)).train()
    with pytest.raises(cd.errors.NonDeterministicError):
        cd.operator(cd.Problem(noisy, case.loss, (case.X, case.y)), "hessian", mode="reverse_over_reverse")
