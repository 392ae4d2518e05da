"""The memory budget of Hessian products: the saved-graph measurement against closed forms, and products split into
micro-batches against the dense float64 Hessian (tests/dense.py) and the unsplit product.

Tolerances. A split product sums the same per-sample terms in another grouping, so it equals the unsplit one to
rounding: 1e-12 relative in float64 for the exact modes (seen: about 1e-16), 1e-9 for finite differences (each
micro-batch's difference of gradients rounds on its own, u·‖∇ℓ‖/ε ≈ 1e-11 relative). Against the dense Hessian the
exact modes are checked to 1e-10, as in test_hvp_modes.py.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import Tensor

import curvdist as cd
from curvdist.errors import ProblemError
from curvdist.operators.graph_memory import MIN_SPLIT_BYTES, GraphSize, fitting_micro_batch, measure_graph, saved_bytes
from curvdist.operators.hessian import Hessian, clear_mode_cache
from tests import dense
from tests.cases import CASES
from tests.operators.test_hvp_modes import _rel, _truth, _vector

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the measurement
def _tanh_layer() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g)
    return W, x


def test_saved_bytes_are_the_tensors_backward_needs() -> None:
    """sum(tanh(x W)) with W a parameter: the matmul saves x (for ∂/∂W), tanh its (5, 4) output, sum nothing."""
    W, x = _tanh_layer()
    fn = lambda: torch.tanh(x @ W).sum()  # noqa: E731
    assert saved_bytes(fn, [W, x]) == 5 * 4 * 8  # x and W are resident
    assert saved_bytes(fn, [W]) == 5 * 4 * 8 + 5 * 3 * 8  # the input counts when it is not


def test_saved_bytes_let_the_graph_go() -> None:
    """The measurement holds nothing once it returns: an output that its own backward saves (tanh's) would be kept
    alive for good by a pack hook that returned the tensor itself (a reference cycle through the graph)."""
    W, x = _tanh_layer()
    refs: list[weakref.ref[Tensor]] = []

    def forward() -> None:  # a graph built and dropped without a backward, as the forward measurement does
        h = torch.tanh(x @ W)
        refs.append(weakref.ref(h))
        h.sum()

    def product() -> None:  # a graph used by a backward inside, as the products' measurements do
        h = torch.tanh(x @ W)
        refs.append(weakref.ref(h))
        torch.autograd.grad(h.sum(), W)

    assert saved_bytes(forward, [W, x]) == saved_bytes(product, [W, x]) == 5 * 4 * 8
    assert [r() for r in refs] == [None, None]


def test_graph_size_is_affine_in_the_samples() -> None:
    """G(n) from one and two samples predicts the forward graph of three to seven samples of the MLP exactly (its
    saved activations are per sample)."""
    problem, _ = _truth("mlp")
    case = CASES["mlp"]()
    X, y = case.X, case.y

    def forward(Xn: Tensor, yn: Tensor) -> None:
        with torch.enable_grad():
            problem.batch_loss(tuple(p.detach().requires_grad_(True) for p in problem.params), Xn, yn)

    size = measure_graph(forward, X, y, problem.params)
    assert size.per_sample > 0
    for n in range(3, 8):
        assert size.at(n) == saved_bytes(lambda: forward(X[:n], y[:n]), [*problem.params, X[:n], y[:n]])


@pytest.mark.parametrize(("size", "budget", "n", "expected"), [
    (GraphSize(100, 10), None, 8, None),  # no budget
    (GraphSize(100, 10), 180, 8, None),  # the whole batch fits (100 + 80)
    (GraphSize(100, 10), 179, 8, 7),  # 100 + 70 ≤ 179 < 100 + 80
    (GraphSize(100, 10), 125, 8, 2),
    (GraphSize(100, 10), 50, 8, 1),  # nothing fits: one sample at a time
    (GraphSize(0, 0), 1, 8, None),  # nothing grows with the batch
])
def test_fitting_micro_batch(size: GraphSize, budget: int | None, n: int, expected: int | None) -> None:
    assert fitting_micro_batch(size, budget, n) == expected


# ----------------------------------------------------------------------------- split products
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_binding_budget_splits_the_products_and_keeps_their_values(name: str) -> None:
    """A budget nothing fits: auto takes reverse-over-reverse on one sample at a time, keeps no graph, and its
    product is the dense Hessian's and the unsplit product's."""
    problem, H = _truth(name)
    v = _vector(problem.dim)
    op = Hessian(problem, memory_budget=1)
    assert (op.mode.value, op.mode_source, op.product_micro_batch, op.reuse_graph) == (
        "reverse_over_reverse", "budget", 1, False)
    assert op.memory_budget_bytes == 1 and op.forward_graph_bytes > 0
    assert op.graph_sizes["reverse_over_reverse"].per_sample > 0
    whole = Hessian(problem, mode="reverse_over_reverse", memory_budget=None, reuse_graph=False)
    assert whole.product_micro_batch is None and whole.memory_budget_bytes is None
    split = op.apply_vector(v)
    assert _rel(split, H @ v) <= 1e-10
    assert _rel(split, whole.apply_vector(v)) <= 1e-12


@pytest.mark.parametrize(("mode", "rtol"), [("forward_over_reverse", 1e-12), ("finite_difference", 1e-9)])
def test_every_mode_splits_under_a_budget(mode: str, rtol: float) -> None:
    problem, _ = _truth("transformer")
    v = _vector(problem.dim, seed=2)
    op = Hessian(problem, mode=mode, memory_budget=1)
    assert op.product_micro_batch == 1 and op.mode_source == "user"
    whole = Hessian(problem, mode=mode, memory_budget=None)
    assert _rel(op.apply_vector(v), whole.apply_vector(v)) <= rtol


def test_the_micro_batch_is_the_largest_whose_graph_fits() -> None:
    """A budget of exactly G(2) gives micro-batches of two samples; one byte less, of one."""
    problem, H = _truth("cnn")  # batches of 4
    size = Hessian(problem, mode="reverse_over_reverse", memory_budget=1).graph_sizes["reverse_over_reverse"]
    v = _vector(problem.dim, seed=3)
    for budget, expected in ((size.at(2), 2), (size.at(2) - 1, 1), (size.at(3), 3), (size.at(4), None)):
        op = Hessian(problem, mode="reverse_over_reverse", memory_budget=budget)
        assert op.product_micro_batch == expected, budget
        assert _rel(op.apply_vector(v), H @ v) <= 1e-10


def test_block_products_split_like_single_ones() -> None:
    problem, H = _truth("token_transformer")
    op = Hessian(problem, memory_budget=1)
    V = torch.randn(problem.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    block = op.apply_block(V)
    assert _rel(block, H @ V) <= 1e-10
    for i in range(3):
        assert _rel(block[:, i], op.apply_vector(V[:, i].contiguous())) <= 1e-12


def test_small_graphs_are_not_split_by_default() -> None:
    """The default budget is the forward graph, but never under 64 MiB: the test cases' products stay whole, and a
    one-batch problem keeps its graph between products as before."""
    clear_mode_cache()
    case = CASES["mlp"]()
    problem = cd.Problem(case.model(), case.loss, (case.X, case.y))  # one batch
    op = Hessian(problem)
    assert op.memory_budget_bytes == MIN_SPLIT_BYTES
    assert op.product_micro_batch is None and op.graph_sizes == {}  # far under the budget: not even measured
    assert op.reuse_graph == (op.mode.value == "reverse_over_reverse")
    info = op.product_info()
    assert info["memory_budget_bytes"] == MIN_SPLIT_BYTES and info["product_micro_batch"] is None
    assert info["forward_graph_bytes"] == op.forward_graph_bytes > 0


def test_reuse_graph_true_keeps_whole_graphs_over_the_budget() -> None:
    problem, H = _truth("mlp")
    op = Hessian(problem, mode="reverse_over_reverse", reuse_graph=True, memory_budget=1)
    assert op.reuse_graph and op.product_micro_batch is None
    v = _vector(problem.dim, seed=5)
    assert _rel(op.apply_vector(v), H @ v) <= 1e-10


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "big", "AUTO"])
def test_a_bad_budget_is_refused(bad: object) -> None:
    problem, _ = _truth("mlp")
    with pytest.raises(ProblemError, match="memory_budget"):
        Hessian(problem, memory_budget=bad)  # type: ignore[arg-type]


class _SummedScale(torch.nn.Module):
    """f(x) = (x W) · Σ_i s_i: the gradient of s is an expanded (stride-0) tensor, which the accumulation must not
    add into in place."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.W = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64, generator=g))
        self.s = torch.nn.Parameter(torch.randn(4, dtype=torch.float64, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.W) * self.s.sum()


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_the_first_batch_result_is_the_accumulator_even_when_expanded(kind: str) -> None:
    model = _SummedScale()
    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(6, 3, dtype=torch.float64, generator=g), torch.randn(6, 2, dtype=torch.float64, generator=g)
    problem = cd.Problem(model, "mse", (X, y), batch_size=2)  # three batches: the first result is added into
    truth = (dense.dense_hessian if kind == "hessian" else dense.dense_ggn)(model, "mse", X, y, "mean")
    v = _vector(problem.dim, seed=9)
    assert _rel(cd.operator(problem, kind).apply_vector(v), truth @ v) <= 1e-10
