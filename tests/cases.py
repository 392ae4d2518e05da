"""Small shared cases (model, loss, data, seed) that every operator and query is checked on.

Adding a case here exercises every operator against its dense float64 ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import curvdist as cd
from curvdist import zoo


@dataclass(frozen=True)
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    loss: str
    X: Tensor
    y: Tensor
    batch_size: int

    def model(self) -> nn.Module:
        return self.make_model().double().eval()


def _digits(shape: str, n: int) -> tuple[Tensor, Tensor]:
    return zoo.digits(shape=shape, n=n, dtype="float64")


def _mlp_case() -> Case:
    X, y = _digits("flat", 13)
    X = X[:, [19, 20, 27, 28, 35, 36, 43, 44]].contiguous()  # 8 central pixels
    return Case("mlp", lambda: zoo.mlp(8, (5,), 4, "tanh", seed=1), "cross_entropy", X, y % 4, 5)


def _mlp_mse_case() -> Case:
    X, y = zoo.regression(n=11, in_features=3, out_features=2, seed=2, dtype="float64")
    return Case("mlp_mse", lambda: zoo.mlp(3, (4,), 2, "softplus", seed=2), "mse", X, y, 4)


def _cnn_case() -> Case:
    X, y = _digits("image", 9)
    return Case("cnn", lambda: zoo.cnn((2, 2), image_size=8, out_features=10, seed=3), "cross_entropy", X, y, 4)


def _transformer_case() -> Case:
    X, y = _digits("sequence", 7)
    make = lambda: zoo.transformer(tokens=8, features=8, d_model=4, heads=2, mlp_ratio=1, out_features=10,  # noqa
                                   seed=4)
    return Case("transformer", make, "cross_entropy", X, y, 3)


def _token_transformer_case() -> Case:
    X, y = zoo.digits(shape="tokens", n=6)
    make = lambda: zoo.transformer(tokens=6, d_model=4, heads=2, mlp_ratio=1, out_features=10, seed=5,  # noqa
                                   vocab=17, positions="embedding")
    return Case("token_transformer", make, "cross_entropy", X[:, 26:32].contiguous(), y, 4)


def _cnn_batchnorm() -> nn.Module:
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(2)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), bn, nn.SiLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 5))


def _cnn_bn_case() -> Case:
    X, y = _digits("image", 7)
    return Case("cnn_bn", _cnn_batchnorm, "cross_entropy", X, y % 5, 3)


CASES: dict[str, Callable[[], Case]] = {
    "mlp": _mlp_case, "mlp_mse": _mlp_mse_case, "cnn": _cnn_case, "transformer": _transformer_case,
    "token_transformer": _token_transformer_case, "cnn_bn": _cnn_bn_case,
}


def spd_matrix(d: int, eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (Q * eigenvalues) @ Q.T


def make_problem(case: Case, reduction: str = "mean", model: torch.nn.Module | None = None) -> cd.Problem:
    model = case.model() if model is None else model
    return cd.Problem(model, case.loss, (case.X, case.y), batch_size=case.batch_size, reduction=reduction)


def two_shard_problem(case: Case, problem: cd.Problem, split: int = 4, batch_size: int = 3) -> cd.ShardedProblem:
    """``problem``'s data in two shards (samples [0, split) and [split, N), each a sum over its samples with its
    ``sample_offset``), added in order by an in-process reducer: a sharded problem that must equal ``problem``."""
    from curvdist.problem.reducers import Shard, ShardReducer, tree_sum
    from curvdist.problem.sharded import ShardedProblem

    class TwoShards(ShardReducer):
        def __init__(self) -> None:
            halves = [(case.X[:split], case.y[:split]), (case.X[split:], case.y[split:])]
            self.parts = [Shard(cd.Problem(problem.model, case.loss, h, batch_size=batch_size, reduction="sum",
                                           sample_offset=offset)) for h, offset in zip(halves, (0, split))]

        @property
        def shards(self) -> int:
            return 2

        def sum(self, statistic, *args):  # type: ignore[no-untyped-def]
            return tree_sum([statistic(p, *args) for p in self.parts])

        def set_params(self, flat: torch.Tensor) -> None:
            raise NotImplementedError

    return ShardedProblem(problem.model, case.loss, TwoShards(), list(problem.param_names))
